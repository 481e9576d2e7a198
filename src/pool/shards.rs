//! The per-core parts of one pool: each core's own deadpool of server connections, and the
//! leases that say how many of the pool's slots each core may use.
//!
//! Part of the pool, under [`super::PoolSet`]. Sessions live on one core's event loop (see
//! `session_threads`); a session checks out of its core's part only, so a server connection
//! is created, used and returned on one core and no pool state is touched by two cores per
//! transaction. (A pool whose share cannot give every core two connections is one part that
//! the cores share, as a single pool.) The pool's share of its budget (`pool_size` less pgvalve's own connections,
//! see `server::budget`) is split into leases, one per core: a core's part opens no more
//! connections than its lease, and its admission gate (one per core and pool, see
//! [`crate::admission::gate_name`]) hands out no more grants. The budget itself still counts
//! every connection, so the caps hold exactly whatever the leases say.
//!
//! [`Shards::rebalance`] runs every few milliseconds on the proxy's runtime (not on the
//! cores): it reads each core's demand (grants in use plus clients waiting, from admission)
//! and, when a core has clients waiting while another holds more lease than it needs, moves
//! lease to the waiting core (max-min fair by demand). The giving core hands its idle
//! connections over at once and its busy ones when they come back ([`Incoming`]); the taking
//! core takes them (registering their sockets with its own event loop) before it opens new
//! ones, so connections move with their slots and a pool keeps its connections. Leases never move while every core's waiters are served by its fair part,
//! so a saturated proxy does not trade connections back and forth. A lease may be cut below
//! what its core has in use when those grants are held for transactions (they come back at
//! the transaction's end and go to the other core), never below what is held for whole
//! sessions or pinned: so a split left lopsided while one core's clients came first evens
//! out even when every connection is always busy.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::manager::Pool;
use crate::admission::Admission;
use crate::lease::{even, fit, plan, Demand};
use crate::server::budget::Occupant;
use crate::server::ServerConn;

/// The per-core parts of one pool (see the module docs).
pub(crate) struct Shards {
    pools: Vec<Pool>,
    /// Each core's lease now.
    leases: Mutex<Vec<usize>>,
    /// The pool's share of its budget.
    share: AtomicUsize,
    /// Lease moves so far.
    moves: AtomicU64,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("leases", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl Shards {
    /// Parts `pools` (one per core, or one for all), the share split evenly.
    pub(crate) fn new(pools: Vec<Pool>, share: usize) -> Arc<Self> {
        let leases = even(share, pools.len());
        for (p, &l) in pools.iter().zip(&leases) {
            set_lease(p, l);
        }
        Arc::new(Shards {
            pools,
            leases: Mutex::new(leases),
            share: AtomicUsize::new(share),
            moves: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Core `core`'s part (a pool of one part serves every core).
    pub(crate) fn core(&self, core: usize) -> &Pool {
        &self.pools[core.min(self.pools.len() - 1)]
    }

    /// Every core's part.
    pub(crate) fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Each core's lease now.
    pub(crate) fn leases(&self) -> Vec<usize> {
        self.lock().clone()
    }

    /// Lease moves so far.
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    /// Closes every part: idle connections now, busy ones when they come back.
    pub(crate) fn close(&self) {
        for p in &self.pools {
            p.close();
        }
        self.pools[0].manager().incoming.expire(true);
    }

    /// Moves lease to cores whose clients wait (see the module docs); true when it did.
    pub(crate) fn rebalance(&self, admission: &Admission) -> bool {
        if self.pools.len() < 2 {
            return false;
        }
        let gates: Vec<(&Arc<str>, usize)> = self.pools.iter().map(|p| p.manager().gate()).collect();
        let demand: Vec<Demand> = admission
            .gates(&gates)
            .into_iter()
            .zip(&self.pools)
            .map(|((in_use, waiting, long), p)| {
                let s = p.status();
                // Grants in use, or connections in use when more (session-mode logins).
                let conns = s.size.saturating_sub(s.available);
                Demand {
                    busy: (in_use as usize).max(conns),
                    waiting: waiting as usize + s.waiting,
                    // What does not come back at a transaction's end: grants held for whole
                    // sessions or pinned, and connections in use beyond the grants.
                    held: long as usize + conns.saturating_sub(in_use as usize),
                }
            })
            .collect();
        self.pools[0].manager().incoming.expire(false);
        self.apply(admission, |share, leases| plan(share, leases, &demand))
    }

    /// A new share (the budget's size or pgvalve's own connections changed).
    fn reshare(&self, share: usize, admission: Option<&Admission>) {
        self.share.store(share, Ordering::Relaxed);
        for p in &self.pools {
            p.manager().size.store(share, Ordering::Relaxed);
        }
        let changed = self.apply_leases(|_, leases| {
            let total: usize = leases.iter().sum();
            (total != share).then(|| {
                let open: Vec<usize> = self.pools.iter().map(|p| p.status().size).collect();
                fit(share, leases, &open)
            })
        });
        if let (Some(a), Some(_)) = (admission, changed) {
            self.tell_gates(a);
        }
    }

    fn apply(&self, admission: &Admission, f: impl FnOnce(usize, &[usize]) -> Option<Vec<usize>>) -> bool {
        if self.apply_leases(f).is_none() {
            return false;
        }
        self.moves.fetch_add(1, Ordering::Relaxed);
        self.tell_gates(admission);
        true
    }

    /// Sets new leases (shrinking parts first), returning them.
    fn apply_leases(&self, f: impl FnOnce(usize, &[usize]) -> Option<Vec<usize>>) -> Option<Vec<usize>> {
        let mut leases = self.lock();
        let new = f(self.share.load(Ordering::Relaxed), &leases)?;
        for k in (0..new.len()).filter(|&k| new[k] < leases[k]) {
            self.shrink(k, new[k]);
        }
        for k in (0..new.len()).filter(|&k| new[k] > leases[k]) {
            set_lease(&self.pools[k], new[k]);
        }
        leases.clone_from(&new);
        Some(new)
    }

    /// Part `k` may hold `lease` connections from now: what it holds beyond that goes to the
    /// parts whose leases grow, the idle ones now, the busy ones when they come back.
    fn shrink(&self, k: usize, lease: usize) {
        let pool = &self.pools[k];
        let over = pool.status().size.saturating_sub(lease);
        let mut taken = 0;
        let moved = pool.retain(|_, _| {
            taken += 1;
            taken > over
        });
        let incoming = &pool.manager().incoming;
        for conn in moved.removed {
            incoming.put(conn);
        }
        // The busy ones go over as they come back (`pool::guard`: a part holding more than
        // its lease hands a returning connection over).
        set_lease(pool, lease);
    }

    fn tell_gates(&self, admission: &Admission) {
        let gates: Vec<(Arc<str>, u32)> = self
            .pools
            .iter()
            .zip(self.leases())
            .map(|(p, l)| (p.manager().gate.clone(), u32::try_from(l).unwrap_or(u32::MAX)))
            .collect();
        admission.resize_gates(&gates);
    }
}

/// Idle connections on their way from a core whose lease shrank to one whose lease grew
/// (shared by every part of a pool): the growing part's next connection is one of these
/// rather than a new one, so a pool keeps its connections while its lease moves.
#[derive(Debug, Default)]
pub(crate) struct Incoming {
    conns: Mutex<Vec<(Box<ServerConn>, Instant)>>,
    /// Woken at each [`Incoming::put`]: parts waiting for a slot take the connection instead.
    arrived: tokio::sync::Notify,
    /// Server failures any part saw (a connection whose server failed under it): every part
    /// probes its idle connections before their next reuse, not only the part that saw it.
    failures: AtomicU64,
}

/// How long a handed-over connection waits for a core to take it before it is closed.
const INCOMING_FOR: Duration = Duration::from_millis(500);

impl Incoming {
    /// Hands `conn` over to whichever part opens a connection next.
    pub(crate) fn put(&self, conn: Box<ServerConn>) {
        self.lock().push((conn, Instant::now()));
        self.arrived.notify_waiters();
    }

    /// Resolves at the next [`Incoming::put`] (enable it before looking at [`Incoming::len`]
    /// so that no put between the two is missed).
    pub(crate) fn arrived(&self) -> tokio::sync::futures::Notified<'_> {
        self.arrived.notified()
    }

    /// A handed-over connection, if any (the newest: the oldest are closed first).
    pub(crate) fn take(&self) -> Option<Box<ServerConn>> {
        self.lock().pop().map(|(c, _)| c)
    }

    /// A connection of the pool found its server failed (PostgreSQL restarted or crashed).
    pub(crate) fn server_failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Server failures seen so far.
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Connections waiting to be taken.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes handed-over connections nobody took in time; true when one was closed.
    fn expire(&self, all: bool) -> bool {
        let mut conns = self.lock();
        let before = conns.len();
        conns.retain(|(_, at)| !all && at.elapsed() < INCOMING_FOR);
        conns.len() < before
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Box<ServerConn>, Instant)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A core's part takes `lease` connections at most (its admission gate learns it from the
/// part's manager at the next request, or from [`Shards::tell_gates`]).
fn set_lease(pool: &Pool, lease: usize) {
    if !pool.is_closed() {
        pool.resize(lease);
    }
    pool.manager().lease.store(lease, Ordering::Relaxed);
}

/// The parts of a pool as its budget's occupant.
pub(crate) struct ShardsOccupant(pub(crate) Weak<Shards>);

impl Occupant for ShardsOccupant {
    fn idle(&self) -> usize {
        self.0.upgrade().map_or(0, |s| {
            s.pools.iter().map(|p| p.status().available).sum::<usize>() + s.pools[0].manager().incoming.len()
        })
    }

    /// Closes an idle connection, of a part holding more than its lease first.
    fn close_idle(&self) -> bool {
        let Some(shards) = self.0.upgrade() else {
            return false;
        };
        if shards.pools[0].manager().incoming.expire(true) {
            return true;
        }
        over_lease_first(&shards).any(|k| close_one(&shards.pools[k]))
    }

    fn resize(&self, share: usize) {
        if let Some(shards) = self.0.upgrade() {
            shards.reshare(share, None);
        }
    }

    /// Moves an idle connection (of a part holding more than its lease first) to the parts'
    /// hand-over queue, where the part waiting for a slot takes it (`ServerManager::create`);
    /// true also when one waits there already.
    fn hand_idle(&self) -> bool {
        let Some(shards) = self.0.upgrade() else {
            return false;
        };
        if shards.pools.len() < 2 {
            return false;
        }
        if shards.pools[0].manager().incoming.len() > 0 {
            // One was handed over already and waits for the part that takes it (closing it
            // to free its slot would make that part log a new one in).
            return true;
        }
        for k in over_lease_first(&shards) {
            let mut taken = false;
            let removed = shards.pools[k]
                .retain(|_, _| std::mem::replace(&mut taken, true))
                .removed;
            if let Some(conn) = removed.into_iter().next() {
                shards.pools[0].manager().incoming.put(conn);
                return true;
            }
        }
        false
    }
}

/// The parts, those holding more than their lease first (where an idle connection is taken
/// from, to close or to hand over).
fn over_lease_first(shards: &Shards) -> impl Iterator<Item = usize> {
    let leases = shards.leases();
    let over = |k: &usize| shards.pools[*k].status().size > leases[*k];
    let (first, rest): (Vec<usize>, Vec<usize>) = (0..shards.pools.len()).partition(over);
    first.into_iter().chain(rest)
}

fn close_one(pool: &Pool) -> bool {
    let mut closed = false;
    pool.retain(|_, _| {
        let keep = closed;
        closed = true;
        keep
    });
    closed
}

//! The fair queue for server connections: who gets the next free one.
//!
//! Part of admission, between a logged-in client and the pool. Each pool (database+user) is a
//! *gate* with `pool_size` grants. A client takes a grant before it checks a connection out
//! of the pool and gives it back after the connection is back. When a gate is full, clients
//! wait in one FIFO queue per identity (a *flow*); a freed grant goes to the waiting identity
//! that holds the fewest grants for its weight (ties: the one served longest ago, by virtual
//! time), so no identity gets more than its share while others wait, and any free grant is
//! used at once when only one identity waits (work-conserving). On top: `max_server_connections`
//! per identity (across gates), `min_server_connections` reserved per gate, `max_queue`, and
//! the `headroom` an identity holding connections long beyond its share must leave free
//! ([`super::headroom`]).
//!
//! One scheduler per core (see `admission::cores`), each holding that core's gates. Plain
//! data under its core's lock: no I/O, no await; waiters are told by oneshot
//! ([`Signal`]). A waiter has no timer of its own: [`Scheduler::sweep`], run by admission's
//! queue clock, sends the queued NOTICE and the timeout when they are due.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::headroom::Hold;
use super::limits::Headroom;
use super::names::{NameMap, Same};

/// The limits the scheduler needs for one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareLimits {
    /// Grants across gates (0 = no cap).
    pub(crate) max_servers: u32,
    /// Grants across every instance of the cluster (0 = no such cap): the identity holds at
    /// most as many here as the cluster granted this instance ([`Scheduler::set_grants`]).
    pub(crate) cluster_max: u32,
    /// Grants reserved in each gate the identity uses.
    pub(crate) min_servers: u32,
    /// Weight (≥ 1).
    pub(crate) weight: u32,
    /// Waiting clients across gates (0 = no bound).
    pub max_queue: u32,
    /// Sessions holding dangerous locks at which new grants stop (0 = no limit).
    pub max_lock_holders: u32,
    /// Free grants of a gate it leaves to others while it holds long beyond its share.
    pub headroom: Headroom,
    /// How long its clients wait in the queue.
    pub queue_timeout: Duration,
}

impl Default for ShareLimits {
    /// No caps, no reserve, weight 1, no headroom.
    fn default() -> Self {
        Self {
            max_servers: 0,
            cluster_max: 0,
            min_servers: 0,
            weight: 1,
            max_queue: 0,
            max_lock_holders: 0,
            headroom: Headroom::Connections(0),
            queue_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug)]
struct Share {
    limits: ShareLimits,
    servers: u32,
    waiting: u32,
    /// Sessions holding dangerous locks, as the lock monitor last saw.
    lock_holders: u32,
    /// Of the cluster-wide cap, what this instance may hold now (used when `cluster_max` > 0).
    grants: u32,
    /// With several cores: this core's part of the identity's caps (see `admission::cores`);
    /// `u32::MAX` when it has none or the proxy has one core.
    allow: u32,
    /// With several cores and a `max_queue`: the identity's clients waiting on every core.
    queue: Option<Arc<AtomicU32>>,
    /// Its grants held long in the other cores' gates, as mirrored (every pool's): while
    /// this and its own gate's are 0, the headroom rule cannot hold its transactions back.
    mirrored_long: u32,
}

impl Share {
    /// Whether a cap of its own keeps it from taking another grant.
    fn capped(&self) -> bool {
        let l = &self.limits;
        (l.max_servers > 0 && self.servers >= l.max_servers)
            || (l.cluster_max > 0 && self.servers >= self.grants)
            || self.servers >= self.allow
    }

    /// Whether `max_queue` keeps another client out of the queue: (full, waiting now).
    fn queue_full(&self) -> (bool, u32) {
        let waiting = self.queue.as_ref().map_or(self.waiting, |q| q.load(Ordering::Relaxed));
        let max = self.limits.max_queue;
        (max > 0 && waiting >= max, waiting)
    }

    /// A client of it joined the queue: true when the cross-core count counts it.
    fn enqueue(&mut self) -> bool {
        self.waiting += 1;
        match &self.queue {
            Some(q) if self.limits.max_queue > 0 => {
                q.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// `n` clients of it left the queue, `counted` of them in the cross-core count.
    fn dequeue(&mut self, n: u32, counted: u32) {
        self.waiting -= n;
        if let (Some(q), true) = (&self.queue, counted > 0) {
            q.fetch_sub(counted, Ordering::Relaxed);
        }
    }
}

/// What a waiting client is told.
#[derive(Debug)]
pub enum Signal {
    /// It holds a grant now (it has left the queue).
    Granted,
    /// It has waited its notice time and is still queued; what follows comes on this receiver.
    Notice(oneshot::Receiver<Signal>),
    /// It waited its timeout and has left the queue without a grant.
    TimedOut,
}

/// When a waiter is due for its NOTICE (None: never) and for its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// When to tell it that it is queued.
    pub notice: Option<Instant>,
    /// When it leaves the queue without a grant.
    pub deadline: Instant,
}

impl Due {
    /// The earlier of the two.
    pub fn next(&self) -> Instant {
        self.notice.map_or(self.deadline, |n| n.min(self.deadline))
    }
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    tx: oneshot::Sender<Signal>,
    since: Instant,
    due: Due,
    hold: Hold,
    /// Counted in its identity's cross-core queue count.
    counted: bool,
}

#[derive(Debug, Default)]
struct Flow {
    in_use: u32,
    /// Grants held for whole sessions, plus pinned sessions (see [`super::headroom`]).
    long: u32,
    waiting: VecDeque<Waiter>,
    /// Virtual time of this flow's next grant.
    pass: f64,
    /// In a mirror of another core's gate: its clients waiting there.
    remote_waiting: u32,
    /// Grants taken for a transaction that pins its session, not pinned yet (they will be
    /// held long: a core's lease keeps them).
    pinning: u32,
}

#[derive(Debug, Default)]
struct Gate {
    capacity: u32,
    in_use: u32,
    waiting: u32,
    vtime: f64,
    flows: NameMap<Flow>,
    /// Another core's gate of the same pool, as that core last told (see `admission::cores`):
    /// read for the whole pool's view, never granted from.
    mirror: bool,
}

/// What [`Scheduler::request`] decided.
#[derive(Debug)]
pub enum Request {
    /// A grant is held now.
    Granted,
    /// Queued: wait on the receiver; the id cancels.
    Queued(u64, oneshot::Receiver<Signal>),
    /// The identity already has `max_queue` clients waiting.
    QueueFull(u32),
}

/// A snapshot of one identity's share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShareStatus {
    /// Grants held across gates.
    pub servers: u32,
    /// Clients waiting across gates.
    pub waiting: u32,
}

/// All gates of one proxy.
#[derive(Debug, Default)]
pub struct Scheduler {
    gates: NameMap<Gate>,
    shares: NameMap<Share>,
    next_id: u64,
    /// A pool's gates, one per core (see [`pool_view`]), by each of their names.
    siblings: NameMap<Arc<[Arc<str>]>>,
    /// Cores each pool has a gate on.
    cores: usize,
    /// The mirrors are exact now (every core's state is locked while this one decides, see
    /// `admission::cores`): headroom decisions near the end of a pool may be taken.
    exact: bool,
    /// A waiter was judged on mirrors since the last exact look (see `cores_view`).
    deferred: std::cell::Cell<bool>,
    /// One of several cores' schedulers: a pool's other gates are other cores' (mirrored).
    split: bool,
    /// Some identity was given `min_server_connections`: a grant then leaves the reserves of
    /// a gate's other flows free (without any, no grant looks at the other flows).
    reserves: bool,
}

impl Scheduler {
    /// Asks for a grant in `gate` (created with `capacity`, which also updates a known gate),
    /// to be held as `hold` says; a client that has to wait is queued from and until what
    /// `when` says, told the identity's queue timeout: (now, due), asked only then (most
    /// grants come at once: no clock read).
    pub fn request(
        &mut self,
        gate: &Arc<str>,
        capacity: u32,
        id: &Arc<str>,
        hold: Hold,
        when: impl FnOnce(Duration) -> (Instant, Due),
    ) -> Request {
        // A core's gate (one of several of a pool) takes its capacity from the pool's lease
        // moves (set_capacity) once it exists: a request may carry a lease read before the
        // last move.
        let per_core = self.know(gate);
        if self.granted_at_once(gate, capacity, id, hold, per_core) {
            return Request::Granted;
        }
        if !self.shares.contains_key(&Same(id)) {
            // Normally set at login; a share is never missing for a caller with a grant.
            self.set_limits(id, ShareLimits::default());
        }
        let grew = match self.gates.get_mut(&Same(gate)) {
            Some(g) if !per_core => std::mem::replace(&mut g.capacity, capacity) < capacity,
            Some(_) => false,
            None => {
                let g = Gate {
                    capacity,
                    ..Gate::default()
                };
                self.gates.insert(gate.clone(), g);
                capacity > 0
            }
        };
        if grew {
            self.dispatch(gate);
        }
        if self.eligible(gate, id, hold) {
            self.grant(gate, id, hold);
            return Request::Granted;
        }
        let share = self.shares.get_mut(&Same(id)).expect("invariant: inserted above");
        if let (true, waiting) = share.queue_full() {
            return Request::QueueFull(waiting);
        }
        let counted = share.enqueue();
        self.next_id += 1;
        let (now, due) = when(share.limits.queue_timeout);
        let (tx, rx) = oneshot::channel();
        let g = self.gates.get_mut(&Same(gate)).expect("invariant: created above");
        g.waiting += 1;
        let vtime = g.vtime;
        let flow = g.flows.entry(id.clone()).or_default();
        if flow.waiting.is_empty() {
            // Newly backlogged: no credit for the time it did not wait.
            flow.pass = flow.pass.max(vtime);
        }
        flow.waiting.push_back(Waiter {
            ticket: self.next_id,
            tx,
            since: now,
            due,
            hold,
            counted,
        });
        Request::Queued(self.next_id, rx)
    }

    /// The usual request, granted with one look-up each of its gate, share and flow: a
    /// transaction in a known gate of unchanged capacity with a free grant, of an identity no
    /// cap holds back and holding nothing long in the pool, with no reserves anywhere (what
    /// [`Scheduler::eligible`] grants at once). False, with nothing changed, otherwise: the
    /// caller goes the long way.
    fn granted_at_once(&mut self, gate: &Arc<str>, capacity: u32, id: &Arc<str>, hold: Hold, per_core: bool) -> bool {
        if hold != Hold::Transaction || self.reserves || !(self.split || self.cores < 2) {
            return false;
        }
        let (Some(g), Some(s)) = (self.gates.get_mut(&Same(gate)), self.shares.get_mut(&Same(id))) else {
            return false;
        };
        if (!per_core && g.capacity != capacity)
            || g.in_use >= g.capacity
            || s.capped()
            || s.mirrored_long > 0
            || (s.limits.max_lock_holders > 0 && s.lock_holders >= s.limits.max_lock_holders)
        {
            return false;
        }
        let Gate {
            in_use, vtime, flows, ..
        } = g;
        let flow = match flows.get_mut(&Same(id)) {
            Some(f) if f.long > 0 => return false,
            Some(f) => f,
            None => flows.entry(id.clone()).or_default(),
        };
        count_grant((in_use, vtime), flow, Some(s), hold);
        true
    }

    /// Sets `gate`'s capacity (creating it); waiters get what a larger one frees.
    pub(crate) fn set_capacity(&mut self, gate: &Arc<str>, capacity: u32) {
        self.know(gate);
        let g = self.gates.entry(gate.clone()).or_default();
        let grew = capacity > g.capacity;
        g.capacity = capacity;
        if grew {
            self.dispatch(gate);
        }
    }

    /// Takes a waiter out of its queue. False when it is not there: it was granted meanwhile
    /// (the caller then holds a grant and must use or release it).
    pub fn cancel(&mut self, gate: &Arc<str>, id: &Arc<str>, ticket: u64) -> bool {
        let Some(g) = self.gates.get_mut(&Same(gate)) else {
            return false;
        };
        let Some(flow) = g.flows.get_mut(&Same(id)) else {
            return false;
        };
        let Some(pos) = flow.waiting.iter().position(|w| w.ticket == ticket) else {
            return false;
        };
        let w = flow.waiting.remove(pos).expect("invariant: found above");
        g.waiting -= 1;
        if let Some(s) = self.shares.get_mut(&Same(id)) {
            s.dequeue(1, u32::from(w.counted));
        }
        // One identity fewer waiting may raise the others' shares (headroom).
        self.dispatch(gate);
        true
    }

    /// A session of `id` holding a grant of `gate` pinned it: a long hold from now on.
    pub(crate) fn pin(&mut self, gate: &Arc<str>, id: &Arc<str>) {
        if let Some(f) = self.gates.get_mut(&Same(gate)).and_then(|g| g.flows.get_mut(&Same(id))) {
            f.long += 1;
            f.pinning = f.pinning.saturating_sub(1);
        }
    }

    /// A pinned session of `id` in `gate` ended (its grant is given back by then).
    pub(crate) fn unpin(&mut self, gate: &Arc<str>, id: &Arc<str>) {
        if let Some(f) = self.gates.get_mut(&Same(gate)).and_then(|g| g.flows.get_mut(&Same(id))) {
            f.long = f.long.saturating_sub(1);
        }
        self.dispatch(gate);
    }

    /// Gives back a grant taken for `hold` and hands it (or others it unblocks) to waiters.
    pub fn release(&mut self, gate: &Arc<str>, id: &Arc<str>, hold: Hold) {
        let at_cap = match self.shares.get_mut(&Same(id)) {
            Some(s) => {
                let was = s.capped();
                s.servers = s.servers.saturating_sub(1);
                was && s.waiting > 0
            }
            None => false,
        };
        let serve = match self.gates.get_mut(&Same(gate)) {
            Some(g) => {
                g.in_use = g.in_use.saturating_sub(1);
                if let Some(f) = g.flows.get_mut(&Same(id)) {
                    f.in_use = f.in_use.saturating_sub(1);
                    match hold {
                        Hold::Session => f.long = f.long.saturating_sub(1),
                        Hold::Pin => f.pinning = f.pinning.saturating_sub(1),
                        Hold::Transaction => {}
                    }
                }
                g.waiting > 0 && g.in_use < g.capacity
            }
            None => false,
        };
        if serve {
            self.dispatch(gate);
        }
        // The pool's other gates: the headroom rule looks at the whole pool, so what this
        // frees may let their waiters go.
        self.dispatch_siblings(gate);
        if at_cap {
            // The identity was held back by its own cap: its waiters in other gates may go.
            self.dispatch_waiting(id, Some(gate));
        }
    }

    /// Hands grants to `id`'s waiters in every gate where it waits (but `except`).
    fn dispatch_waiting(&mut self, id: &Arc<str>, except: Option<&Arc<str>>) {
        let gates: Vec<Arc<str>> = self
            .gates
            .iter()
            .filter(|(k, g)| Some(*k) != except && g.flows.get(&Same(id)).is_some_and(|f| !f.waiting.is_empty()))
            .map(|(k, _)| k.clone())
            .collect();
        for g in gates {
            self.dispatch(&g);
        }
    }

    fn eligible(&self, gate: &Arc<str>, id: &Arc<str>, hold: Hold) -> bool {
        let (Some(g), Some(s)) = (self.gates.get(&Same(gate)), self.shares.get(&Same(id))) else {
            return false;
        };
        if g.in_use >= g.capacity
            || s.capped()
            || (s.limits.max_lock_holders > 0 && s.lock_holders >= s.limits.max_lock_holders)
        {
            return false;
        }
        let free = g.capacity - g.in_use;
        let reserved: u32 = if self.reserves {
            g.flows
                .iter()
                .filter(|(k, _)| *k != id)
                .filter_map(|(k, f)| {
                    let min = self.shares.get(&Same(k))?.limits.min_servers;
                    Some(min.saturating_sub(f.in_use))
                })
                .sum()
        } else {
            0
        };
        if free <= reserved {
            return false;
        }
        if hold == Hold::Transaction && s.mirrored_long == 0 && (self.split || self.cores < 2) {
            // Nothing held long in the pool (its other gates are mirrors, counted in
            // `mirrored_long`): a transaction is not held back, and a free grant of this
            // gate is one of the pool's (see `Standing::may_take`, `decided_here`).
            if g.flows.get(&Same(id)).is_none_or(|f| f.long == 0) {
                return true;
            }
        }
        let st = self.standing(gate, id, s);
        let (may, here) = (st.may_take(hold), st.decided_here(hold));
        if !(may && here) && self.split && self.siblings.contains_key(&Same(gate)) {
            // Held back by what other cores hold, or judged on mirrors: the next exchange
            // looks again with every core locked (and the one after, while it waits).
            self.deferred.set(true);
        }
        may && here
    }

    /// When headroom alone keeps `id` waiting in `gate` for `hold`: (grants it holds there,
    /// the headroom in connections).
    pub(crate) fn held_back(&self, gate: &Arc<str>, id: &Arc<str>, hold: Hold) -> Option<(u32, u32)> {
        let s = self.shares.get(&Same(id))?;
        let st = self.standing(gate, id, s);
        st.held_back(hold).then_some((st.held, st.headroom))
    }

    fn grant(&mut self, gate: &Arc<str>, id: &Arc<str>, hold: Hold) {
        let s = self.shares.get_mut(&Same(id));
        let Gate {
            in_use, vtime, flows, ..
        } = self.gates.get_mut(&Same(gate)).expect("invariant: gate exists");
        // The identity's flow is there but for its first grant in this gate (no name clone).
        let flow = match flows.get_mut(&Same(id)) {
            Some(f) => f,
            None => flows.entry(id.clone()).or_default(),
        };
        count_grant((in_use, vtime), flow, s, hold);
    }

    /// The waiting flow that should be served next in `gate`, if any may be.
    fn pick(&self, gate: &Arc<str>, g: &Gate) -> Option<Arc<str>> {
        // A pool with one gate per core: an identity is judged by what it holds in the whole
        // pool, so one served less on one core is served first on the others.
        let pooled = self.siblings.contains_key(&Same(gate));
        let key = |id: &Arc<str>, f: &Flow| {
            let weight = self.shares.get(&Same(id)).map_or(1.0, |s| f64::from(s.limits.weight));
            let held = if pooled { self.gate_held(gate, id) } else { f.in_use };
            (f64::from(held) / weight, f.pass)
        };
        let mut may_go = g
            .flows
            .iter()
            .filter(|(id, f)| f.waiting.front().is_some_and(|w| self.eligible(gate, id, w.hold)));
        let first = may_go.next()?;
        let Some(second) = may_go.next() else {
            return Some(first.0.clone());
        };
        // Keys are worked out only when two or more may go (ties: the first seen).
        [first, second]
            .into_iter()
            .chain(may_go)
            .map(|(id, f)| (key(id, f), id))
            .min_by(|(a, _), (b, _)| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(_, id)| id.clone())
    }

    /// Hands free grants in `gate` to waiters, fairest first.
    pub(crate) fn dispatch(&mut self, gate: &Arc<str>) {
        loop {
            let Some(g) = self.gates.get(&Same(gate)) else { return };
            if g.waiting == 0 || g.in_use >= g.capacity {
                return;
            }
            let Some(id) = self.pick(gate, g) else { return };
            let mut s = self.shares.get_mut(&Same(&id));
            let g = self.gates.get_mut(&Same(gate)).expect("invariant: present");
            let Gate {
                in_use,
                vtime,
                flows,
                waiting,
                ..
            } = g;
            let flow = flows.get_mut(&Same(&id)).expect("invariant: picked");
            let w = flow.waiting.pop_front().expect("invariant: picked flows wait");
            *waiting -= 1;
            if let Some(s) = s.as_deref_mut() {
                s.dequeue(1, u32::from(w.counted));
            }
            count_grant((in_use, vtime), flow, s, w.hold);
            if w.tx.send(Signal::Granted).is_err() {
                // Unreachable while waiters cancel under the lock; never leak a grant.
                self.release(gate, &id, w.hold);
            }
        }
    }
}

/// Counts a grant held as `hold` in a gate (its grants in use and virtual time) to `flow`
/// (its identity's share `s`): the flow's next grant comes a weight's step later.
fn count_grant((in_use, vtime): (&mut u32, &mut f64), flow: &mut Flow, s: Option<&mut Share>, hold: Hold) {
    let weight = match s {
        Some(s) => {
            s.servers += 1;
            f64::from(s.limits.weight)
        }
        None => 1.0,
    };
    *in_use += 1;
    flow.in_use += 1;
    match hold {
        Hold::Session => flow.long += 1,
        Hold::Pin => flow.pinning += 1,
        Hold::Transaction => {}
    }
    flow.pass = flow.pass.max(*vtime);
    *vtime = flow.pass;
    flow.pass += 1.0 / weight;
}

#[path = "queue_pool.rs"]
mod pool_view;

#[path = "queue_told.rs"]
mod told;

#[path = "queue_cores.rs"]
mod cores_view;

#[path = "queue_sweep.rs"]
mod sweep;

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;

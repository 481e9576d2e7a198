//! Budgets of server connections: a server connection exists only while it holds a [`Slot`].
//!
//! Part of the server side, under the pools. One idea at every scale: a [`Budget`] has a size
//! and counts the slots held, and a slot of a budget with a parent holds a slot of the parent
//! too. Today there are two scales, a pool's `pool_size` (one budget per database and user,
//! [`Budgets::pool`]) under the proxy's `max_server_connections` ([`Budgets::server`]); a
//! core's share of the process and an instance's lease of the cluster are the same type one
//! level up. Slots are taken when a connection opens and given back when it closes (the slot
//! is dropped with the connection), never per transaction.
//!
//! Two kinds of takers:
//! - the pools' connections [`Budget::take`]: when the budget is full, its occupant (the pool)
//!   closes an idle connection to make room, else the taker waits for a slot, up to a bound;
//! - pgvalve's own connections (the lock monitor, auth_query look-ups, any later listener or
//!   coordination connection) [`Budget::claim`]. A claim goes first: while it waits, no pool
//!   connection takes a freed slot, the pool's share of its budget shrinks by one (it opens
//!   no connection past it), an idle connection is closed at once if there is one, and
//!   otherwise [`Slot::wanted`] tells the pools to close the next connection that comes back
//!   (at the end of a transaction in transaction mode, of a session in session mode) instead
//!   of keeping it. A [`Hold::Lasting`] claim (the lock monitor's, kept for the connection's
//!   life) is refused rather than take a budget's last slot, so pgvalve's own connections
//!   never take every slot from the clients.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use super::seat::{Seat, Seats};

/// How often a waiting taker tries again to make room (closing idle connections).
const RETRY: Duration = Duration::from_millis(100);

/// How long a taker of a leased budget (a cluster's) waits for the lease to grow before it
/// closes an idle connection of this instance to make room: the coordinator leases what its
/// instance waits for at its next round, and closing an idle connection to open another in
/// its place (the same pool's, or another core's part of it) is churn, a server login per
/// transaction while a pool grows.
const LEASE_GRACE: Duration = Duration::from_secs(1);

/// Which setting a budget enforces (named in errors and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// The proxy's `max_server_connections`.
    Server,
    /// A (database, user) pool's `pool_size`.
    Pool,
    /// This instance's lease of the cluster's `[cluster] max_server_connections`.
    Cluster,
}

impl Scale {
    /// The setting's name.
    pub fn setting(self) -> &'static str {
        match self {
            Scale::Server => "max_server_connections",
            Scale::Pool => "pool_size",
            Scale::Cluster => "cluster.max_server_connections",
        }
    }
}

/// Why no slot was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every slot stayed in use for as long as the taker could wait.
    #[error("all {max} server connections of {} are in use", .scale.setting())]
    Full {
        /// The budget.
        scale: Scale,
        /// Its size.
        max: u32,
    },
    /// A lasting claim would leave the clients no slot.
    #[error("{}={max} leaves no slot beside pgvalve's own lasting connections", .scale.setting())]
    Last {
        /// The budget.
        scale: Scale,
        /// Its size.
        max: u32,
    },
}

/// How long a claimed slot is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// For one short task (an auth_query look-up): may take the last slot.
    Brief,
    /// For the life of a long-lived connection (the lock monitor's): never the last slot.
    Lasting,
}

/// What holds a budget's slots besides pgvalve's own connections: a pool.
pub trait Occupant: Send + Sync {
    /// Idle connections it holds (slots it could give back at once).
    fn idle(&self) -> usize {
        0
    }
    /// Closes one idle connection; true when one was closed (its slot is free now).
    fn close_idle(&self) -> bool;
    /// Hands one idle connection, with its slot, to whichever taker of this budget takes
    /// handed-over connections (a pool's parts on other cores); true when one was handed.
    /// Tried at each round of a wait before anything is closed: a connection that moves
    /// spares PostgreSQL a close and a login. None by default.
    fn hand_idle(&self) -> bool {
        false
    }
    /// The occupant may hold `share` connections now (the budget less pgvalve's own).
    fn resize(&self, share: usize);
}

#[derive(Debug, Default)]
struct State {
    /// Slots in all (0 = unlimited).
    max: usize,
    /// Slots held.
    used: usize,
    /// Slots held or waited for by pgvalve's own connections.
    own: usize,
    /// Of those, lasting ones.
    lasting: usize,
    /// Claims waiting for a slot (they go before the pools).
    claims: usize,
    /// Of the slots held, those of connections closing (given back once PostgreSQL has
    /// closed them, see [`Slot::closing`]).
    closing: usize,
    /// A leased budget ([`Budget::leased`]): its size is what is leased now, 0 is none.
    leased: bool,
    /// Pool takers waiting for a slot now.
    waiting: usize,
    /// Slots asked back (a leased budget giving seats to other instances): no taker gets
    /// them, and connections close instead of going back to their pools meanwhile.
    give: usize,
}

impl State {
    fn limited(&self) -> bool {
        self.max > 0 || self.leased
    }

    /// Claims waiting that the free slots and those of closing connections cannot cover.
    fn short(&self) -> bool {
        self.limited() && (self.used + self.claims > self.max + self.closing || self.give > self.closing)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pool,
    Claim,
}

/// A counted number of server connections (see the module docs).
pub struct Budget {
    scale: Scale,
    parent: Option<Arc<Budget>>,
    state: Mutex<State>,
    freed: Notify,
    /// [`State::short`], read without the lock when a connection comes back.
    short: AtomicBool,
    occupant: Mutex<Option<Box<dyn Occupant>>>,
    children: Mutex<Vec<Weak<Budget>>>,
    /// For a leased budget: where each slot's seat is assigned.
    seats: Option<Arc<dyn Seats>>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("scale", &self.scale)
            .field("state", &*self.state())
            .finish_non_exhaustive()
    }
}

/// A budget's numbers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Its size (0 = unlimited).
    pub max: usize,
    /// Slots held.
    pub used: usize,
    /// Slots held or waited for by pgvalve's own connections.
    pub own: usize,
}

impl Budget {
    /// A budget of `max` slots (0 = unlimited) under `parent`.
    pub fn new(scale: Scale, max: usize, parent: Option<Arc<Budget>>) -> Arc<Self> {
        let b = Arc::new(Budget {
            scale,
            parent: parent.clone(),
            state: Mutex::new(State {
                max,
                ..State::default()
            }),
            freed: Notify::new(),
            short: AtomicBool::new(false),
            occupant: Mutex::new(None),
            children: Mutex::new(Vec::new()),
            seats: None,
        });
        if let Some(p) = parent {
            let mut children = lock(&p.children);
            children.retain(|c| c.strong_count() > 0);
            children.push(Arc::downgrade(&b));
        }
        b
    }

    /// A root budget of `scale` whose size is what `seats` has leased (0 at first: full),
    /// grown and shrunk by [`Budget::grow`] and [`Budget::try_shrink`]; each slot taken holds
    /// one seat of `seats`. A lasting claim is never refused by it (its size follows demand).
    pub fn leased(scale: Scale, seats: Arc<dyn Seats>) -> Arc<Self> {
        Budget::root(scale, Some(seats))
    }

    /// A root budget whose size is what it is given, one slot at a time (0 at first: full).
    pub(crate) fn root(scale: Scale, seats: Option<Arc<dyn Seats>>) -> Arc<Self> {
        Arc::new(Budget {
            scale,
            parent: None,
            state: Mutex::new(State {
                leased: true,
                ..State::default()
            }),
            freed: Notify::new(),
            short: AtomicBool::new(false),
            occupant: Mutex::new(None),
            children: Mutex::new(Vec::new()),
            seats,
        })
    }

    /// One more slot (a leased budget: a seat was leased).
    pub fn grow(&self) {
        let max = self.state().max + 1;
        self.resize(max);
    }

    /// One slot less if one is free (a leased budget giving a seat back); false when every
    /// slot is held.
    pub fn try_shrink(&self) -> bool {
        {
            let mut st = self.state();
            if st.max == 0 || st.used >= st.max {
                return false;
            }
            st.max -= 1;
            st.give = st.give.saturating_sub(1);
            self.short.store(st.short(), Ordering::Relaxed);
        }
        self.tell_share();
        true
    }

    /// Asks `n` slots back (a leased budget): no taker gets them and the connections holding
    /// them close as they come back to their pools, until [`Budget::try_shrink`] took them.
    pub fn ask_back(&self, n: usize) {
        let mut st = self.state();
        st.give = n;
        self.short.store(st.short(), Ordering::Relaxed);
    }

    /// What waits for this budget now: pool takers and claims.
    pub fn waiting(&self) -> usize {
        let st = self.state();
        st.waiting + st.claims
    }

    /// Idle connections holding slots of this budget (its occupant's and those under it).
    pub fn idle(&self) -> usize {
        let own = lock(&self.occupant).as_ref().map_or(0, |o| o.idle());
        let children: Vec<Arc<Budget>> = lock(&self.children).iter().filter_map(Weak::upgrade).collect();
        own + children.iter().map(|c| c.idle()).sum::<usize>()
    }

    /// Closes one idle connection holding a slot of this budget (or of one under it); true
    /// when one was closed.
    pub fn close_idle(&self) -> bool {
        self.make_room()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Its numbers now.
    pub fn usage(&self) -> Usage {
        let st = self.state();
        Usage {
            max: st.max,
            used: st.used,
            own: st.own,
        }
    }

    /// The most connections the occupant may hold: the size less pgvalve's own, at least 1
    /// (a pool of size 0 would hang its clients; [`Budget::take`] still keeps the cap).
    pub fn share(&self) -> usize {
        let st = self.state();
        if st.limited() {
            st.max.saturating_sub(st.own).max(1)
        } else {
            usize::MAX
        }
    }

    /// Sets the occupant (a pool; the last one set replaces any other) and tells it its share.
    pub fn occupy(&self, occupant: Box<dyn Occupant>) {
        let mut o = lock(&self.occupant);
        occupant.resize(self.share());
        *o = Some(occupant);
    }

    /// A new size (a reload); the occupant is told its new share.
    pub fn resize(&self, max: usize) {
        {
            let mut st = self.state();
            st.max = max;
            self.short.store(st.short(), Ordering::Relaxed);
        }
        self.freed.notify_waiters();
        self.tell_share();
    }

    fn tell_share(&self) {
        // Under the occupant's lock, read fresh: concurrent changes apply in order.
        let occupant = lock(&self.occupant);
        if let Some(o) = occupant.as_ref() {
            o.resize(self.share());
        }
    }

    /// The chain of budgets a slot of this one holds: this one first, the root last.
    fn chain(self: &Arc<Self>) -> Vec<Arc<Budget>> {
        let mut chain = vec![self.clone()];
        while let Some(p) = chain.last().and_then(|b| b.parent.clone()) {
            chain.push(p);
        }
        chain
    }

    /// A slot for a pool connection, waiting up to `wait` (closing idle connections of the
    /// pools under a full budget meanwhile).
    ///
    /// # Errors
    /// [`Refused::Full`] naming the budget that stayed full.
    pub async fn take(self: &Arc<Self>, wait: Duration) -> Result<Slot, Refused> {
        let deadline = Instant::now() + wait;
        let mut held: Option<Slot> = None;
        for b in self.chain().into_iter().rev() {
            b.wait_for(Kind::Pool, Some(deadline), Some(self)).await?;
            let seat = b.seat(None)?;
            held = Some(Slot {
                parent: held.map(Box::new),
                budget: b,
                own: None,
                closing: false,
                seat,
            });
        }
        Ok(held.expect("invariant: a chain has at least one budget"))
    }

    /// A slot for one of pgvalve's own connections, before any pool connection waiting (see
    /// the module docs), waiting up to `wait` (None: until the future is dropped).
    ///
    /// # Errors
    /// [`Refused::Last`] for a lasting claim on a budget it would leave no slot in;
    /// [`Refused::Full`] when `wait` ran out.
    pub async fn claim(self: &Arc<Self>, hold: Hold, wait: Option<Duration>) -> Result<Slot, Refused> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut claim = Claim::register(self.chain(), hold)?;
        let mut held: Option<Slot> = None;
        // Root first. Dropped while waiting: the claim is withdrawn where still pending.
        while let Some(b) = claim.pending.last().cloned() {
            b.wait_for(Kind::Claim, deadline, None).await?;
            claim.pending.pop();
            let seat = b.seat(Some(hold))?;
            held = Some(Slot {
                parent: held.map(Box::new),
                budget: b,
                own: Some(hold),
                closing: false,
                seat,
            });
        }
        Ok(held.expect("invariant: a chain has at least one budget"))
    }

    /// Whether a [`Hold::Lasting`] claim would be refused now (it would take the last slot of
    /// this budget or of one above it).
    ///
    /// # Errors
    /// [`Refused::Last`] naming the budget.
    pub fn lasting_room(self: &Arc<Self>) -> Result<(), Refused> {
        for b in self.chain() {
            let st = b.state();
            if st.limited() && !st.leased && st.lasting + 1 >= st.max {
                drop(st);
                return Err(b.refused(true));
            }
        }
        Ok(())
    }

    /// The seat of a slot just counted held (None when this budget is not leased); with no
    /// seat to be had (never, while a leased budget's size is the seats leased) the slot is
    /// given back and the taker refused.
    fn seat(&self, own: Option<Hold>) -> Result<Option<Seat>, Refused> {
        let Some(seats) = &self.seats else {
            return Ok(None);
        };
        match seats.assign() {
            Some(s) => Ok(Some(s)),
            None => {
                tracing::warn!(
                    budget = self.scale.setting(),
                    "no seat for a slot counted held; refused"
                );
                self.give_back(own, false);
                Err(self.refused(false))
            }
        }
    }

    /// Waits for a slot of this budget alone and counts it held (a pool taker of `leaf` may be
    /// handed an idle connection instead, see [`Occupant::hand_idle`]).
    async fn wait_for(&self, kind: Kind, deadline: Option<Instant>, leaf: Option<&Budget>) -> Result<(), Refused> {
        let _waiting = (kind == Kind::Pool).then(|| Waiting::new(self));
        // A pool taker (of `leaf`, the pool's budget) may get an idle connection of the same
        // pool handed over instead, whichever budget of its chain is full: asked each round
        // before anything is closed (a connection that moves spares PostgreSQL a close and a
        // login; one is closed only when the pool has none idle to hand over).
        let grace = Instant::now()
            + if self.seats.is_some() {
                LEASE_GRACE
            } else {
                Duration::ZERO
            };
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_take(kind) {
                Some(true) => return Ok(()),
                // Full with nothing closing: close an idle connection; its slot comes back
                // once PostgreSQL has closed it (the wait below is woken then).
                None => {
                    let handed = leaf.is_some_and(|l| lock(&l.occupant).as_ref().is_some_and(|o| o.hand_idle()));
                    if !handed && self.state().closing == 0 && Instant::now() >= grace {
                        self.make_room();
                    }
                }
                Some(false) => {}
            }
            let step = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(self.refused(false));
                    }
                    left.min(RETRY)
                }
                None => RETRY,
            };
            let _ = tokio::time::timeout(step, freed).await;
        }
    }

    /// Some(true): taken; Some(false): a slot is free but a claim goes first; None: full.
    fn try_take(&self, kind: Kind) -> Option<bool> {
        let mut st = self.state();
        if st.limited() && st.used + st.give >= st.max {
            return None;
        }
        if kind == Kind::Pool && st.limited() && st.used + st.claims >= st.max {
            return Some(false);
        }
        st.used += 1;
        if kind == Kind::Claim {
            st.claims -= 1;
        }
        self.short.store(st.short(), Ordering::Relaxed);
        Some(true)
    }

    fn refused(&self, last: bool) -> Refused {
        let max = u32::try_from(self.state().max).unwrap_or(u32::MAX);
        let scale = self.scale;
        if last {
            Refused::Last { scale, max }
        } else {
            Refused::Full { scale, max }
        }
    }

    /// Closes one idle connection holding a slot of this budget (its occupant's, else one of
    /// a budget under it); true when one was closed.
    fn make_room(&self) -> bool {
        if lock(&self.occupant).as_ref().is_some_and(|o| o.close_idle()) {
            tracing::debug!(
                budget = self.scale.setting(),
                "closed an idle server connection to free a slot"
            );
            return true;
        }
        let children: Vec<Arc<Budget>> = lock(&self.children).iter().filter_map(Weak::upgrade).collect();
        children.iter().any(|c| c.make_room())
    }

    fn give_back(&self, own: Option<Hold>, closing: bool) {
        {
            let mut st = self.state();
            st.used -= 1;
            st.closing -= usize::from(closing);
            if let Some(hold) = own {
                st.own -= 1;
                st.lasting -= usize::from(hold == Hold::Lasting);
            }
            self.short.store(st.short(), Ordering::Relaxed);
        }
        self.freed.notify_waiters();
        if own.is_some() {
            self.tell_share();
        }
    }
}

/// A pool taker counted in [`Budget::waiting`] while it waits.
struct Waiting<'a>(&'a Budget);

impl<'a> Waiting<'a> {
    fn new(b: &'a Budget) -> Self {
        b.state().waiting += 1;
        Waiting(b)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state().waiting -= 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// A held slot, and a claim waiting for one.
#[path = "budget_slot.rs"]
mod slot;
use slot::Claim;
pub use slot::Slot;

// Every budget of one proxy.
#[path = "budget_set.rs"]
mod set;
pub use set::Budgets;

// Lending slots to a takeover's successor.
#[path = "budget_lend.rs"]
mod lend;

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;

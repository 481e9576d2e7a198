//! This instance's seats: the slot numbers its coordination connection leases, and which of
//! them a connection sits on.
//!
//! Part of the cluster coordination, under the pools: the instance's leased budget asks it
//! for a seat whenever a slot is taken (`server::seat`), the coordinator changes what is
//! leased. Lock order: a budget's lock is never held while this one is taken by the
//! coordinator, and the coordinator never holds this one while calling into the budget.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::server::budget::{Seat, Seats};

#[derive(Debug, Default)]
struct State {
    /// Backend pid of the coordination connection holding the leases (0: none).
    holder: i32,
    /// Slot numbers leased now.
    leased: BTreeSet<i32>,
    /// Slot numbers a connection sits on (leased, or left from a lost lease).
    assigned: BTreeSet<i32>,
}

/// The seats of one instance.
#[derive(Debug)]
pub struct Table {
    class: i32,
    me: Weak<Table>,
    state: Mutex<State>,
}

impl Table {
    /// The seats of a cluster whose locks are of `class`.
    pub fn new(class: i32) -> Arc<Table> {
        Arc::new_cyclic(|me| Table {
            class,
            me: me.clone(),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new coordination connection (backend `pid`) holds the leases from now on.
    pub fn hold(&self, pid: i32) {
        let mut st = self.state();
        st.holder = pid;
        st.leased.clear();
    }

    /// The coordination connection is lost: every lease with it. Connections sitting on
    /// slots keep them (their own markers keep the slots taken) until they close.
    pub fn lose(&self) {
        let mut st = self.state();
        st.holder = 0;
        st.leased.clear();
    }

    /// Slot `index` is leased now.
    pub fn lease(&self, index: i32) {
        self.state().leased.insert(index);
    }

    /// Gives back the lease of one slot no connection sits on, returning its number.
    pub fn unlease_one(&self) -> Option<i32> {
        let mut st = self.state();
        let free = st.leased.iter().rev().copied().find(|i| !st.assigned.contains(i))?;
        st.leased.remove(&free);
        Some(free)
    }

    /// Seats a connection of this instance sits on with no lease of this instance (left from
    /// a lost coordination connection): the new one leases them again (see `lease::adopt`).
    pub fn unleased_sat(&self) -> Vec<i32> {
        let st = self.state();
        st.assigned.difference(&st.leased).copied().collect()
    }

    /// Slots leased now.
    pub fn leased(&self) -> usize {
        self.state().leased.len()
    }
}

impl Seats for Table {
    fn assign(&self) -> Option<Seat> {
        let owner: Arc<dyn Seats> = self.me.upgrade()?;
        let mut st = self.state();
        let index = st.leased.iter().copied().find(|i| !st.assigned.contains(i))?;
        st.assigned.insert(index);
        Some(Seat {
            class: self.class,
            index,
            holder: st.holder,
            owner,
        })
    }

    fn unassign(&self, index: i32) {
        self.state().assigned.remove(&index);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::server::budget::{Budget, Scale};

    const SHORT: Duration = Duration::from_millis(20);

    fn leased() -> (Arc<Table>, Arc<Budget>) {
        let t = Table::new(7);
        let b = Budget::leased(Scale::Cluster, t.clone());
        (t, b)
    }

    #[tokio::test]
    async fn a_lease_hands_out_one_distinct_seat_per_slot_and_no_more() {
        let (t, b) = leased();
        assert!(b.take(SHORT).await.is_err(), "nothing leased: full, not unlimited");
        t.hold(4242);
        for i in [3, 5] {
            t.lease(i);
            b.grow();
        }
        let s1 = b.take(SHORT).await.unwrap();
        let s2 = b.take(SHORT).await.unwrap();
        let seats = [s1.seat().unwrap(), s2.seat().unwrap()];
        assert_ne!(seats[0].index, seats[1].index);
        assert!(seats
            .iter()
            .all(|s| s.holder == 4242 && s.class == 7 && [3, 5].contains(&s.index)));
        assert!(b.take(SHORT).await.is_err(), "two seats, two slots");
        assert!(!b.try_shrink(), "every slot held: no seat can be given back");
        let freed = s1.seat().unwrap().index;
        drop(s1);
        assert!(b.try_shrink());
        assert_eq!(t.unlease_one(), Some(freed), "the seat no connection sits on");
        assert_eq!((t.leased(), b.usage().max), (1, 1));
        drop(s2);
    }

    #[tokio::test]
    async fn a_lost_lease_admits_nobody_and_live_slots_keep_their_seats() {
        let (t, b) = leased();
        t.hold(1);
        t.lease(0);
        b.grow();
        let s = b.take(SHORT).await.unwrap();
        b.resize(0);
        t.lose();
        assert!(b.take(SHORT).await.is_err());
        assert_eq!(s.seat().unwrap().index, 0, "the connection keeps its seat");
        t.hold(2);
        t.lease(0);
        b.grow();
        assert!(b.take(SHORT).await.is_err(), "seat 0 is still sat on: no second seat");
        drop(s);
        let again = b.take(SHORT).await.unwrap();
        assert_eq!(again.seat().unwrap().holder, 2);
    }

    #[tokio::test]
    async fn slots_asked_back_are_wanted_and_not_handed_out() {
        let (t, b) = leased();
        t.hold(1);
        for i in 0..2 {
            t.lease(i);
            b.grow();
        }
        let s = b.take(SHORT).await.unwrap();
        b.ask_back(1);
        assert!(s.wanted(), "its connection closes when it comes back");
        assert!(b.take(SHORT).await.is_err(), "the free slot is asked back too");
        b.ask_back(0);
        assert!(!s.wanted());
        assert_eq!(b.waiting(), 0);
    }
}

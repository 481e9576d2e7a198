//! A held slot of a [`Budget`] (and of each budget above it): the proof that a server
//! connection may exist, given back when dropped with the connection; and the claim one of
//! pgvalve's own connections registers while it waits for one.
//!
//! Part of `server::budget`; taken by [`Budget::take`] and [`Budget::claim`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Budget, Hold, Refused, Seat};

/// One slot of a budget and of each budget above it, given back when dropped.
pub struct Slot {
    pub(super) budget: Arc<Budget>,
    /// Some for pgvalve's own connections.
    pub(super) own: Option<Hold>,
    /// Its connection is closing.
    pub(super) closing: bool,
    /// Dropped after this budget's slot is given back.
    pub(super) parent: Option<Box<Slot>>,
    /// A leased budget's seat, given back before the slot.
    pub(super) seat: Option<Seat>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("scale", &self.budget.scale)
            .field("own", &self.own)
            .field("parent", &self.parent)
            .finish()
    }
}

impl Slot {
    /// The seat of the leased budget at the root of this slot's chain, if there is one.
    pub fn seat(&self) -> Option<&Seat> {
        self.seat
            .as_ref()
            .or_else(|| self.parent.as_ref().and_then(|p| p.seat()))
    }

    /// A claim waits on one of this slot's budgets that no free slot can serve: a pool
    /// connection holding this slot should close instead of going back to its pool.
    pub fn wanted(&self) -> bool {
        self.budget.short.load(Ordering::Relaxed) || self.parent.as_ref().is_some_and(|p| p.wanted())
    }

    /// Its connection is closing: the slot will be free soon, so no other connection is
    /// closed to make room meanwhile, nor asked back for a claim it covers.
    pub fn closing(&mut self) {
        if !self.closing {
            self.closing = true;
            let mut st = self.budget.state();
            st.closing += 1;
            self.budget.short.store(st.short(), Ordering::Relaxed);
        }
        if let Some(p) = self.parent.as_mut() {
            p.closing();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.seat.take());
        self.budget.give_back(self.own, self.closing);
    }
}

/// A claim registered on every budget of a chain, withdrawn from those still pending when
/// dropped.
pub(super) struct Claim {
    /// Budgets not yet taken, the root last (taken first).
    pub(super) pending: Vec<Arc<Budget>>,
    hold: Hold,
}

impl Claim {
    pub(super) fn register(chain: Vec<Arc<Budget>>, hold: Hold) -> Result<Claim, Refused> {
        let lasting = usize::from(hold == Hold::Lasting);
        for (i, b) in chain.iter().enumerate() {
            let mut st = b.state();
            if lasting > 0 && st.limited() && !st.leased && st.lasting + 1 >= st.max {
                drop(st);
                let refused = b.refused(true);
                // Withdraw from the budgets registered so far.
                drop(Claim {
                    pending: chain[..i].to_vec(),
                    hold,
                });
                return Err(refused);
            }
            st.own += 1;
            st.lasting += lasting;
            st.claims += 1;
            b.short.store(st.short(), Ordering::Relaxed);
        }
        // The pools' shares shrink: they open no connection into the slot claimed.
        for b in &chain {
            b.tell_share();
        }
        Ok(Claim { pending: chain, hold })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        for b in self.pending.drain(..) {
            {
                let mut st = b.state();
                st.own -= 1;
                st.lasting -= usize::from(self.hold == Hold::Lasting);
                st.claims -= 1;
                b.short.store(st.short(), Ordering::Relaxed);
            }
            // Pool takers held back by the claim may go.
            b.freed.notify_waiters();
            b.tell_share();
        }
    }
}

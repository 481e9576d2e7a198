//! Headroom: the last free server connections of a pool are kept for identities holding less
//! than their share, so an identity that holds connections for whole sessions cannot lock the
//! others out.
//!
//! Part of admission, consulted by the fair queue ([`super::queue`]) for every grant. In
//! session mode a server connection is held for the client's whole session and cannot be
//! taken back, and in transaction mode a pinned session holds its connection the same way;
//! so the protection is in how connections are handed out: a grant that would take one of
//! the last `headroom` free connections of a pool goes only to an identity whose long holds
//! there are below its share. The share is the pool divided among the identities holding or
//! waiting for its connections, by weight, and never among fewer than two: an identity alone
//! keeps `headroom` free for whoever comes next. An identity holding nothing always may take
//! a free connection. Transaction-mode grants of an identity with no pinned session are not
//! long holds and are never held back (they come back at the end of each transaction).

use std::sync::Arc;

use super::cores::Core;
use super::{Admission, Member};

/// How long the connection asked for will be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// For a whole client session (session mode).
    Session,
    /// For one transaction (transaction mode), unless the session pins it.
    Transaction,
    /// For a transaction whose first statement pins the session (seen before the grant is
    /// asked for): judged as a long hold at once; it counts as one from the pin on.
    Pin,
}

/// What the rule looks at for one identity in one pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Standing {
    /// Connections of the pool in use (by everyone).
    pub(crate) in_use: u32,
    /// The pool's size.
    pub(crate) capacity: u32,
    /// The identity's grants in the pool.
    pub(crate) held: u32,
    /// Of them, held for whole sessions (session mode) or by pinned sessions.
    pub(crate) long: u32,
    /// The identity's weight.
    pub(crate) weight: u32,
    /// Total weight of the other identities holding or waiting in the pool.
    pub(crate) others: u64,
    /// The identity's headroom in this pool, in connections.
    pub(crate) headroom: u32,
    /// With the pool's other gates on other cores (mirrored, a few milliseconds old): the
    /// free connections of this core's own gates. None: every gate is counted exactly.
    pub(crate) own_free: Option<u32>,
}

impl Standing {
    /// The identity's share of the pool: its weight's part of the pool, counting at least one
    /// other identity of weight 1 beside it.
    pub(crate) fn share(&self) -> f64 {
        let w = f64::from(self.weight.max(1));
        f64::from(self.capacity) * w / (w + self.others.max(1) as f64)
    }

    /// What it holds long: every grant once any of them is long (in transaction mode a
    /// session pins during a transaction, after its grant, so an identity that pins is judged
    /// by all its transactions in flight), or when asking for a long hold itself.
    fn long_held(&self, hold: Hold) -> u32 {
        if self.long > 0 || hold != Hold::Transaction {
            self.held
        } else {
            0
        }
    }

    /// True when one of the free connections may go to it for `hold`: more than `headroom`
    /// are free, or it holds nothing long or less than its share.
    pub(crate) fn may_take(&self, hold: Hold) -> bool {
        let free = self.capacity.saturating_sub(self.in_use);
        if free == 0 {
            return false;
        }
        if free > self.headroom {
            return true;
        }
        let held = self.long_held(hold);
        held == 0 || f64::from(held) < self.share()
    }

    /// Whether a grant [`Self::may_take`] allows can be given on this core's counts alone:
    /// the mirrors of other cores' gates may be a few milliseconds old, so near the end of
    /// the pool a long hold of an identity holding long is decided only when every core's
    /// state is locked (`admission::cores`, at most a lease period later). Away from the
    /// end (more free here than the whole headroom), or for an identity holding nothing
    /// long, the answer does not depend on the other cores.
    pub(crate) fn decided_here(&self, hold: Hold) -> bool {
        match self.own_free {
            None => true,
            Some(free) => free > self.headroom || self.long_held(hold) == 0,
        }
    }

    /// True when headroom is what keeps it waiting for `hold`: connections are free, but it
    /// holds more than its share and none but the last `headroom` are left.
    pub(crate) fn held_back(&self, hold: Hold) -> bool {
        self.in_use < self.capacity && !self.may_take(hold)
    }
}

/// A transaction-mode session's word to admission that it pinned its server connection: from
/// [`Pinning::pinned`] until this is dropped (when the session ends, after its grant is given
/// back) the identity holds that connection long.
#[derive(Debug)]
pub struct Pinning {
    core: Arc<Core>,
    pool: Arc<str>,
    identity: Arc<str>,
    pinned: bool,
}

impl Admission {
    /// The pin notice of `member`'s session in `pool`, a gate of core `core` (nothing pinned
    /// yet).
    pub fn pinning(&self, member: &Member, (pool, core): (&Arc<str>, usize)) -> Pinning {
        let core = self.core(core);
        Pinning {
            core: core.clone(),
            pool: pool.clone(),
            identity: member.name_on(core).clone(),
            pinned: false,
        }
    }
}

impl Pinning {
    /// The session pinned its server connection (it holds a grant now); once per session.
    pub fn pinned(&mut self) {
        if !std::mem::replace(&mut self.pinned, true) {
            self.core.lock().sched.pin(&self.pool, &self.identity);
        }
    }
}

impl Drop for Pinning {
    fn drop(&mut self) {
        if self.pinned {
            self.core.lock().sched.unpin(&self.pool, &self.identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(in_use: u32, held: u32, long: u32, others: u64) -> Standing {
        Standing {
            in_use,
            capacity: 40,
            held,
            long,
            weight: 1,
            others,
            headroom: 4,
            own_free: None,
        }
    }

    #[test]
    fn an_identity_alone_leaves_the_headroom_free() {
        assert!(standing(35, 35, 35, 0).may_take(Hold::Session), "5 free");
        assert!(!standing(36, 36, 36, 0).may_take(Hold::Session), "4 free: kept");
        assert!(standing(36, 36, 36, 0).held_back(Hold::Session));
        assert!(!standing(40, 40, 40, 0).held_back(Hold::Session), "full: not headroom");
    }

    #[test]
    fn the_headroom_goes_to_identities_below_their_share() {
        // Greedy holds 36 for whole sessions; polite arrives (others = greedy's weight 1).
        assert!(standing(36, 0, 0, 1).may_take(Hold::Session), "a newcomer");
        assert!(standing(39, 3, 3, 1).may_take(Hold::Session), "3 < 20");
        assert!(!standing(39, 36, 36, 1).may_take(Hold::Session), "greedy: 36 > 20");
        assert!(!standing(40, 20, 20, 1).may_take(Hold::Session), "full");
        assert!(!standing(36, 20, 20, 1).may_take(Hold::Session), "at its share");
        assert!(standing(36, 13, 13, 2).may_take(Hold::Session), "13 < 40/3");
        assert!(!standing(36, 14, 14, 2).may_take(Hold::Session), "14 > 40/3");
    }

    #[test]
    fn transactions_are_held_back_only_for_identities_that_pin() {
        assert!(
            standing(39, 39, 0, 0).may_take(Hold::Transaction),
            "no pins: never held back"
        );
        assert!(!standing(39, 39, 0, 0).may_take(Hold::Pin), "one that will pin is");
        assert!(
            !standing(39, 30, 1, 0).may_take(Hold::Transaction),
            "pins: judged by all it holds"
        );
        assert!(standing(39, 19, 1, 0).may_take(Hold::Transaction), "below its share");
    }

    #[test]
    fn weight_and_zero_headroom() {
        let mut s = standing(38, 25, 25, 1);
        assert!(!s.may_take(Hold::Session));
        s.weight = 3;
        assert!(s.may_take(Hold::Session), "share 30 of 40");
        s.headroom = 0;
        s.weight = 1;
        assert!(s.may_take(Hold::Session), "headroom 0: off");
        assert!(!standing(40, 0, 0, 0).may_take(Hold::Session), "nothing free");
    }
}

//! Budgets lent between two processes during a takeover (see `takeover`): the predecessor
//! gives away its free slots ([`Budget::lend_free`]) and the successor's root budget grows by
//! as many ([`Budget::lent`], [`Budget::grow`]), so both together never hold more server
//! connections than the predecessor's budget allowed.
//!
//! Part of the server side's budgets (a child module of `budget`, for its private state).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Budget, Scale};

impl Budget {
    /// A root budget of `scale` whose slots are lent one by one by another process (a
    /// takeover's predecessor, see `takeover`): 0 at first (full), one more per
    /// [`Budget::grow`], unlimited after [`Budget::unlimit`]. No seats.
    pub fn lent(scale: Scale) -> Arc<Self> {
        Budget::root(scale, None)
    }

    /// No limit any more (a lent budget whose lender is gone: the budgets under it keep
    /// the configured caps).
    pub fn unlimit(&self) {
        {
            let mut st = self.state();
            st.leased = false;
            st.max = 0;
            self.short.store(st.short(), Ordering::Relaxed);
        }
        self.freed.notify_waiters();
        self.tell_share();
    }

    /// Gives away the slots nobody holds or waits for, keeping at least `keep` (a takeover's
    /// predecessor lending them to its successor): the size shrinks by what it returns, in
    /// one step under the budget's lock, so no taker can take a slot counted as given. 0 for
    /// an unlimited budget.
    pub fn lend_free(&self, keep: usize) -> usize {
        let n = {
            let mut st = self.state();
            if !st.limited() {
                return 0;
            }
            let held = (st.used + st.claims + st.give).max(keep);
            let n = st.max.saturating_sub(held);
            st.max -= n;
            self.short.store(st.short(), Ordering::Relaxed);
            n
        };
        if n > 0 {
            self.tell_share();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SHORT: Duration = Duration::from_millis(30);

    #[tokio::test]
    async fn the_lender_gives_only_free_slots_and_keeps_what_it_must() {
        let b = Budget::new(Scale::Server, 5, None);
        let held = b.take(SHORT).await.unwrap();
        let _held2 = b.take(SHORT).await.unwrap();
        // 3 free, at least 3 kept: 2 lent.
        assert_eq!(b.lend_free(3), 2);
        assert_eq!(b.usage().max, 3);
        // At least 1 kept: the last free slot is lent, and no taker gets one here any more.
        assert_eq!(b.lend_free(1), 1);
        assert_eq!(b.usage().max, 2);
        assert!(b.take(SHORT).await.is_err());
        // A slot freed here can be lent next, but never the last one.
        drop(held);
        assert_eq!(b.lend_free(1), 1);
        assert_eq!(b.lend_free(1), 0, "one slot is still held: it counts as the one kept");
        assert_eq!(b.usage().max, 1);
        assert_eq!(
            Budget::new(Scale::Server, 0, None).lend_free(1),
            0,
            "unlimited: nothing to lend"
        );
    }

    #[tokio::test]
    async fn a_lent_budget_grows_by_what_is_lent_then_is_unlimited() {
        let root = Budget::lent(Scale::Server);
        let server = Budget::new(Scale::Server, 10, Some(root.clone()));
        assert!(server.take(SHORT).await.is_err(), "nothing lent yet");
        root.grow();
        let one = server.take(SHORT).await.unwrap();
        assert!(server.take(SHORT).await.is_err(), "one lent, one held");
        root.unlimit();
        let more: Vec<super::super::Slot> = futures_util::future::join_all((0..9).map(|_| server.take(SHORT)))
            .await
            .into_iter()
            .map(|s| s.unwrap())
            .collect();
        assert_eq!(server.usage().used, 10, "the configured cap alone applies");
        assert!(server.take(SHORT).await.is_err());
        drop((one, more));
    }
}

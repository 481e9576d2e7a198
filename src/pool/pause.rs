//! PAUSE and RESUME from the admin console: databases whose clients get no server
//! connection until resumed.
//!
//! Part of the pool step: a client session waits here, before admission, for its database to
//! be resumed (it holds no grant and no server connection meanwhile). `PAUSE` marks a
//! database (or all, `"*"`) paused and then waits until none of its server connections is in
//! use; `RESUME` lets the waiting clients go.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Paused databases of one proxy.
#[derive(Debug)]
pub(crate) struct Pauses {
    paused: watch::Sender<BTreeSet<String>>,
    /// Whether anything is paused: read before every checkout, so the common case takes no
    /// lock (the set's lock is shared by every session).
    any: AtomicBool,
}

impl Default for Pauses {
    fn default() -> Self {
        Self {
            paused: watch::Sender::new(BTreeSet::new()),
            any: AtomicBool::new(false),
        }
    }
}

/// Every database.
pub(crate) const ALL: &str = "*";

impl Pauses {
    /// Pauses `database` (None: all). False when it already was.
    pub(crate) fn pause(&self, database: Option<&str>) -> bool {
        let name = database.unwrap_or(ALL).to_string();
        self.paused.send_if_modified(|set| {
            self.any.store(true, Ordering::Release);
            set.insert(name)
        })
    }

    /// Resumes `database` (None: all, and every database paused by name). False when it
    /// was not paused.
    pub(crate) fn resume(&self, database: Option<&str>) -> bool {
        self.paused.send_if_modified(|set| {
            let changed = match database {
                None => {
                    let any = !set.is_empty();
                    set.clear();
                    any
                }
                Some(d) => set.remove(d),
            };
            self.any.store(!set.is_empty(), Ordering::Release);
            changed
        })
    }

    /// Whether `database` is paused now (by name or through "*").
    pub(crate) fn is_paused(&self, database: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let set = self.paused.borrow();
        !set.is_empty() && (set.contains(ALL) || set.contains(database))
    }

    /// What is paused.
    #[cfg(test)]
    fn list(&self) -> Vec<String> {
        self.paused.borrow().iter().cloned().collect()
    }

    /// Returns once `database` is not paused (at once when nothing is).
    pub(crate) async fn wait_resumed(&self, database: &str) {
        if !self.is_paused(database) {
            return;
        }
        let mut rx = self.paused.subscribe();
        // The sender lives as long as `self`, so `wait_for` ends only when resumed.
        let _ = rx.wait_for(|set| !(set.contains(ALL) || set.contains(database))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn pause_one_or_all_and_resume() {
        let p = std::sync::Arc::new(Pauses::default());
        assert!(p.pause(Some("app")));
        assert!(!p.pause(Some("app")));
        assert!(p.is_paused("app") && !p.is_paused("other"));
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait_resumed("app").await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert!(p.resume(Some("app")));
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        p.pause(None);
        assert!(p.is_paused("other"));
        assert!(p.resume(None) && p.list().is_empty());
    }
}

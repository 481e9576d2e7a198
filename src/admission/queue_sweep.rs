//! The fair queue's housekeeping and snapshots: the queue clock's sweep (NOTICEs and
//! timeouts when due), forgetting identities that hold and wait for nothing, and what SHOW
//! commands and metrics read.
//!
//! Part of the fair queue ([`super`]), run by admission's queue clock and its tick, off the
//! transaction path.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Scheduler, Share, ShareStatus, Signal};
use crate::admission::names::Same;

impl Scheduler {
    /// Sends the NOTICE to waiters whose notice time has come and times out those whose
    /// deadline has passed (they leave the queue). Returns when the next waiter is due.
    pub(crate) fn sweep(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut left: Vec<(Arc<str>, u32, u32)> = Vec::new();
        let mut emptier: Vec<Arc<str>> = Vec::new();
        for (name, g) in self.gates.iter_mut() {
            for (id, f) in g.flows.iter_mut() {
                if f.waiting.iter().any(|w| w.due.deadline <= now) {
                    let before = f.waiting.len();
                    let mut counted = 0;
                    for w in std::mem::take(&mut f.waiting) {
                        if w.due.deadline <= now {
                            counted += u32::from(w.counted);
                            let _ = w.tx.send(Signal::TimedOut);
                        } else {
                            f.waiting.push_back(w);
                        }
                    }
                    let n = (before - f.waiting.len()) as u32;
                    g.waiting -= n;
                    left.push((id.clone(), n, counted));
                    if emptier.last() != Some(name) {
                        emptier.push(name.clone());
                    }
                }
                for w in f.waiting.iter_mut() {
                    if w.due.notice.is_some_and(|at| at <= now) {
                        w.due.notice = None;
                        let (tx, rx) = oneshot::channel();
                        let _ = std::mem::replace(&mut w.tx, tx).send(Signal::Notice(rx));
                    }
                    let due = w.due.next();
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
        }
        for (id, n, counted) in left {
            if let Some(s) = self.shares.get_mut(&Same(&id)) {
                s.dequeue(n, counted);
            }
        }
        // Identities that stopped waiting may raise the others' shares (headroom).
        for g in emptier {
            self.dispatch(&g);
        }
        next
    }

    /// Forgets identities `keep` rejects once they hold and wait for nothing.
    pub(crate) fn prune(&mut self, keep: impl Fn(&str) -> bool) {
        let idle = |s: &Share| s.servers == 0 && s.waiting == 0;
        self.shares.retain(|id, s| !idle(s) || keep(id));
        let shares = &self.shares;
        for g in self.gates.values_mut() {
            g.flows.retain(|id, f| {
                f.in_use > 0
                    || f.long > 0
                    || !f.waiting.is_empty()
                    || shares.get(&Same(id)).is_some_and(|s| s.limits.min_servers > 0)
            });
        }
        self.gates.retain(|_, g| !g.flows.is_empty() || g.in_use > 0);
    }

    /// An identity's grants and waiters.
    pub fn status(&self, id: &str) -> ShareStatus {
        self.shares
            .get(id)
            .map(|s| ShareStatus {
                servers: s.servers,
                waiting: s.waiting,
            })
            .unwrap_or_default()
    }

    /// How long the longest waiter of a gate has waited.
    pub(crate) fn gate_max_wait(&self, gate: &str) -> std::time::Duration {
        self.gates
            .get(gate)
            .into_iter()
            .flat_map(|g| g.flows.values())
            .filter_map(|f| f.waiting.front().map(|w| w.since.elapsed()))
            .max()
            .unwrap_or_default()
    }

    /// Grants in use and waiters of a gate.
    pub(crate) fn gate_status(&self, gate: &str) -> (u32, u32) {
        self.gates.get(gate).map_or((0, 0), |g| (g.in_use, g.waiting))
    }
}

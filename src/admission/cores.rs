//! One core's part of admission: the fair queue of that core's gates under a lock of its own,
//! and how the cores share what spans them.
//!
//! Part of admission. Sessions live on one core's event loop and take their server grants
//! from their core's part of a pool (see `pool::shards`); each core's [`Core`] holds those
//! gates' scheduler, so a transaction's grant and release lock only their own core's state
//! and clone only that core's names (a [`Member`](super::Member) carries its identity as its
//! core's scheduler keeps it). Logins, identities, surges and refusals stay in admission's
//! own state, off the transaction path.
//!
//! What spans cores is exchanged by [`Admission::exchange`], which the proxy's lease loop
//! runs every few milliseconds: each core's gates are mirrored into the others (the whole
//! pool's view: headroom, the fair pick, refusals; see `queue::cores_view`), and each
//! identity's `max_server_connections` and cluster grants are split into per-core
//! allowances by demand ([`crate::lease::plan`], as the pools' slots are). An allowance is
//! lowered first and raised only by what no core holds or may take, so the cap holds exactly
//! while it moves. With one core there is one `Core`, no allowances and no mirrors.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::names::{NameMap, Same};
use super::queue::{Scheduler, ShareStatus};
use super::Admission;
use crate::lease::{plan, Demand};

/// One core's scheduler and what it counts (see the module docs).
#[derive(Debug)]
pub(crate) struct Core {
    state: Mutex<CoreState>,
}

/// Grants taken by one identity on one core.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    /// Grants taken.
    pub(crate) grants: u64,
    /// Of them, after a wait in the queue.
    pub(crate) queued: u64,
}

#[derive(Debug)]
pub(crate) struct CoreState {
    pub(crate) sched: Scheduler,
    /// Per identity.
    pub(crate) tally: NameMap<Tally>,
    /// pgvalve_queue_wait_seconds per identity, from its first wait on this core.
    pub(crate) waits: NameMap<metrics::Histogram>,
    /// When the queue clock looks at this core's queue next.
    pub(crate) clock_at: Instant,
}

impl Core {
    /// A core's part for a proxy of `cores` cores.
    pub(crate) fn new(cores: usize) -> Self {
        let mut sched = Scheduler::default();
        sched.set_cores(cores);
        if cores > 1 {
            sched.set_split();
        }
        Core {
            state: Mutex::new(CoreState {
                sched,
                tally: NameMap::default(),
                waits: NameMap::default(),
                clock_at: Instant::now(),
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CoreState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CoreState {
    /// The name this core's scheduler keeps for identity `id` (a look-up by it compares
    /// pointers, and cloning it touches no other core's reference count).
    pub(crate) fn local_name(&self, id: &Arc<str>) -> Arc<str> {
        self.sched.share_key(id).unwrap_or_else(|| id.clone())
    }

    /// Counts a grant of `id`, after a wait when `queued`.
    pub(crate) fn count_grant(&mut self, id: &Arc<str>, queued: bool) {
        let t = match self.tally.get_mut(&Same(id)) {
            Some(t) => t,
            None => self.tally.entry(id.clone()).or_default(),
        };
        t.grants += 1;
        t.queued += u64::from(queued);
    }
}

impl Admission {
    /// Core `k`'s part (the last one for a larger `k`).
    pub(crate) fn core(&self, k: usize) -> &Arc<Core> {
        let cores = &self.inner.cores;
        &cores[k.min(cores.len() - 1)]
    }

    /// Every core's state, locked in core order (the only order in which two are held).
    fn lock_all(&self) -> Vec<MutexGuard<'_, CoreState>> {
        self.inner.cores.iter().map(|c| c.lock()).collect()
    }

    /// An identity's grants and waiters on every core.
    pub(crate) fn totals(&self, id: &str) -> ShareStatus {
        self.inner.cores.iter().fold(ShareStatus::default(), |t, c| {
            let s = c.lock().sched.status(id);
            ShareStatus {
                servers: t.servers + s.servers,
                waiting: t.waiting + s.waiting,
            }
        })
    }

    /// Grants of `id` counted on every core: (taken, of them after a wait).
    pub(crate) fn tallies(&self, id: &str) -> (u64, u64) {
        self.inner.cores.iter().fold((0, 0), |(g, q), c| {
            let t = c.lock().tally.get(id).copied().unwrap_or_default();
            (g + t.grants, q + t.queued)
        })
    }

    /// Splits `id`'s cap over the cores again (or lifts the split when it has none).
    pub(crate) fn lease_identity(&self, id: &str) {
        if self.inner.cores.len() > 1 {
            let mut all = self.lock_all();
            lease_one(&mut all, id);
        }
    }

    /// Whether a client waits for a grant on any core.
    pub(crate) fn anyone_waiting(&self) -> bool {
        self.inner.cores.iter().any(|c| c.lock().sched.waiting_here())
    }

    /// Until a client is queued on any core (at once when one was since the last call).
    pub(crate) async fn client_queued(&self) {
        self.inner.queued_bell.notified().await;
    }

    /// The cores tell each other what spans them (see the module docs): mirrors of their
    /// gates, and the allowances of capped identities moved to where clients wait. Run by
    /// the proxy's lease loop.
    pub fn exchange(&self) {
        let n = self.inner.cores.len();
        if n < 2 {
            return;
        }
        if !self.inner.cores.iter().any(|c| c.lock().sched.wants_exchange()) {
            return;
        }
        let mut all = self.lock_all();
        // Each core in turn gets exact mirrors (every core is locked) and serves the waiters
        // only an exact look may let go (see `Standing::decided_here`).
        for k in 0..n {
            let snaps: Vec<_> = (0..n)
                .filter(|&j| j != k)
                .flat_map(|j| all[j].sched.snapshots())
                .collect();
            all[k].sched.mirror_exact(snaps.iter());
        }
        let mut capped: Vec<Arc<str>> = Vec::new();
        for st in &all {
            for id in st.sched.share_ids() {
                if st.sched.cap_of(id).is_some() && !capped.iter().any(|c| **c == **id) {
                    capped.push(id.clone());
                }
            }
        }
        for id in &capped {
            lease_one(&mut all, id);
        }
    }
}

/// Splits `id`'s cap over the cores `all` by demand: lowered allowances first, then raises
/// by what is left of the cap after what every core holds or may take.
fn lease_one(all: &mut [MutexGuard<'_, CoreState>], id: &str) {
    let Some(cap) = all.iter().find_map(|c| c.sched.cap_of(id)) else {
        for c in all.iter_mut() {
            c.sched.set_allow(id, u32::MAX);
        }
        return;
    };
    let d: Vec<_> = all.iter().map(|c| c.sched.allowance_demand(id)).collect();
    let unset = d.iter().any(|d| d.allow == u32::MAX);
    let leases: Vec<usize> = d
        .iter()
        .map(|d| if d.allow == u32::MAX { 0 } else { d.allow as usize })
        .collect();
    let demand: Vec<Demand> = d
        .iter()
        .map(|d| Demand {
            busy: d.servers as usize,
            waiting: d.waiting as usize,
            held: d.long as usize,
        })
        .collect();
    let new = match plan(cap as usize, &leases, &demand) {
        Some(new) => new,
        None if unset => leases,
        None => return,
    };
    let new: Vec<u32> = new.into_iter().map(|n| u32::try_from(n).unwrap_or(u32::MAX)).collect();
    let mut now: Vec<u32> = d.iter().map(|d| d.allow).collect();
    for (k, c) in all.iter_mut().enumerate() {
        if new[k] < now[k] {
            c.sched.set_allow(id, new[k]);
            now[k] = new[k];
        }
    }
    let taken: u32 = (0..d.len()).map(|k| now[k].max(d[k].servers)).sum();
    let mut room = cap.saturating_sub(taken);
    for (k, c) in all.iter_mut().enumerate() {
        if new[k] > now[k] && room > 0 {
            let add = (new[k] - now[k]).min(room);
            c.sched.set_allow(id, now[k] + add);
            room -= add;
        }
    }
}

#[cfg(test)]
#[path = "cores_tests.rs"]
mod tests;

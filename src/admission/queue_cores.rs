//! What one core's scheduler tells the others, and what it is told: mirrors of the other
//! cores' gates of a pool, and this core's part of each identity's caps.
//!
//! Part of the fair queue ([`super`]). With several cores each core's admission has its own
//! scheduler holding only its own gates (see `admission::cores`), so a transaction's grant
//! and release touch nothing another core touches. Two things still look beyond one core,
//! and both are fed here by the proxy's lease loop every few milliseconds, off the
//! transaction path: the whole pool's view (the headroom rule, the fair pick, refusals) reads
//! the other cores' gates as *mirrors* (a snapshot of their grants and waiters, never
//! granted from); and an identity's `max_server_connections` and cluster grants are split
//! into one *allowance* per core, which the core never exceeds.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use super::{Flow, Gate, Scheduler};
use crate::admission::names::{NameMap, Same};

/// One core's gate of a pool as that core sees it now.
#[derive(Debug, Clone)]
pub(crate) struct GateSnap {
    name: Arc<str>,
    capacity: u32,
    in_use: u32,
    /// Per identity: grants in use, of them held long, clients waiting.
    flows: Vec<(Arc<str>, u32, u32, u32)>,
}

/// One core's standing under an identity's cap (see [`Scheduler::allowance_demand`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AllowDemand {
    /// Grants it holds on the core.
    pub(crate) servers: u32,
    /// Its clients waiting on the core.
    pub(crate) waiting: u32,
    /// Of its grants, those held for whole sessions or pinned.
    pub(crate) long: u32,
    /// The core's allowance now.
    pub(crate) allow: u32,
}

impl Scheduler {
    /// Makes this one of several cores' schedulers (see the module docs).
    pub(crate) fn set_split(&mut self) {
        self.split = true;
    }

    /// This core's own gates of pools split over cores, for the other cores' mirrors.
    pub(crate) fn snapshots(&self) -> Vec<GateSnap> {
        self.gates
            .iter()
            .filter(|(name, g)| !g.mirror && self.siblings.contains_key(&Same(name)))
            .map(|(name, g)| GateSnap {
                name: name.clone(),
                capacity: g.capacity,
                in_use: g.in_use,
                flows: g
                    .flows
                    .iter()
                    .filter(|(_, f)| f.in_use > 0 || !f.waiting.is_empty())
                    .map(|(id, f)| (id.clone(), f.in_use, f.long, f.waiting.len() as u32))
                    .collect(),
            })
            .collect()
    }

    /// Takes the other cores' gates as mirrors, in place of the last ones (a gate gone there
    /// goes here too), and serves this core's waiters that may go now.
    ///
    /// The caller holds every core's state, so the mirrors are exact while it dispatches:
    /// waiters a look at this core alone could not let go are served here.
    pub(crate) fn mirror_exact<'a>(&mut self, snaps: impl Iterator<Item = &'a GateSnap>) {
        if self.cores < 2 {
            return;
        }
        self.gates.retain(|_, g| !g.mirror);
        for snap in snaps {
            self.mirror(snap);
        }
        for (id, s) in self.shares.iter_mut() {
            s.mirrored_long = mirrored_long(&self.gates, id);
        }
        self.exact = true;
        self.deferred.set(false);
        self.dispatch_all();
        self.exact = false;
    }

    /// Whether a client waits in one of this core's gates (or was judged on mirrors).
    pub(crate) fn waiting_here(&self) -> bool {
        self.deferred.get() || self.gates.values().any(|g| !g.mirror && g.waiting > 0)
    }

    /// Whether the next exchange has work here: a waiter judged on mirrors (near a pool's
    /// end, see `Standing::decided_here`), any waiter in a gate of a pool split over cores
    /// (the fair pick, the headroom and the lease plan read the other cores' gates: mirrors
    /// left stale while clients wait could hold them back for good), or an identity whose
    /// cap is split over the cores.
    pub(crate) fn wants_exchange(&self) -> bool {
        self.deferred.get()
            || self
                .gates
                .iter()
                .any(|(name, g)| !g.mirror && g.waiting > 0 && self.siblings.contains_key(&Same(name)))
            || self.shares.keys().any(|id| self.cap_of(id).is_some())
    }

    /// Takes another core's gate as a mirror (a gate of this core's own is never replaced).
    fn mirror(&mut self, snap: &GateSnap) {
        let key = match self.siblings.get_key_value(&*snap.name) {
            Some((k, _)) => k.clone(),
            None => {
                self.know(&snap.name);
                snap.name.clone()
            }
        };
        if self.gates.get(&*key).is_some_and(|g| !g.mirror) {
            return;
        }
        let flows = snap
            .flows
            .iter()
            .map(|(id, in_use, long, waiting)| {
                let id = self
                    .shares
                    .get_key_value(&**id)
                    .map_or_else(|| id.clone(), |(k, _)| k.clone());
                let flow = Flow {
                    in_use: *in_use,
                    long: *long,
                    remote_waiting: *waiting,
                    ..Flow::default()
                };
                (id, flow)
            })
            .collect();
        let g = self.gates.entry(key).or_default();
        g.mirror = true;
        g.capacity = snap.capacity;
        g.in_use = snap.in_use;
        g.waiting = 0;
        g.flows = flows;
    }

    /// `id`'s grants held long in the mirrors (see `Share::mirrored_long`).
    pub(super) fn mirrored_long(&self, id: &Arc<str>) -> u32 {
        mirrored_long(&self.gates, id)
    }

    /// Serves the waiters of this core's own gates that may go now (after new mirrors, new
    /// limits, fewer lock holders).
    pub(super) fn dispatch_all(&mut self) {
        let gates: Vec<Arc<str>> = self
            .gates
            .iter()
            .filter(|(_, g)| !g.mirror && g.waiting > 0)
            .map(|(k, _)| k.clone())
            .collect();
        for g in gates {
            self.dispatch(&g);
        }
    }

    /// The identity's cap to split over the cores: the lower of its `max_server_connections`
    /// and its cluster grants (None: it has neither).
    pub(crate) fn cap_of(&self, id: &str) -> Option<u32> {
        let s = self.shares.get(id)?;
        let l = &s.limits;
        let max = (l.max_servers > 0).then_some(l.max_servers);
        let cluster = (l.cluster_max > 0).then_some(s.grants);
        match (max, cluster) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The name this scheduler keeps for identity `id`, if it knows it.
    pub(crate) fn share_key(&self, id: &str) -> Option<Arc<str>> {
        self.shares.get_key_value(id).map(|(k, _)| k.clone())
    }

    /// Identities known to this core.
    pub(crate) fn share_ids(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.shares.keys()
    }

    /// What this core holds, waits for and is allowed of `id`'s cap.
    pub(crate) fn allowance_demand(&self, id: &str) -> AllowDemand {
        let Some(s) = self.shares.get(id) else {
            return AllowDemand::default();
        };
        let long = self
            .gates
            .values()
            .filter(|g| !g.mirror)
            .filter_map(|g| g.flows.get(id))
            .map(|f| f.long)
            .sum();
        AllowDemand {
            servers: s.servers,
            waiting: s.waiting,
            long,
            allow: s.allow,
        }
    }

    /// Sets this core's allowance of `id`'s cap (`u32::MAX`: none); a raise serves its
    /// waiters. Lowering takes nothing back: grants above it end with their transactions.
    pub(crate) fn set_allow(&mut self, id: &str, allow: u32) {
        let Some((key, s)) = self.shares.get_key_value_mut(id) else {
            return;
        };
        let raised = allow > s.allow;
        s.allow = allow;
        if raised && s.waiting > 0 {
            let key = key.clone();
            self.dispatch_waiting(&key, None);
        }
    }

    /// Shares `queue` as `id`'s count of clients waiting on every core (for `max_queue`).
    pub(crate) fn share_queue(&mut self, id: &str, queue: &Arc<AtomicU32>) {
        if let Some(s) = self.shares.get_mut(id) {
            if s.queue.as_ref().is_none_or(|q| !Arc::ptr_eq(q, queue)) {
                s.queue = Some(queue.clone());
            }
        }
    }
}

/// `id`'s grants held long in the mirrors among `gates`.
fn mirrored_long(gates: &NameMap<Gate>, id: &Arc<str>) -> u32 {
    gates
        .values()
        .filter(|g| g.mirror)
        .filter_map(|g| g.flows.get(&Same(id)))
        .map(|f| f.long)
        .sum()
}

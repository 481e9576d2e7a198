//! Admission housekeeping: the once-a-second tick (surge detection, forgetting idle
//! identities), reload of limits, and snapshots for SHOW LIMITS / SHOW SURGES and metrics.
//!
//! Part of admission; the proxy runs [`Admission::tick`] from its maintenance task and calls
//! [`Admission::reload`] when a new config has been validated.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::surge::{Change, SurgeEvent};
use super::{gate_core, Admission, AdmissionConfig, Counters, Limits, SURGE_HISTORY};

/// The queue clock looks at the queue at least this often.
const CLOCK_LOOK: Duration = Duration::from_secs(1);

/// Identities with no clients are forgotten this long after their last client left.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// A point-in-time view of one identity.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityStatus {
    /// The identity.
    pub identity: String,
    /// The rule that named it (its name template), or None for a default identity.
    pub rule: Option<String>,
    /// Its limits.
    pub limits: Limits,
    /// Client connections now.
    pub clients: u32,
    /// Server connections held now.
    pub servers: u32,
    /// Clients waiting for one now.
    pub waiting: u32,
    /// Of its cluster-wide cap, what this instance may hold now (0 without one).
    pub cluster_grants: u32,
    /// Logins in the last second.
    pub(crate) login_rate: f64,
    /// Logins per second over the last 10 s.
    pub(crate) login_rate_10s: f64,
    /// Growth of client connections over the last 10 s.
    pub(crate) delta_10s: i64,
    /// Growth of client connections over the last second.
    pub(crate) delta_1s: i64,
    /// Baseline logins per second.
    pub(crate) baseline: f64,
    /// In a surge episode now.
    pub surging: bool,
    /// Counters since it was first seen.
    pub counters: Counters,
}

impl Admission {
    /// The queue clock: sends queued clients their NOTICE and their timeout when due (see
    /// [`super::queue::Scheduler::sweep`]), then sleeps until the next one is due (a second
    /// at most), or until a client is queued with an earlier due time. Runs until dropped;
    /// the proxy runs it beside [`Self::tick`].
    pub(crate) async fn queue_clock(&self) {
        loop {
            let now = Instant::now();
            let mut at = now + CLOCK_LOOK;
            for c in self.inner.cores.iter() {
                if let Some(next) = c.lock().sched.sweep(now) {
                    at = at.min(next);
                }
            }
            for c in self.inner.cores.iter() {
                c.lock().clock_at = at;
            }
            // A bell rung since the lock was released is kept (Notify stores one permit).
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = self.inner.clock_bell.notified() => {}
            }
        }
    }

    /// Closes one second of surge windows (`every` since the last tick), logs episodes that
    /// start or end, and forgets identities idle for a while.
    pub(crate) fn tick(&self, every: Duration) {
        let mut st = self.state();
        let st = &mut *st;
        let now = Instant::now();
        let mut changes = Vec::new();
        for (id, ident) in st.ids.iter_mut() {
            if let Some(c) = ident.surge.tick(id, ident.clients, every, &st.settings) {
                if matches!(c, Change::Started(_)) {
                    ident.counters.surges += 1;
                }
                changes.push(c);
            }
        }
        for c in changes {
            match c {
                Change::Started(ev) => {
                    tracing::warn!(
                        identity = %ev.identity, trigger = ev.trigger, logins_per_second = ev.rate,
                        client_growth_10s = ev.delta, baseline_per_second = format!("{:.2}", ev.baseline),
                        "connection surge"
                    );
                    if st.surges.len() >= SURGE_HISTORY {
                        st.surges.pop_front();
                    }
                    st.surges.push_back(ev);
                }
                Change::Ended(ev) => {
                    tracing::info!(
                        identity = %ev.identity, peak_logins_per_second = ev.peak_rate,
                        peak_client_growth_10s = ev.peak_delta, "connection surge ended"
                    );
                    if let Some(h) = st
                        .surges
                        .iter_mut()
                        .rev()
                        .find(|h| h.identity == ev.identity && h.ended.is_none())
                    {
                        *h = ev;
                    }
                }
            }
        }
        st.ids.retain(|id, i| {
            let s = self.totals(id);
            i.clients > 0
                || s.servers > 0
                || s.waiting > 0
                || !i.surge.is_quiet()
                || now.saturating_duration_since(i.last_seen) < FORGET_AFTER
        });
        for c in self.inner.cores.iter() {
            let mut c = c.lock();
            let c = &mut *c;
            let ids = &mut st.ids;
            c.sched.prune(|id| ids.get(id).is_some_and(|i| i.clients > 0));
            // What a core counted of an identity it forgot stays in the identity's counters.
            let sched = &c.sched;
            c.tally.retain(|id, t| {
                let keep = sched.share_key(id).is_some();
                if let (false, Some(i)) = (keep, ids.get_mut(&**id)) {
                    i.counters.grants += t.grants;
                    i.counters.queued += t.queued;
                }
                keep
            });
            c.waits.retain(|id, _| sched.share_key(id).is_some());
        }
    }

    /// Applies new limits and rules. Connected clients keep their identity; each identity
    /// gets the limits of the rule with the same name in the new config (or the defaults),
    /// and waiting clients are re-examined at once.
    pub fn reload(&self, c: AdmissionConfig) {
        let mut st = self.state();
        let st = &mut *st;
        st.settings = c.settings;
        st.rules = Arc::new(c.rules);
        st.query_wait_timeout = c.query_wait_timeout;
        st.login_wait = c.login_wait;
        let ids: Vec<Arc<str>> = st.ids.keys().cloned().collect();
        for id in ids {
            let ident = st.ids.get_mut(&id).expect("invariant: listed above");
            let rule = ident
                .rule
                .as_deref()
                .and_then(|t| st.rules.iter().find(|r| r.template() == t));
            ident.limits = Limits::resolve(
                &st.settings,
                &rule.map(|r| r.limits.clone()).unwrap_or_default(),
                st.query_wait_timeout,
            );
            super::tell_cores(&self.inner.cores, &id, ident);
            self.lease_identity(&id);
        }
        if c.max_clients != self.inner.max_clients {
            tracing::warn!("proxy.max_client_connections changes only on restart");
        }
    }

    /// A pool's gate: grants in use, waiting clients, the longest wait now.
    pub fn gate(&self, gate: &str) -> (u32, u32, std::time::Duration) {
        let st = self.core(gate_core(gate)).lock();
        let (in_use, waiting) = st.sched.gate_status(gate);
        (in_use, waiting, st.sched.gate_max_wait(gate))
    }

    /// Grants in use, clients waiting that more capacity would serve, and grants held long
    /// (sessions, pinned), in each of `gates` (the pools' lease rebalancing reads every
    /// core's gate of a pool), each read from the core holding it.
    pub fn gates(&self, gates: &[(&Arc<str>, usize)]) -> Vec<(u32, u32, u32)> {
        gates
            .iter()
            .map(|(g, core)| self.core(*core).lock().sched.gate_demand(g))
            .collect()
    }

    /// New capacities for gates (the cores' leases of a pool changed), the smaller ones
    /// first; waiters are granted what they free. (A grant beyond a part's lease waits for
    /// a connection in the part: the pool's budget counts connections, not grants.)
    pub fn resize_gates(&self, gates: &[(Arc<str>, u32)]) {
        let capacity = |g: &Arc<str>| self.core(gate_core(g)).lock().sched.gate_capacity(g);
        let mut order: Vec<(&Arc<str>, u32, bool)> = gates.iter().map(|(g, c)| (g, *c, capacity(g) < *c)).collect();
        order.sort_by_key(|(_, c, grows)| (*grows, *c));
        for (g, c, _) in order {
            self.core(gate_core(g)).lock().sched.set_capacity(g, c);
        }
    }

    /// How many identities have clients waiting for a server connection now.
    pub fn identities_waiting(&self) -> usize {
        let ids: Vec<Arc<str>> = self.state().ids.keys().cloned().collect();
        ids.iter().filter(|id| self.totals(id).waiting > 0).count()
    }

    /// Every known identity, sorted by name.
    pub fn identities(&self) -> Vec<IdentityStatus> {
        let st = self.state();
        let mut v: Vec<IdentityStatus> = st
            .ids
            .iter()
            .map(|(id, i)| {
                let s = self.totals(id);
                let (grants, queued) = self.tallies(id);
                let (login_rate, login_rate_10s, delta_1s, delta_10s, baseline) = i.surge.rates();
                IdentityStatus {
                    identity: id.to_string(),
                    rule: i.rule.clone(),
                    limits: i.limits.clone(),
                    clients: i.clients,
                    servers: s.servers,
                    waiting: s.waiting,
                    cluster_grants: self.core(0).lock().sched.grants(id),
                    login_rate,
                    login_rate_10s,
                    delta_10s,
                    delta_1s,
                    baseline,
                    surging: i.surge.active(),
                    counters: Counters {
                        grants: i.counters.grants + grants,
                        queued: i.counters.queued + queued,
                        ..i.counters.clone()
                    },
                }
            })
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// One identity's status.
    pub fn identity(&self, id: &str) -> Option<IdentityStatus> {
        self.identities().into_iter().find(|s| s.identity == id)
    }

    /// An identity's lock policy: (max_lock_hold, lock_action).
    pub(crate) fn lock_policy(&self, id: &str) -> Option<(Duration, super::LockAction)> {
        self.state()
            .ids
            .get(id)
            .map(|i| (i.limits.max_lock_hold, i.limits.lock_action))
    }

    /// The lock monitor's count of sessions holding dangerous locks, per identity.
    pub(crate) fn set_lock_holders(&self, holders: &std::collections::HashMap<String, u32>) {
        for c in self.inner.cores.iter() {
            c.lock().sched.set_lock_holders(holders);
        }
    }

    /// Surge episodes, oldest first (bounded history).
    pub fn surges(&self) -> Vec<SurgeEvent> {
        self.state().surges.iter().cloned().collect()
    }
}

/// The cluster's coordinator leases admission's cluster-wide identity caps through this.
impl crate::cluster::grants::IdentityGrants for Admission {
    fn wants(&self) -> Vec<crate::cluster::grants::Want> {
        let mut wants = self.core(0).lock().sched.cluster_wants();
        for w in &mut wants {
            let t = self.totals(&w.identity);
            (w.in_use, w.waiting) = (t.servers, t.waiting);
        }
        wants
    }

    /// Lowering takes nothing back: what the identity holds above the new number drains as
    /// its transactions end.
    fn set(&self, identity: &str, grants: u32) -> u32 {
        for c in self.inner.cores.iter() {
            c.lock().sched.set_grants(identity, grants);
        }
        self.lease_identity(identity);
        self.totals(identity).servers
    }
}

//! `/metrics`: the state of one proxy read now (connections, waiting clients, refusals,
//! surges, pool sizes, locks) into a fresh recorder, then its event metrics.
//!
//! Part of the HTTP endpoint; reads the services through [`Sources`], records nothing.

use std::sync::atomic::Ordering::Relaxed;

use metrics::Recorder;
use metrics_exporter_prometheus::PrometheusRecorder;

use crate::observe::{key, recorder, META};

use super::Sources;

struct Snapshot(PrometheusRecorder);

impl Snapshot {
    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)], v: f64) {
        self.0.register_gauge(&key(name, labels), &META).set(v);
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)], v: u64) {
        self.0.register_counter(&key(name, labels), &META).absolute(v);
    }
}

/// Everything, as Prometheus text: the state read now, then the events.
pub(super) fn render(shared: &Sources) -> String {
    let s = Snapshot(recorder());
    s.proxy(shared);
    s.traffic(shared);
    s.client_connections(shared);
    s.identities(shared);
    s.pools(shared);
    s.locks(shared);
    s.cluster(shared);
    let mut out = s.0.handle().render();
    out.push_str(&shared.events.render());
    out.push_str(&super::latency::render(&shared.services.pools.stats.latency));
    out
}

impl Snapshot {
    /// The cluster as this instance's coordinator last saw it (nothing without `[cluster]`).
    fn cluster(&self, shared: &Sources) {
        let Some(c) = shared.services.pools.cluster() else {
            return;
        };
        let v = c.view();
        self.gauge("pgvalve_cluster_connected", &[], f64::from(u8::from(v.connected)));
        for p in &v.peers {
            let l = [("instance", p.id.as_str()), ("this", if p.me { "yes" } else { "no" })];
            self.gauge("pgvalve_cluster_slots_held", &l, p.held as f64);
            self.gauge("pgvalve_cluster_slots_in_use", &l, p.in_use as f64);
            self.gauge("pgvalve_cluster_slots_wanted", &l, (p.in_use + p.waiting) as f64);
        }
        let n = &c.counters;
        self.counter("pgvalve_cluster_rebalances_total", &[], n.rebalances.load(Relaxed));
        self.counter("pgvalve_cluster_coordination_errors_total", &[], n.errors.load(Relaxed));
        self.counter("pgvalve_cluster_slots_leased_total", &[], n.leased.load(Relaxed));
        self.counter("pgvalve_cluster_slots_released_total", &[], n.released.load(Relaxed));
    }

    /// The proxy as a whole: clients connected, session pins by reason, config reloads.
    fn proxy(&self, shared: &Sources) {
        self.gauge(
            "pgvalve_clients_connected",
            &[],
            shared.services.admission.clients() as f64,
        );
        for (reason, n) in shared.services.pins.by_reason() {
            self.counter("pgvalve_session_pins_total", &[("reason", reason)], n);
        }
        self.counter(
            "pgvalve_config_reloads_total",
            &[("result", "ok")],
            shared.reloader.ok.load(Relaxed),
        );
        self.counter(
            "pgvalve_config_reloads_total",
            &[("result", "failed")],
            shared.reloader.failed.load(Relaxed),
        );
    }

    /// Traffic per pool (database, user): transactions, queries, assignments, bytes.
    fn traffic(&self, shared: &Sources) {
        for (k, t) in shared.services.pools.stats.totals() {
            let l: &[(&'static str, &str)] = &[("database", &k.database), ("user", &k.user)];
            self.counter("pgvalve_transactions_total", l, t.xacts);
            self.counter("pgvalve_queries_total", l, t.queries);
            self.counter("pgvalve_server_assignments_total", l, t.server_assignments);
            self.counter("pgvalve_client_received_bytes_total", l, t.received);
            self.counter("pgvalve_client_sent_bytes_total", l, t.sent);
        }
    }

    /// Client connections per identity, active (holding a server connection) or idle.
    fn client_connections(&self, shared: &Sources) {
        let mut by_state: std::collections::BTreeMap<(String, &'static str), u64> = Default::default();
        for c in shared.services.sessions.all() {
            let state = if c.backend().is_some() { "active" } else { "idle" };
            *by_state.entry((c.client.identity.to_string(), state)).or_default() += 1;
        }
        for ((identity, state), n) in by_state {
            self.gauge(
                "pgvalve_client_connections",
                &[("identity", &identity), ("state", state)],
                n as f64,
            );
        }
    }

    /// Admission per identity: connections, limits, login rates, surges, grants, refusals.
    fn identities(&self, shared: &Sources) {
        for i in shared.services.admission.identities() {
            let id: &[(&'static str, &str)] = &[("identity", &i.identity)];
            self.gauge("pgvalve_identity_client_connections", id, f64::from(i.clients));
            self.gauge("pgvalve_identity_server_connections", id, f64::from(i.servers));
            self.gauge("pgvalve_identity_waiting_clients", id, f64::from(i.waiting));
            self.gauge(
                "pgvalve_identity_max_client_connections",
                id,
                f64::from(i.limits.max_clients),
            );
            self.gauge(
                "pgvalve_identity_max_server_connections",
                id,
                f64::from(i.limits.max_servers),
            );
            if i.limits.cluster_max_servers > 0 {
                let cap = f64::from(i.limits.cluster_max_servers);
                self.gauge("pgvalve_identity_cluster_max_server_connections", id, cap);
                self.gauge("pgvalve_identity_cluster_grants", id, f64::from(i.cluster_grants));
            }
            self.gauge("pgvalve_identity_login_rate", id, i.login_rate);
            self.gauge("pgvalve_identity_login_rate_baseline", id, i.baseline);
            self.gauge("pgvalve_identity_client_growth_1s", id, i.delta_1s as f64);
            self.gauge("pgvalve_identity_client_growth_10s", id, i.delta_10s as f64);
            self.gauge("pgvalve_identity_surging", id, if i.surging { 1.0 } else { 0.0 });
            self.counter("pgvalve_identity_logins_total", id, i.counters.admitted);
            self.counter("pgvalve_identity_server_grants_total", id, i.counters.grants);
            self.counter("pgvalve_identity_server_grants_queued_total", id, i.counters.queued);
            self.counter("pgvalve_surge_events_total", id, i.counters.surges);
            for (reason, n) in &i.counters.refused {
                self.counter(
                    "pgvalve_refusals_total",
                    &[("identity", &i.identity), ("reason", reason)],
                    *n,
                );
            }
        }
    }

    /// Server connections per pool: size, active and idle, opened, failed connects.
    fn pools(&self, shared: &Sources) {
        for p in shared.services.pools.stats() {
            let (db, user) = (p.key.database.as_str(), p.key.user.as_str());
            let active = p.open.saturating_sub(p.idle) as f64;
            self.gauge(
                "pgvalve_pool_size",
                &[("database", db), ("user", user)],
                p.pool_size as f64,
            );
            // "own": pgvalve's own connections holding slots of the pool (the lock monitor's).
            for (state, v) in [("active", active), ("idle", p.idle as f64), ("own", p.own as f64)] {
                self.gauge(
                    "pgvalve_server_connections",
                    &[("database", db), ("user", user), ("state", state)],
                    v,
                );
            }
            self.counter(
                "pgvalve_server_connections_opened_total",
                &[("database", db), ("user", user)],
                p.created,
            );
            self.counter(
                "pgvalve_server_connect_failures_total",
                &[("database", db), ("user", user)],
                p.connect_failures,
            );
        }
    }

    /// The lock watcher: dangerous locks held, blocked backends, episodes, actions.
    fn locks(&self, shared: &Sources) {
        let locks = shared.locks.state();
        let mut held: std::collections::HashMap<(String, String), u64> = Default::default();
        let mut blocked = std::collections::HashSet::new();
        for l in &locks.current {
            if l.dangerous {
                let id = l
                    .session
                    .as_ref()
                    .map_or("external".to_string(), |x| x.client.identity.to_string());
                *held.entry((id, l.row.mode.clone())).or_default() += 1;
            }
            if !l.row.granted {
                blocked.insert(l.row.pid);
            }
        }
        for ((id, mode), n) in held {
            self.gauge(
                "pgvalve_dangerous_locks",
                &[("identity", &id), ("mode", &mode)],
                n as f64,
            );
        }
        self.gauge("pgvalve_blocked_backends", &[], blocked.len() as f64);
        for (id, n) in &locks.episodes {
            self.counter("pgvalve_lock_episodes_total", &[("identity", id)], *n);
        }
        for ((id, action), n) in &locks.actions {
            self.counter(
                "pgvalve_lock_actions_total",
                &[("identity", id), ("action", action)],
                *n,
            );
        }
        drop(locks);
        for (id, n) in &shared.locks.deadlocks().counts {
            self.counter("pgvalve_deadlocks_total", &[("identity", id)], *n);
        }
        let long = shared.locks.long_transactions();
        for (id, n) in &long.counts {
            self.counter("pgvalve_long_transactions_total", &[("identity", id)], *n);
            let open = long.open.iter().filter(|t| &t.identity == id).count();
            self.gauge("pgvalve_long_transactions", &[("identity", id)], open as f64);
        }
    }
}

//! Prometheus metrics of one proxy: what admission, the pools and the sessions report.
//!
//! A service at the bottom (admission records into it). Two parts: *events* (histograms and counters recorded as things happen,
//! e.g. how long a queued client waited) live in a long-lived recorder owned by the proxy —
//! not the process-global one, so several proxies in one process keep their numbers apart;
//! *state* (connections, waiting clients, refusals, surges, pool sizes) is read from admission
//! and the pools at scrape time into a fresh recorder, so a forgotten identity's series
//! disappear with it; that scrape is the HTTP endpoint's. Both render as
//! Prometheus text with real histograms (buckets).

use std::sync::Arc;

use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

/// Every metric family pgvalve exports (the dashboard, the alert rules and the tests check
/// against this list).
pub const METRICS: &[&str] = &[
    "pgvalve_blocked_backends",
    "pgvalve_client_connections",
    "pgvalve_client_received_bytes_total",
    "pgvalve_client_sent_bytes_total",
    "pgvalve_clients_connected",
    "pgvalve_cluster_connected",
    "pgvalve_cluster_coordination_errors_total",
    "pgvalve_cluster_rebalances_total",
    "pgvalve_cluster_slots_held",
    "pgvalve_cluster_slots_in_use",
    "pgvalve_cluster_slots_leased_total",
    "pgvalve_cluster_slots_released_total",
    "pgvalve_cluster_slots_wanted",
    "pgvalve_config_reloads_total",
    "pgvalve_dangerous_locks",
    "pgvalve_deadlocks_total",
    "pgvalve_identity_client_connections",
    "pgvalve_identity_client_growth_10s",
    "pgvalve_identity_client_growth_1s",
    "pgvalve_identity_cluster_grants",
    "pgvalve_identity_cluster_max_server_connections",
    "pgvalve_identity_login_rate",
    "pgvalve_identity_login_rate_baseline",
    "pgvalve_identity_logins_total",
    "pgvalve_identity_max_client_connections",
    "pgvalve_identity_max_server_connections",
    "pgvalve_identity_server_connections",
    "pgvalve_identity_server_grants_queued_total",
    "pgvalve_identity_server_grants_total",
    "pgvalve_identity_surging",
    "pgvalve_identity_waiting_clients",
    "pgvalve_lock_actions_total",
    "pgvalve_lock_episodes_total",
    "pgvalve_long_transactions",
    "pgvalve_long_transactions_total",
    "pgvalve_pool_size",
    "pgvalve_queries_total",
    "pgvalve_query_duration_seconds",
    "pgvalve_queue_wait_seconds",
    "pgvalve_refusals_total",
    "pgvalve_server_assignments_total",
    "pgvalve_server_connections",
    "pgvalve_server_connect_failures_total",
    "pgvalve_server_connections_opened_total",
    "pgvalve_session_pins_total",
    "pgvalve_surge_events_total",
    "pgvalve_transaction_duration_seconds",
    "pgvalve_transactions_total",
];

pub(crate) const META: Metadata<'static> = Metadata::new("pgvalve", Level::INFO, None);

/// Buckets for every `_seconds` histogram: 1 ms to 2 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub(crate) fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .expect("invariant: the bucket list is not empty")
        .build_recorder()
}

pub(crate) fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect::<Vec<_>>(),
    )
}

/// Event metrics of one proxy (cheap to clone).
#[derive(Clone)]
pub struct Events {
    recorder: Arc<PrometheusRecorder>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self {
            recorder: Arc::new(recorder()),
        }
    }
}

impl Events {
    /// Where an identity's queue waits are recorded (registered once per identity, so
    /// recording a wait builds no key and looks nothing up).
    pub(crate) fn queue_wait(&self, identity: &str) -> metrics::Histogram {
        let k = key("pgvalve_queue_wait_seconds", &[("identity", identity)]);
        self.recorder.register_histogram(&k, &META)
    }

    /// Prometheus text of the event metrics.
    pub fn render(&self) -> String {
        let h = self.recorder.handle();
        h.run_upkeep();
        h.render()
    }
}

//! What a load test measures: per group, transactions, errors by SQLSTATE and message,
//! latency and connect-time HDR histograms, and a per-second timeline (throughput, p99,
//! errors); across groups, Jain's fairness index; and, with `--observe`, server connections
//! and dangerous locks sampled from PostgreSQL itself.
//!
//! Part of `pgvalve loadtest`. Recording takes a short lock per transaction (a client-side
//! cost, far below a round trip).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest run the timeline keeps, in seconds (later seconds are folded into the last).
pub(crate) const MAX_SECONDS: usize = 3600;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("invariant: valid bounds")
}

/// One second of one group.
#[derive(Debug, Clone)]
pub(crate) struct Second {
    /// Transactions that succeeded.
    pub transactions: u64,
    /// Errors.
    pub errors: u64,
    /// Latency of this second's transactions, microseconds.
    pub latency: Histogram<u64>,
}

/// What one group saw.
#[derive(Debug, Clone)]
pub struct GroupReport {
    /// Group name (its application_name).
    pub name: String,
    /// Its clients.
    pub clients: usize,
    /// Transactions that succeeded.
    pub transactions: u64,
    /// Errors by "SQLSTATE message" (or "client: ..." for client-side errors).
    pub errors: BTreeMap<String, u64>,
    /// Transactions still running when the round ended (or Ctrl-C): not in the latency.
    pub(crate) unfinished: u64,
    /// Transaction latency, microseconds (successful ones).
    pub latency: Histogram<u64>,
    /// Connect latency, microseconds.
    pub connect: Histogram<u64>,
    /// Per second since the start.
    pub(crate) timeline: Vec<Second>,
    /// Wall time measured.
    pub elapsed: Duration,
    /// HOST:PORT its clients connected to, when the run had several targets.
    pub target: Option<String>,
}

impl GroupReport {
    /// An empty report for a group of `clients` called `name`.
    pub fn new(name: &str, clients: usize) -> Self {
        Self {
            name: name.into(),
            clients,
            transactions: 0,
            errors: BTreeMap::new(),
            unfinished: 0,
            latency: histogram(),
            connect: histogram(),
            timeline: Vec::new(),
            elapsed: Duration::ZERO,
            target: None,
        }
    }

    fn second(&mut self, at: Duration) -> &mut Second {
        let i = (at.as_secs() as usize).min(MAX_SECONDS - 1);
        while self.timeline.len() <= i {
            self.timeline.push(Second {
                transactions: 0,
                errors: 0,
                latency: histogram(),
            });
        }
        &mut self.timeline[i]
    }

    /// A transaction that succeeded `at` after the start and took `took`.
    pub fn ok(&mut self, at: Duration, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        self.transactions += 1;
        let _ = self.latency.record(us);
        let s = self.second(at);
        s.transactions += 1;
        let _ = s.latency.record(us);
    }

    /// An error `at` after the start.
    pub fn error(&mut self, at: Duration, what: String) {
        *self.errors.entry(what).or_default() += 1;
        self.second(at).errors += 1;
    }

    /// A connection that took `took` to open.
    pub fn connected(&mut self, took: Duration) {
        let _ = self.connect.record((took.as_micros() as u64).max(1));
    }

    /// Errors in all.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Transactions per second over the run.
    pub fn tps(&self) -> f64 {
        self.transactions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What PostgreSQL showed at one moment (`--observe`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub at: f64,
    /// Client backends of the database (the observer's own excluded).
    pub server_connections: i64,
    /// Granted relation locks in a dangerous mode.
    pub dangerous_locks: i64,
}

/// Jain's fairness index of `x` (1 = perfectly even, 1/n = one takes all); 1 for no data.
pub(crate) fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if x.is_empty() || squares == 0.0 {
        return 1.0;
    }
    sum * sum / (x.len() as f64 * squares)
}

/// The observer's query: client backends and dangerous locks of the target database.
pub(crate) const OBSERVE_SQL: &str = "SELECT
  (SELECT count(*) FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND datname = current_database() AND pid <> pg_backend_pid()),
  (SELECT count(*) FROM pg_locks
    WHERE locktype = 'relation' AND granted
      AND mode IN ('ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
      AND pid <> pg_backend_pid()),
  current_setting('max_connections')::int8";

/// One sample now (None when the query fails).
pub(crate) async fn sample(client: &tokio_postgres::Client, start: Instant) -> Option<(Sample, i64)> {
    let row = client.query_one(OBSERVE_SQL, &[]).await.ok()?;
    Some((
        Sample {
            at: start.elapsed().as_secs_f64(),
            server_connections: row.get(0),
            dangerous_locks: row.get(1),
        },
        row.get(2),
    ))
}

/// Samples PostgreSQL every `every` until `stop` says so; returns the samples and
/// PostgreSQL's max_connections.
pub(crate) async fn observe(
    client: tokio_postgres::Client,
    start: Instant,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<Sample>, Option<i64>) {
    let mut samples = Vec::new();
    let mut max = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some((s, m)) = sample(&client, start).await {
            max = Some(m);
            samples.push(s);
        }
        tokio::time::sleep(every).await;
    }
    (samples, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index() {
        assert!((jain(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-9);
        assert!((jain(&[1.0, 0.0]) - 0.5).abs() < 1e-9);
        assert_eq!(jain(&[]), 1.0);
    }

    #[test]
    fn timeline_per_second() {
        let mut r = GroupReport::new("g", 1);
        r.ok(Duration::from_millis(100), Duration::from_millis(2));
        r.ok(Duration::from_millis(2100), Duration::from_millis(4));
        r.error(Duration::from_millis(2200), "53300 too many".into());
        assert_eq!(r.timeline.len(), 3);
        assert_eq!((r.timeline[0].transactions, r.timeline[1].transactions), (1, 0));
        assert_eq!((r.timeline[2].transactions, r.timeline[2].errors), (1, 1));
        assert_eq!(r.error_count(), 1);
    }
}

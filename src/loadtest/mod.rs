//! `pgvalve loadtest`: drives groups of clients against any PostgreSQL endpoint (pgvalve,
//! PgBouncer, PostgreSQL itself) and reports, per group, what its users would feel.
//!
//! Beside the proxy flow, not part of it: the clients are tokio-postgres (independent of
//! pgvalve's own protocol code, so a shared bug cannot cancel out). Each group is one
//! identity (its application_name). Every client loops on its statement with its think time
//! until the deadline (or Ctrl-C), reconnecting after a FATAL error; latency includes any time
//! spent queued in a pooler. Scenario: `noisy-neighbor` (a greedy group of many clients in a
//! tight loop beside a polite group with think time).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio_postgres::NoTls;

/// One group of identical clients.
#[derive(Debug, Clone)]
pub struct Group {
    /// Its name, sent as application_name (so it is its own identity in pgvalve).
    pub name: String,
    /// Concurrent clients.
    pub clients: usize,
    /// What each client runs in a loop (one transaction).
    pub sql: String,
    /// Pause between two transactions of one client.
    pub think: Duration,
}

/// A load test: groups against one target for a while.
#[derive(Debug, Clone)]
pub struct Plan {
    /// postgres:// URL.
    pub target: String,
    /// The groups.
    pub groups: Vec<Group>,
    /// How long the clients run.
    pub duration: Duration,
    /// Clients of a group start spread over this long.
    pub ramp: Duration,
}

/// What one group saw.
#[derive(Debug, Clone)]
pub struct GroupReport {
    /// Group name.
    pub name: String,
    /// Its clients.
    pub clients: usize,
    /// Transactions that succeeded.
    pub transactions: u64,
    /// Errors by "SQLSTATE message" (or the client-side error).
    pub errors: BTreeMap<String, u64>,
    /// Transaction latency in microseconds (successful ones).
    pub latency: Histogram<u64>,
    /// Connect latency in microseconds.
    pub connect: Histogram<u64>,
    /// Wall time measured.
    pub elapsed: Duration,
}

impl GroupReport {
    fn new(g: &Group) -> Self {
        let h = || Histogram::new_with_bounds(1, 600_000_000, 3).expect("invariant: valid bounds");
        Self {
            name: g.name.clone(),
            clients: g.clients,
            transactions: 0,
            errors: BTreeMap::new(),
            latency: h(),
            connect: h(),
            elapsed: Duration::ZERO,
        }
    }

    /// Errors in all.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let msg: String = db.message().chars().take(100).collect();
            format!("{} {msg}", db.code().code())
        }
        None => format!("client: {e}"),
    }
}

async fn client_loop(
    cfg: tokio_postgres::Config,
    g: Group,
    report: Arc<Mutex<GroupReport>>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) {
    let record_err = |e: &tokio_postgres::Error| {
        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
        *r.errors.entry(describe(e)).or_default() += 1;
    };
    let done = || stop.load(Ordering::Relaxed) || Instant::now() >= deadline;
    while !done() {
        let t = Instant::now();
        let client = match tokio::time::timeout_at(deadline.into(), cfg.connect(NoTls)).await {
            Err(_) => return,
            Ok(Err(e)) => {
                record_err(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok((client, conn))) => {
                tokio::spawn(conn);
                let us = t.elapsed().as_micros() as u64;
                let _ = report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .connect
                    .record(us.max(1));
                client
            }
        };
        while !done() {
            let t = Instant::now();
            match tokio::time::timeout_at(deadline.into(), client.simple_query(&g.sql)).await {
                Err(_) => return,
                Ok(Ok(_)) => {
                    let us = t.elapsed().as_micros() as u64;
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    r.transactions += 1;
                    let _ = r.latency.record(us.max(1));
                }
                Ok(Err(e)) => {
                    record_err(&e);
                    if client.is_closed() {
                        break;
                    }
                }
            }
            if !g.think.is_zero() {
                tokio::time::sleep(g.think).await;
            }
        }
    }
}

/// Runs `plan` until its duration is over or `stop` is set; returns a report per group.
///
/// # Errors
/// The target is not a valid postgres:// URL.
pub async fn run(plan: &Plan, stop: Arc<AtomicBool>) -> Result<Vec<GroupReport>, String> {
    let base = tokio_postgres::Config::from_str(&plan.target).map_err(|e| format!("--target: {e}"))?;
    let start = Instant::now();
    let deadline = start + plan.duration;
    let mut tasks = Vec::new();
    let mut reports = Vec::new();
    for g in &plan.groups {
        let report = Arc::new(Mutex::new(GroupReport::new(g)));
        reports.push(report.clone());
        let mut cfg = base.clone();
        cfg.application_name(&g.name);
        for i in 0..g.clients {
            let delay = plan.ramp.mul_f64(i as f64 / g.clients.max(1) as f64);
            let (cfg, g, report, stop) = (cfg.clone(), g.clone(), report.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                client_loop(cfg, g, report, stop, deadline).await;
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    Ok(reports
        .into_iter()
        .map(|r| {
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner()).clone();
            r.elapsed = elapsed;
            r
        })
        .collect())
}

/// The noisy-neighbour plan: `greedy` clients looping on `greedy_sql` without pause beside
/// `polite` clients running `polite_sql` every `think`.
pub fn noisy_neighbor(
    target: &str,
    greedy: usize,
    polite: usize,
    duration: Duration,
    greedy_sql: &str,
    polite_sql: &str,
    think: Duration,
) -> Plan {
    Plan {
        target: target.to_string(),
        groups: vec![
            Group {
                name: "greedy".into(),
                clients: greedy,
                sql: greedy_sql.into(),
                think: Duration::ZERO,
            },
            Group {
                name: "polite".into(),
                clients: polite,
                sql: polite_sql.into(),
                think,
            },
        ],
        duration,
        ramp: Duration::from_secs(1),
    }
}

/// The report as a table, one line per group.
pub fn table(reports: &[GroupReport]) -> String {
    let mut out = format!(
        "{:<10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
        "group", "clients", "tx", "tps", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for r in reports {
        out += &format!(
            "{:<10} {:>7} {:>9} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}\n",
            r.name,
            r.clients,
            r.transactions,
            r.transactions as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.ms(0.5),
            r.ms(0.9),
            r.ms(0.99),
            r.ms(0.999),
            r.latency.max() as f64 / 1000.0,
            r.error_count()
        );
        for (e, n) in &r.errors {
            out += &format!("    {n} x {e}\n");
        }
    }
    out
}

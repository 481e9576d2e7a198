//! Two targets, one scenario: `--compare URL` (the same plan against a second endpoint in the
//! same invocation, one after the other so they do not compete) and `--ephemeral` (a
//! throwaway PostgreSQL from the test kit with pgvalve in front: the scenario through
//! pgvalve, then straight to PostgreSQL), printed side by side.
//!
//! Part of `pgvalve loadtest`.

use std::fmt::Write as _;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::plan::Plan;
use super::report::redact;
use super::run::{run, Outcome};

/// PostgreSQL's max_connections for `--ephemeral`: small, as in the outage.
pub(crate) const EPHEMERAL_MAX_CONNECTIONS: u32 = 40;
/// pgvalve's pool size for `--ephemeral`.
pub const EPHEMERAL_POOL_SIZE: u32 = 20;

/// Both runs of a comparison, labelled.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// (label, outcome), in the order run.
    pub runs: Vec<(String, Outcome)>,
}

/// Runs `plan` against `plan.target`, then against `other`.
///
/// # Errors
/// As [`run`].
pub async fn compare(
    plan: &Plan,
    other: &str,
    observe: Option<&str>,
    stop: Arc<AtomicBool>,
) -> Result<Comparison, String> {
    let a = run(plan, observe, stop.clone()).await?;
    let mut second = plan.clone();
    second.target = other.to_string();
    let b = run(&second, observe, stop).await?;
    Ok(Comparison {
        runs: vec![(redact(&plan.target), a), (redact(other), b)],
    })
}

/// Starts a throwaway PostgreSQL (max_connections [`EPHEMERAL_MAX_CONNECTIONS`]) and pgvalve
/// in front of it (transaction pooling, pool_size [`EPHEMERAL_POOL_SIZE`]), runs `plan`
/// through pgvalve and then directly, and stops both.
///
/// # Errors
/// PostgreSQL or pgvalve could not start, or a run failed.
pub async fn ephemeral(mut plan: Plan, stop: Arc<AtomicBool>) -> Result<Comparison, String> {
    use crate::testkit::{PgOptions, TestPostgres};
    let pg = TestPostgres::start(PgOptions {
        max_connections: EPHEMERAL_MAX_CONNECTIONS,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("starting a throwaway PostgreSQL: {e:#}"))?;
    let mut file = pg.file_config();
    file.pool.pool_mode = crate::config::PoolMode::Transaction;
    file.pool.pool_size = EPHEMERAL_POOL_SIZE;
    file.pool.query_wait_timeout = Duration::from_secs(60);
    file.proxy.max_client_connections = 10_000;
    let config = crate::config::Config::validate(file, "ephemeral").map_err(|e| e.to_string())?;
    let proxy = crate::ProxyHandle::start(config)
        .await
        .map_err(|e| format!("starting pgvalve: {e}"))?;
    let o = &pg.opts;
    plan.target = format!(
        "postgres://{}:{}@{}/{}",
        o.user,
        o.password,
        proxy.local_addr(),
        o.database
    );
    let direct = pg.url();
    let result = compare(&plan, &direct, Some(&direct), stop).await;
    proxy.shutdown_now().await;
    let mut c = result?;
    c.runs[0].0 = format!("pgvalve (pool_size {EPHEMERAL_POOL_SIZE})");
    c.runs[1].0 = format!("PostgreSQL directly (max_connections {EPHEMERAL_MAX_CONNECTIONS})");
    Ok(c)
}

/// One cell of the side-by-side table.
type Cell = fn(&super::GroupReport) -> String;

/// The runs side by side: per group, throughput, latency, errors; then peaks observed.
pub fn side_by_side(c: &Comparison) -> String {
    let mut out = String::new();
    for (label, o) in &c.runs {
        let _ = writeln!(out, "== {label}");
        out += &super::report::table(o);
    }
    let _ = writeln!(out, "\n== side by side");
    let _ = write!(out, "{:<10} {:<12}", "group", "");
    for (label, _) in &c.runs {
        let short: String = label.chars().take(28).collect();
        let _ = write!(out, " {short:>28}");
    }
    out.push('\n');
    let groups: Vec<&str> = c.runs[0].1.groups.iter().map(|g| g.name.as_str()).collect();
    for name in groups {
        let rows: [(&str, Cell); 4] = [
            ("tps", |g| format!("{:.0}", g.tps())),
            ("p50 ms", |g| format!("{:.2}", g.ms(0.5))),
            ("p99 ms", |g| format!("{:.2}", g.ms(0.99))),
            ("errors", |g| g.error_count().to_string()),
        ];
        for (what, f) in rows {
            let _ = write!(out, "{name:<10} {what:<12}");
            for (_, o) in &c.runs {
                let v = o.groups.iter().find(|g| g.name == name).map_or("-".to_string(), f);
                let _ = write!(out, " {v:>28}");
            }
            out.push('\n');
        }
    }
    let _ = write!(out, "{:<23}", "peak server conns");
    for (_, o) in &c.runs {
        let peak = o.samples.iter().map(|s| s.server_connections).max();
        let _ = write!(out, " {:>28}", peak.map_or("-".into(), |p| p.to_string()));
    }
    out.push('\n');
    out
}

//! `pgvalve loadtest`: reproduces surges, noisy neighbours and lock holders against any
//! PostgreSQL endpoint (pgvalve, PgBouncer, PostgreSQL itself) and reports what each client
//! identity felt.
//!
//! Beside the proxy flow, not part of it: the clients are tokio-postgres (independent of
//! pgvalve's own protocol code, so a shared bug cannot cancel out). [`plan`] says what runs
//! (scenarios and TOML scenario files), [`run`](mod@run) runs it, [`measure`] records, [`report`] and
//! [`html`] show the results (terminal table, JSON, HTML with SVG charts).

pub mod compare;
pub mod html;
pub(crate) mod measure;
pub mod plan;
pub mod report;
pub mod run;

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use measure::GroupReport;
pub use plan::{LockKind, Plan};
pub use run::{run, Outcome};

/// Scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Many clients connect within a ramp, run short transactions, disconnect; in rounds.
    Surge,
    /// A greedy group in a tight loop beside a polite group with think time.
    NoisyNeighbor,
    /// Clients hold dangerous locks while others query the same table.
    LockHolder,
    /// A pgbench-like mix at a fixed client count, optionally at a fixed arrival rate.
    Steady,
}

/// `pgvalve loadtest` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The scenario (or --file).
    #[arg(value_enum, required_unless_present = "file")]
    pub scenario: Option<Scenario>,
    /// A TOML scenario file (see config/loadtest/).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// postgres://USER:PASSWORD@HOST:PORT/DB (pgvalve, PgBouncer or PostgreSQL). Given
    /// several times (instances of one pgvalve cluster, say), each group's clients are spread
    /// across the targets and reported per target.
    #[arg(long, required_unless_present = "ephemeral")]
    pub target: Vec<String>,
    /// Also run the scenario against this second target, after the first, and print both
    /// side by side.
    #[arg(long, conflicts_with = "ephemeral")]
    pub compare: Option<String>,
    /// Start a throwaway PostgreSQL (small max_connections) and pgvalve in front of it; run
    /// the scenario through pgvalve and directly, and compare.
    #[arg(long)]
    pub ephemeral: bool,
    /// postgres:// URL straight to PostgreSQL: sample server connections and dangerous
    /// locks during the run.
    #[arg(long)]
    pub observe: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How long the clients run (per round), e.g. 20s. Surge: ramp + hold.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Clients (surge: 500; steady: 32).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Surge: clients connect within this long.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub ramp: Duration,
    /// Surge: each client stays this long; lock-holder: each lock is held this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Surge: rounds.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Surge: pause between rounds.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub pause: Duration,
    /// Surge: each client's transaction.
    #[arg(long, default_value = "SELECT 1")]
    pub sql: String,
    /// noisy-neighbor: clients of the greedy group (application_name "greedy").
    #[arg(long, default_value_t = 200)]
    pub greedy: usize,
    /// noisy-neighbor: clients of the polite group (application_name "polite").
    #[arg(long, default_value_t = 20)]
    pub polite: usize,
    /// noisy-neighbor: the greedy group's transaction, run without pause.
    #[arg(long, default_value = "SELECT pg_sleep(0.005)")]
    pub(crate) greedy_sql: String,
    /// noisy-neighbor: the polite group's transaction.
    #[arg(long, default_value = "SELECT 1")]
    pub(crate) polite_sql: String,
    /// noisy-neighbor: the polite clients' pause between transactions.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub(crate) think: Duration,
    /// lock-holder: clients taking the lock.
    #[arg(long, default_value_t = 1)]
    pub holders: usize,
    /// lock-holder: clients querying the locked table.
    #[arg(long, default_value_t = 20)]
    pub readers: usize,
    /// lock-holder: LOCK TABLE ... ACCESS EXCLUSIVE (table) or SELECT ... FOR UPDATE (rows).
    #[arg(long, default_value = "table", value_parser = ["table", "rows"])]
    pub lock: String,
    /// lock-holder and steady: the table used (created if missing).
    #[arg(long, default_value = "pgvalve_loadtest")]
    pub table: String,
    /// steady: transactions per second for all clients together (open loop; 0 = closed).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// steady: share of read-write transactions, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) write_ratio: f64,
}

impl Args {
    /// The plan these options describe.
    ///
    /// # Errors
    /// A scenario file that cannot be read or is invalid.
    pub fn plan(&self) -> Result<Plan, String> {
        if self.target.len() > 1 && (self.compare.is_some() || self.ephemeral) {
            return Err("--compare and --ephemeral take one --target".into());
        }
        let t = self.target.first().map_or("postgres://ephemeral", String::as_str);
        let d = |default: u64| self.duration.unwrap_or(Duration::from_secs(default));
        let mut p = match (&self.file, self.scenario) {
            (Some(f), _) => Plan::from_file(f)?,
            (None, Some(Scenario::Surge)) => plan::surge(
                t,
                self.clients.unwrap_or(500),
                self.ramp,
                self.hold,
                self.rounds,
                self.pause,
                &self.sql,
            ),
            (None, Some(Scenario::NoisyNeighbor)) => plan::noisy_neighbor(
                t,
                self.greedy,
                self.polite,
                d(20),
                &self.greedy_sql,
                &self.polite_sql,
                self.think,
            ),
            (None, Some(Scenario::LockHolder)) => {
                let kind = if self.lock == "rows" {
                    LockKind::Rows
                } else {
                    LockKind::Table
                };
                plan::lock_holder(t, self.holders, self.readers, d(20), self.hold, kind, &self.table)
            }
            (None, Some(Scenario::Steady)) => plan::steady(
                t,
                self.clients.unwrap_or(32),
                d(30),
                self.rate,
                self.write_ratio,
                &self.table,
            ),
            (None, None) => return Err("name a scenario or --file".into()),
        };
        p.target = t.to_string();
        p.spread(&self.target);
        if let (Some(dur), Some(_)) = (self.duration, &self.file) {
            p.duration = dur;
        }
        p.check()?;
        Ok(p)
    }
}

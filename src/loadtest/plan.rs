//! What a load test does: groups of clients, each running a script of steps as one
//! transaction, closed-loop (with think time) or open-loop at a fixed arrival rate, in one or
//! more rounds; built by a scenario ([`surge`], [`noisy_neighbor`], [`lock_holder`],
//! [`steady`]) or read from a TOML scenario file (`config/loadtest/*.toml`).
//!
//! Part of `pgvalve loadtest`; plain data, no I/O but reading the file.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// One step of a client's transaction script.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub(crate) enum Step {
    /// A statement (simple query; several separated by `;` are fine). `{rand}` becomes a
    /// random row id in 1..=rows, `{client}` the client's number.
    Sql {
        /// The SQL.
        sql: String,
    },
    /// The client waits (inside its transaction, when one is open: an idle-in-transaction
    /// lock holder).
    Sleep {
        /// How long.
        #[serde(with = "humantime_serde")]
        sleep: Duration,
    },
}

/// One group of identical clients: one identity (its application_name).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Name, sent as application_name.
    pub name: String,
    /// Concurrent clients.
    pub clients: usize,
    /// One transaction.
    pub(crate) steps: Vec<Step>,
    /// Share of transactions that run `alt_steps` instead (read-write mix), 0..=1.
    #[serde(default)]
    pub(crate) alt_ratio: f64,
    /// The other transaction of the mix.
    #[serde(default)]
    pub(crate) alt_steps: Vec<Step>,
    /// Pause between two transactions of a client (closed loop).
    #[serde(default, with = "humantime_serde")]
    pub(crate) think: Duration,
    /// Open loop: transactions per second for the whole group (0: closed loop). Latency
    /// is counted from each transaction's scheduled start, so a backlog shows.
    #[serde(default)]
    pub rate: f64,
    /// A client disconnects after this long in a round (0: at the end of the round).
    #[serde(default, with = "humantime_serde")]
    pub hold: Duration,
    /// Most transactions one client runs per round (0: no limit but time).
    #[serde(default)]
    pub(crate) max_transactions: u64,
    /// The application_name its clients send (default: `name`).
    #[serde(default)]
    pub application_name: Option<String>,
    /// Where its clients connect (default: the plan's `target`).
    #[serde(default)]
    pub target: Option<String>,
}

/// A whole load test.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Scenario name, for the report.
    #[serde(default = "custom")]
    pub scenario: String,
    /// postgres:// URL (the command line's `--target` wins).
    #[serde(default)]
    pub target: String,
    /// Length of one round.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Clients of a group start spread over this long.
    #[serde(default = "one_second", with = "humantime_serde")]
    pub ramp: Duration,
    /// Rounds.
    #[serde(default = "one")]
    pub rounds: u32,
    /// Pause between rounds.
    #[serde(default, with = "humantime_serde")]
    pub pause: Duration,
    /// Rows `{rand}` picks from.
    #[serde(default = "rows")]
    pub rows: u64,
    /// Run once before the clients start (e.g. create the table).
    #[serde(default)]
    pub setup: Vec<String>,
    /// The groups.
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
}

fn custom() -> String {
    "custom".into()
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn one() -> u32 {
    1
}
fn rows() -> u64 {
    10_000
}

impl Plan {
    /// Reads a scenario file.
    ///
    /// # Errors
    /// The file cannot be read, is not valid TOML, or describes no clients.
    pub(crate) fn from_file(path: &Path) -> Result<Plan, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let plan: Plan = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        plan.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(plan)
    }

    /// Checks the plan makes sense.
    ///
    /// # Errors
    /// What is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.groups.is_empty() || self.groups.iter().all(|g| g.clients == 0) {
            return Err("no clients: add a [[group]] with clients > 0".into());
        }
        if self.duration.is_zero() || self.rounds == 0 {
            return Err("duration and rounds must be above zero".into());
        }
        for g in &self.groups {
            if g.steps.is_empty() {
                return Err(format!("group {}: no steps", g.name));
            }
            if !(0.0..=1.0).contains(&g.alt_ratio) || (g.alt_ratio > 0.0 && g.alt_steps.is_empty()) {
                return Err(format!("group {}: alt_ratio must be in 0..=1 with alt_steps", g.name));
            }
            if g.rate < 0.0 || !g.rate.is_finite() {
                return Err(format!("group {}: rate must be >= 0", g.name));
            }
        }
        Ok(())
    }
}

impl Plan {
    /// Spreads every group's clients over `targets` (client i of a group to target i mod n,
    /// an open-loop rate in proportion): one group per (group, target), named
    /// "NAME @HOST:PORT", whose clients still send the group's application_name (so they
    /// stay one identity). `target` stays the first (setup runs there). One target: no change.
    pub fn spread(&mut self, targets: &[String]) {
        let n = targets.len();
        if n < 2 {
            return;
        }
        let mut groups = Vec::new();
        for g in &self.groups {
            for (i, t) in targets.iter().enumerate() {
                let mut s = g.clone();
                s.clients = g.clients / n + usize::from(i < g.clients % n);
                s.rate = g.rate * s.clients as f64 / g.clients.max(1) as f64;
                s.application_name = Some(g.application_name.clone().unwrap_or_else(|| g.name.clone()));
                s.name = format!("{} @{}", g.name, target_label(t));
                s.target = Some(t.clone());
                if s.clients > 0 {
                    groups.push(s);
                }
            }
        }
        self.groups = groups;
        self.target = targets[0].clone();
    }
}

/// HOST:PORT of a postgres:// URL (the URL with its password hidden if it has no such part).
pub fn target_label(url: &str) -> String {
    let after = url.split_once("://").map_or(url, |(_, r)| r);
    let host = after.rsplit_once('@').map_or(after, |(_, h)| h);
    let host = host.split(['/', '?']).next().unwrap_or(host);
    if host.is_empty() {
        super::report::redact(url)
    } else {
        host.to_string()
    }
}

fn sql(s: impl Into<String>) -> Step {
    Step::Sql { sql: s.into() }
}

fn group(name: &str, clients: usize, steps: Vec<Step>) -> Group {
    Group {
        name: name.into(),
        clients,
        steps,
        alt_ratio: 0.0,
        alt_steps: Vec::new(),
        think: Duration::ZERO,
        rate: 0.0,
        hold: Duration::ZERO,
        max_transactions: 0,
        application_name: None,
        target: None,
    }
}

fn plan(scenario: &str, target: &str, duration: Duration, groups: Vec<Group>) -> Plan {
    Plan {
        scenario: scenario.into(),
        target: target.into(),
        duration,
        ramp: Duration::from_secs(1),
        rounds: 1,
        pause: Duration::ZERO,
        rows: rows(),
        setup: Vec::new(),
        groups,
    }
}

/// The table the lock-holder and steady scenarios use.
pub(crate) fn table_setup(table: &str, rows: u64) -> Vec<String> {
    vec![
        format!("CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)"),
        format!("INSERT INTO {table} (id) SELECT g FROM generate_series(1, {rows}) g ON CONFLICT DO NOTHING"),
    ]
}

/// `surge`: `clients` connect within `ramp`, each runs short transactions (`sql`) for `hold`
/// and disconnects; `rounds` times, `pause` apart.
pub fn surge(
    target: &str,
    clients: usize,
    ramp: Duration,
    hold: Duration,
    rounds: u32,
    pause: Duration,
    sql_text: &str,
) -> Plan {
    let mut g = group("surge", clients, vec![sql(sql_text)]);
    g.hold = hold;
    let mut p = plan("surge", target, ramp + hold, vec![g]);
    p.ramp = ramp;
    p.rounds = rounds;
    p.pause = pause;
    p
}

/// `noisy-neighbor`: `greedy` clients looping on `greedy_sql` without pause beside `polite`
/// clients running `polite_sql` every `think`.
pub fn noisy_neighbor(
    target: &str,
    greedy: usize,
    polite: usize,
    duration: Duration,
    greedy_sql: &str,
    polite_sql: &str,
    think: Duration,
) -> Plan {
    let mut p = group("polite", polite, vec![sql(polite_sql)]);
    p.think = think;
    plan(
        "noisy-neighbor",
        target,
        duration,
        vec![group("greedy", greedy, vec![sql(greedy_sql)]), p],
    )
}

/// How a lock holder locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE`.
    Table,
    /// `SELECT ... FOR UPDATE` of every row.
    Rows,
}

/// `lock-holder`: `holders` clients take a dangerous lock on `table` and hold it, idle in
/// their transaction, for `hold`, again and again, while `readers` clients query the table.
pub fn lock_holder(
    target: &str,
    holders: usize,
    readers: usize,
    duration: Duration,
    hold: Duration,
    kind: LockKind,
    table: &str,
) -> Plan {
    let lock = match kind {
        LockKind::Table => format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"),
        LockKind::Rows => format!("BEGIN; SELECT id FROM {table} FOR UPDATE"),
    };
    let holder = group(
        "holder",
        holders,
        vec![sql(lock), Step::Sleep { sleep: hold }, sql("COMMIT")],
    );
    let mut reader = group(
        "reader",
        readers,
        vec![sql(format!("UPDATE {table} SET v = v + 1 WHERE id = {{rand}}"))],
    );
    reader.think = Duration::from_millis(10);
    let mut p = plan("lock-holder", target, duration, vec![holder, reader]);
    p.rows = 1000;
    p.setup = table_setup(table, p.rows);
    p
}

/// `steady`: `clients` at a fixed count on a pgbench-like table: select-only, or with
/// `write_ratio` of read-write transactions; `rate` > 0 makes arrivals open-loop.
pub fn steady(target: &str, clients: usize, duration: Duration, rate: f64, write_ratio: f64, table: &str) -> Plan {
    let mut g = group(
        "steady",
        clients,
        vec![sql(format!("SELECT v FROM {table} WHERE id = {{rand}}"))],
    );
    g.rate = rate;
    if write_ratio > 0.0 {
        g.alt_ratio = write_ratio;
        g.alt_steps = vec![sql(format!(
            "BEGIN; UPDATE {table} SET v = v + 1 WHERE id = {{rand}}; SELECT v FROM {table} WHERE id = {{rand}}; COMMIT"
        ))];
    }
    let mut p = plan("steady", target, duration, vec![g]);
    p.setup = table_setup(table, p.rows);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_files_in_config_are_valid() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/loadtest");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let p = Plan::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!p.groups.is_empty());
            n += 1;
        }
        assert!(n >= 4, "a file per scenario");
    }

    #[test]
    fn builders_make_valid_plans() {
        let t = "postgres://u:p@127.0.0.1:1/db";
        let d = Duration::from_secs(1);
        for p in [
            surge(t, 500, d, d, 2, d, "SELECT 1"),
            noisy_neighbor(t, 10, 2, d, "SELECT 1", "SELECT 1", d),
            lock_holder(t, 1, 4, d, d, LockKind::Table, "t"),
            steady(t, 8, d, 100.0, 0.1, "t"),
        ] {
            p.check().unwrap();
        }
        let bad: Result<Plan, _> = toml::from_str(
            "duration = \"1s\"\n[[group]]\nname = \"x\"\nclients = 1\nsteps = [{ sql = \"SELECT 1\", bogus = 1 }]\n",
        );
        assert!(bad.is_err(), "unknown fields are refused");
    }
}

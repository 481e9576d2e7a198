//! Console commands: parsing one command and answering it as a result table.
//!
//! Part of the admin console. Read-only `SHOW` commands for stats and admin users; anything
//! else needs an admin user (42501 otherwise). Unknown commands get 42601 pointing at
//! `SHOW HELP`.

use bytes::BytesMut;

use super::Admin;
use super::Role;
use crate::error::{sqlstate, PgError};
use crate::protocol::messages::{self, ColumnType};

use ColumnType::{Float8, Int8, Text};

/// Commands, for SHOW HELP.
const HELP: &[(&str, &str)] = &[
    ("SHOW HELP", "this list"),
    ("SHOW VERSION", "pgvalve's version"),
    (
        "SHOW LIMITS",
        "per client identity: limits, connections and waiters now, login rate, refusals by reason, surges",
    ),
    (
        "SHOW IDENTITIES",
        "per client identity: connections now, and query and transaction times of the last minute (count, p50, p99 in ms)",
    ),
    ("SHOW SURGES", "connection surge episodes, oldest first (the last 256)"),
    (
        "SHOW LOCKS",
        "locks held (other than reads) and waited for, by backend, attributed to the pgvalve client or external",
    ),
    ("SHOW LOCK_HISTORY", "ended episodes of dangerous locks, oldest first"),
    (
        "SHOW CLUSTER",
        "the instances sharing this one's [cluster] budget: slots held, in use, idle, wanted, this instance marked",
    ),
    (
        "SHOW DEADLOCKS",
        "recent deadlocks, one row per backend of the cycle: identity, application_name, lock waited for, route and statement",
    ),
    (
        "SHOW LONG_TRANSACTIONS",
        "transactions open longer than long_transaction_after (open now, then recently ended): session, identity, route, time open, state, last statement",
    ),
    (
        "SHOW CLIENTS",
        "client sessions (PgBouncer's columns, plus identity and the backend pid each one uses now)",
    ),
    (
        "SHOW POOLS",
        "pools per database and user (PgBouncer's columns, plus pool_size, paused and sv_own: slots held by pgvalve's own connections)",
    ),
    (
        "SHOW CORES",
        "each core's part of each pool: its lease of the pool's slots, open and idle server connections, lease moves",
    ),
    (
        "SHOW SERVERS",
        "server connections (PgBouncer's columns; link/client_id name the client using it, identity too)",
    ),
    (
        "SHOW STATS",
        "traffic per database: totals and per-second averages of the last 60 s (PgBouncer's columns)",
    ),
    ("SHOW DATABASES", "configured databases (PgBouncer's columns)"),
    ("SHOW USERS", "configured users (PgBouncer's columns; never a password)"),
    (
        "SHOW CONFIG",
        "settings: value, default, and whether RELOAD changes them (never a secret)",
    ),
    (
        "PAUSE [db]",
        "admin: hold new transactions of db (or all); returns when none uses a server connection",
    ),
    ("RESUME [db]", "admin: let paused clients go on"),
    (
        "RELOAD",
        "admin: read the configuration file again and apply it, or say why not",
    ),
    (
        "KILL_CLIENT id",
        "admin: close the client with that id (SHOW CLIENTS) with FATAL 57P01",
    ),
    ("SHUTDOWN", "admin: drain and stop pgvalve, as SIGTERM does"),
];

pub(super) struct Table {
    columns: Vec<(&'static str, ColumnType)>,
    pub(super) rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub(super) fn new(columns: &[(&'static str, ColumnType)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(super) fn write(&self, out: &mut BytesMut) {
        messages::row_description(&self.columns, out);
        for r in &self.rows {
            messages::data_row(r, out);
        }
        messages::command_complete("SHOW", out);
    }
}

pub(super) fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

pub(super) fn secs(d: std::time::Duration) -> Option<String> {
    s(humantime::format_duration(std::time::Duration::from_millis(
        d.as_millis() as u64,
    )))
}

pub(super) fn time(t: std::time::SystemTime) -> Option<String> {
    s(humantime::format_rfc3339_millis(t))
}

fn limits(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("identity", Text),
        ("rule", Text),
        ("clients", Int8),
        ("max_client_connections", Int8),
        ("server_connections", Int8),
        ("max_server_connections", Int8),
        ("min_server_connections", Int8),
        ("weight", Int8),
        ("waiting", Int8),
        ("max_queue", Int8),
        ("queue_timeout", Text),
        ("max_connect_rate", Float8),
        ("connect_burst", Int8),
        ("login_rate", Float8),
        ("login_rate_10s", Float8),
        ("login_rate_baseline", Float8),
        ("client_growth_1s", Int8),
        ("client_growth_10s", Int8),
        ("surging", Text),
        ("surges", Int8),
        ("logins", Int8),
        ("grants", Int8),
        ("grants_queued", Int8),
        ("refused_client_cap", Int8),
        ("refused_connect_rate", Int8),
        ("refused_queue_full", Int8),
        ("refused_server_cap", Int8),
        ("refused_queue_timeout", Int8),
        ("headroom", Text),
        ("refused_headroom", Int8),
        ("cluster_max_server_connections", Int8),
        ("cluster_grants", Int8),
        ("refused_cluster_cap", Int8),
    ]);
    for i in shared.admission.identities() {
        let (l, c) = (&i.limits, &i.counters);
        let refused = |r: &str| s(c.refused.get(r).copied().unwrap_or(0));
        t.rows.push(vec![
            s(&i.identity),
            i.rule.clone(),
            s(i.clients),
            s(l.max_clients),
            s(i.servers),
            s(l.max_servers),
            s(l.min_servers),
            s(l.weight),
            s(i.waiting),
            s(l.max_queue),
            secs(l.queue_timeout),
            s(l.connect_rate),
            s(l.connect_burst),
            s(i.login_rate),
            s(i.login_rate_10s),
            s(format!("{:.3}", i.baseline)),
            s(i.delta_1s),
            s(i.delta_10s),
            s(if i.surging { "yes" } else { "no" }),
            s(c.surges),
            s(c.admitted),
            s(c.grants),
            s(c.queued),
            refused("client_cap"),
            refused("connect_rate"),
            refused("queue_full"),
            refused("server_cap"),
            refused("queue_timeout"),
            s(l.headroom),
            refused("headroom"),
            s(l.cluster_max_servers),
            s(i.cluster_grants),
            refused("cluster_cap"),
        ]);
    }
    t
}

fn surges(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("identity", Text),
        ("started", Text),
        ("ended", Text),
        ("trigger", Text),
        ("login_rate", Float8),
        ("client_growth_10s", Int8),
        ("login_rate_baseline", Float8),
        ("peak_login_rate", Float8),
        ("peak_client_growth_10s", Int8),
        ("top_routes", Text),
    ]);
    let routes = shared.locks.surge_routes();
    for e in shared.admission.surges() {
        t.rows.push(vec![
            s(&e.identity),
            time(e.started),
            e.ended.and_then(time),
            s(e.trigger),
            s(e.rate),
            s(e.delta),
            s(format!("{:.3}", e.baseline)),
            s(e.peak_rate),
            s(e.peak_delta),
            Some(routes.top(&e.identity, e.started).join(", ")).filter(|r| !r.is_empty()),
        ]);
    }
    t
}

fn locks(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("pid", Int8),
        ("source", Text),
        ("session_id", Int8),
        ("identity", Text),
        ("user", Text),
        ("application_name", Text),
        ("client_addr", Text),
        ("state", Text),
        ("relation", Text),
        ("locktype", Text),
        ("mode", Text),
        ("granted", Text),
        ("dangerous", Text),
        ("held_seconds", Float8),
        ("xact_age_seconds", Float8),
        ("blocks", Int8),
        ("blocks_total", Int8),
        ("route", Text),
        ("controller", Text),
        ("action", Text),
        ("traceparent", Text),
        ("query", Text),
    ]);
    for l in &shared.locks.state().current {
        let (r, sess) = (&l.row, l.session.as_ref());
        t.rows.push(vec![
            s(r.pid),
            s(if sess.is_some() { "pgvalve" } else { "external" }),
            sess.map(|x| x.id.to_string()),
            s(sess.map_or("external".to_string(), |x| x.client.identity.to_string())),
            s(&r.user),
            s(sess.map_or(r.application_name.clone(), |x| x.client.application_name.clone())),
            s(sess.map_or(r.addr.clone(), |x| x.client.addr.to_string())),
            s(&r.state),
            r.relation.clone(),
            s(&r.locktype),
            s(&r.mode),
            s(if r.granted { "yes" } else { "no" }),
            s(if l.dangerous { "yes" } else { "no" }),
            s(format!("{:.1}", l.held.as_secs_f64())),
            r.xact_age.map(|a| format!("{a:.1}")),
            s(l.blocks),
            s(l.blocks_total),
            r.tags.route.clone(),
            r.tags.controller.clone(),
            r.tags.action.clone(),
            r.tags.traceparent.clone(),
            s(&r.query),
        ]);
    }
    t
}

/// PgBouncer's columns of SHOW CLIENTS and SHOW SERVERS (the same list for both).
pub(super) const CONNECTION_COLUMNS: &[(&str, ColumnType)] = &[
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("replication", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int8),
    ("local_addr", Text),
    ("local_port", Int8),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int8),
    ("wait_us", Int8),
    ("close_needed", Int8),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int8),
    ("tls", Text),
    ("application_name", Text),
    ("prepared_statements", Int8),
    ("id", Int8),
];

fn clients(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[CONNECTION_COLUMNS, &[("identity", Text), ("backend_pid", Int8)]].concat());
    for c in shared.sessions.all() {
        let backend = c.backend();
        t.rows.push(vec![
            s("C"),
            s(&c.client.user),
            s(&c.client.database),
            s("none"),
            s(if backend.is_some() { "active" } else { "idle" }),
            s(c.client.addr.ip()),
            s(c.client.addr.port()),
            c.client.local.map(|l| l.ip().to_string()),
            c.client.local.map(|l| l.port().to_string()),
            time(c.connected),
            c.backend_since().and_then(time),
            s(0),
            s(0),
            s(0),
            s(format!("{:x}", c.id)),
            // SHOW SERVERS' ptr of the server connection it uses (its backend pid in hex).
            backend.map(|p| format!("{p:x}")),
            s(0),
            s(""),
            s(&c.client.application_name),
            s(0),
            s(c.id),
            s(&c.client.identity),
            backend.map(|p| p.to_string()),
        ]);
    }
    t
}

fn lock_history(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("identity", Text),
        ("session_id", Int8),
        ("pid", Int8),
        ("client_addr", Text),
        ("relation", Text),
        ("mode", Text),
        ("started", Text),
        ("ended", Text),
        ("held_seconds", Float8),
        ("max_blocked", Int8),
        ("ended_by", Text),
        ("route", Text),
        ("controller", Text),
        ("action", Text),
        ("traceparent", Text),
        ("query", Text),
    ]);
    for e in &shared.locks.state().history {
        let held = e
            .ended
            .and_then(|end| end.duration_since(e.started).ok())
            .unwrap_or_default();
        t.rows.push(vec![
            s(&e.identity),
            e.session_id.map(|i| i.to_string()),
            s(e.pid),
            s(&e.addr),
            s(&e.relation),
            s(&e.mode),
            time(e.started),
            e.ended.and_then(time),
            s(format!("{:.1}", held.as_secs_f64())),
            s(e.max_blocked),
            s(&e.ended_by),
            e.tags.route.clone(),
            e.tags.controller.clone(),
            e.tags.action.clone(),
            e.tags.traceparent.clone(),
            s(&e.query),
        ]);
    }
    t
}

/// The instances of this one's cluster as its coordinator last saw them (no row without a
/// `[cluster]`).
fn cluster(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("cluster", Text),
        ("instance", Text),
        ("coordination_pid", Int8),
        ("slots_held", Int8),
        ("in_use", Int8),
        ("idle", Int8),
        ("wanted", Int8),
        ("this", Text),
        ("connected", Text),
        ("last_round", Text),
        ("address", Text),
    ]);
    let Some(c) = shared.pools.cluster() else {
        return t;
    };
    let v = c.view();
    for p in &v.peers {
        t.rows.push(vec![
            s(&c.settings().name),
            s(&p.id),
            s(p.pid),
            s(p.held),
            s(p.in_use),
            s(p.idle),
            s(p.in_use + p.waiting),
            s(if p.me { "yes" } else { "" }),
            s(if p.me { v.connected } else { true }),
            v.last_round.and_then(time),
            p.addr.clone(),
        ]);
    }
    t
}

/// Answers one command into `out`.
///
/// # Errors
/// What the client is told: 42601 for an unknown command, 42501 for a command the user may
/// not run.
pub(super) fn command(shared: &Admin<'_>, role: Role, command: &str, out: &mut BytesMut) -> Result<(), PgError> {
    let words: Vec<String> = command.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let table = match words.as_slice() {
        ["SHOW", "HELP"] => {
            let mut t = Table::new(&[("command", Text), ("description", Text)]);
            t.rows = HELP.iter().map(|(c, d)| vec![s(c), s(d)]).collect();
            t
        }
        ["SHOW", "VERSION"] => {
            let mut t = Table::new(&[("version", Text)]);
            t.rows.push(vec![s(concat!("pgvalve ", env!("CARGO_PKG_VERSION")))]);
            t
        }
        ["SHOW", "LIMITS"] => limits(shared),
        ["SHOW", "IDENTITIES"] => super::identities::identities(shared),
        ["SHOW", "SURGES"] => surges(shared),
        ["SHOW", "LOCKS"] => locks(shared),
        ["SHOW", "LOCK_HISTORY"] => lock_history(shared),
        ["SHOW", "CLUSTER"] => cluster(shared),
        ["SHOW", "DEADLOCKS"] => super::forensics::deadlocks(shared),
        ["SHOW", "LONG_TRANSACTIONS"] => super::forensics::long_transactions(shared),
        ["SHOW", "CLIENTS"] => clients(shared),
        ["SHOW", "POOLS"] => super::pgbouncer::pools(shared),
        ["SHOW", "SERVERS"] => super::pgbouncer::servers(shared),
        ["SHOW", "CORES"] => cores(shared),
        ["SHOW", "STATS"] => super::pgbouncer::stats(shared),
        ["SHOW", "DATABASES"] => super::pgbouncer::databases(shared),
        ["SHOW", "USERS"] => super::pgbouncer::users(shared),
        ["SHOW", "CONFIG"] => super::pgbouncer::config(shared),
        [first, ..] if *first != "SHOW" && role == Role::Stats => {
            return Err(PgError::error(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                format!("pgvalve: {first} needs an admin user (admin_users); stats users may only SHOW"),
            ))
        }
        _ => {
            return Err(PgError::error(
                sqlstate::SYNTAX_ERROR,
                format!("pgvalve console: unknown command {command:?}"),
            )
            .with_hint("SHOW HELP lists the commands."))
        }
    };
    table.write(out);
    Ok(())
}

/// SHOW CORES: each core's part of each pool.
fn cores(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("core", Int8),
        ("lease", Int8),
        ("sv_open", Int8),
        ("sv_idle", Int8),
        ("moves", Int8),
    ]);
    for c in shared.pools.core_stats() {
        t.rows.push(vec![
            s(&c.key.database),
            s(&c.key.user),
            s(c.core),
            s(c.lease),
            s(c.open),
            s(c.idle),
            s(c.moves),
        ]);
    }
    t
}

//! The console's PgBouncer-compatible tables: SHOW POOLS, SERVERS, STATS, DATABASES, USERS
//! and CONFIG, with PgBouncer's column names and meanings (so pgbouncer_exporter and
//! people's psql habits keep working) plus pgvalve's own columns at the end.
//!
//! Part of the admin console; reads the pools, admission, the session registry and the
//! live configuration. Columns PgBouncer has for features pgvalve lacks (replication,
//! reserve pools, load balancing) are there with the value that is true for pgvalve (none,
//! 0); a figure pgvalve does not track is NULL, never a made-up number.

use std::collections::BTreeMap;
use std::time::Duration;

use super::show::{s, secs, time, Table};
use super::Admin;
use crate::config::Config;
use crate::protocol::messages::ColumnType::{Int8, Text};
use crate::server::version;

/// Sessions per (database, user): (clients, clients holding a server connection).
fn clients_per_pool(shared: &Admin<'_>) -> BTreeMap<(String, String), (u64, u64)> {
    let mut m: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for c in shared.sessions.all() {
        let e = m.entry((c.client.database.clone(), c.client.user.clone())).or_default();
        e.0 += 1;
        e.1 += u64::from(c.backend().is_some());
    }
    m
}

pub(super) fn pools(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int8),
        ("cl_waiting", Int8),
        ("cl_active_cancel_req", Int8),
        ("cl_waiting_cancel_req", Int8),
        ("sv_active", Int8),
        ("sv_active_cancel", Int8),
        ("sv_being_canceled", Int8),
        ("sv_idle", Int8),
        ("sv_used", Int8),
        ("sv_tested", Int8),
        ("sv_login", Int8),
        ("maxwait", Int8),
        ("maxwait_us", Int8),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("pool_size", Int8),
        ("paused", Int8),
        ("sv_own", Int8),
    ]);
    let config = shared.config();
    let clients = clients_per_pool(shared);
    for p in shared.pools.stats() {
        let (db, user) = (&p.key.database, &p.key.user);
        let (waiting, maxwait) = shared
            .pools
            .gates(db, user)
            .iter()
            .map(|g| shared.admission.gate(g))
            .fold((0, Duration::ZERO), |(w, m), (_, gw, gm)| (w + gw, m.max(gm)));
        let (n, _) = clients.get(&(db.clone(), user.clone())).copied().unwrap_or_default();
        let mode = config.route(db, user).map(|r| r.pool_mode.to_string());
        t.rows.push(vec![
            s(db),
            s(user),
            s(n.saturating_sub(u64::from(waiting))),
            s(waiting),
            s(0),
            s(0),
            s(p.open.saturating_sub(p.idle)),
            s(0),
            s(0),
            s(p.idle),
            s(0),
            s(0),
            s(0),
            s(maxwait.as_secs()),
            s(maxwait.subsec_micros()),
            mode,
            None,
            s(p.pool_size),
            s(u8::from(shared.pauses.is_paused(db))),
            s(p.own),
        ]);
    }
    t
}

pub(super) fn servers(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(
        &[
            super::show::CONNECTION_COLUMNS,
            &[("client_id", Int8), ("identity", Text), ("protocol", Text)],
        ]
        .concat(),
    );
    let config = shared.config();
    let split = |addr: &str| match addr.rsplit_once(':') {
        Some((h, p)) => (s(h), s(p)),
        None => (s(addr), None),
    };
    for c in shared.sessions.all() {
        let Some(pid) = c.backend() else { continue };
        let route = config.route(&c.client.database, &c.client.user);
        t.rows.push(vec![
            s("S"),
            s(&c.client.user),
            s(&c.client.database),
            s("none"),
            s("active"),
            route.as_ref().map(|r| r.host.clone()),
            route.as_ref().map(|r| r.port.to_string()),
            None,
            None,
            None,
            c.backend_since().and_then(time),
            s(0),
            s(0),
            s(0),
            s(format!("{pid:x}")),
            s(format!("{:x}", c.id)),
            s(pid),
            s(""),
            s(&c.client.application_name),
            None,
            s(pid),
            s(c.id),
            s(&c.client.identity),
            s(version::label(c.backend_minor())),
        ]);
    }
    for (key, pid, addr, opened, idle_since, minor) in shared.pools.idle_connections() {
        let (host, port) = split(&addr);
        t.rows.push(vec![
            s("S"),
            s(&key.user),
            s(&key.database),
            s("none"),
            s("idle"),
            host,
            port,
            None,
            None,
            time(opened),
            time(idle_since),
            s(0),
            s(0),
            s(0),
            s(format!("{pid:x}")),
            None,
            s(pid),
            s(""),
            None,
            None,
            s(pid),
            None,
            None,
            s(version::label(minor)),
        ]);
    }
    t
}

pub(super) fn stats(shared: &Admin<'_>) -> Table {
    use crate::pool::stats::Totals;
    let mut t = Table::new(&[
        ("database", Text),
        ("total_server_assignment_count", Int8),
        ("total_xact_count", Int8),
        ("total_query_count", Int8),
        ("total_received", Int8),
        ("total_sent", Int8),
        ("total_xact_time", Int8),
        ("total_query_time", Int8),
        ("total_wait_time", Int8),
        ("total_client_parse_count", Int8),
        ("total_server_parse_count", Int8),
        ("total_bind_count", Int8),
        ("avg_server_assignment_count", Int8),
        ("avg_xact_count", Int8),
        ("avg_query_count", Int8),
        ("avg_recv", Int8),
        ("avg_sent", Int8),
        ("avg_xact_time", Int8),
        ("avg_query_time", Int8),
        ("avg_wait_time", Int8),
        ("avg_client_parse_count", Int8),
        ("avg_server_parse_count", Int8),
        ("avg_bind_count", Int8),
    ]);
    // PgBouncer reports per database: sum the pools of each.
    let mut per_db: BTreeMap<String, (Totals, Totals, Duration)> = BTreeMap::new();
    for (key, total) in shared.pools.stats.totals() {
        let e = per_db.entry(key.database.clone()).or_default();
        e.0.add(&total);
        if let Some((d, span)) = shared.pools.stats.last_period(&key) {
            e.1.add(&d);
            e.2 = span;
        }
    }
    for (db, (total, last, span)) in per_db {
        let per_sec = |n: u64| s((n as f64 / span.as_secs_f64().max(1.0)).round() as u64);
        let per = |us: u64, n: u64| s(us.checked_div(n).unwrap_or(0));
        t.rows.push(vec![
            s(&db),
            s(total.server_assignments),
            s(total.xacts),
            s(total.queries),
            s(total.received),
            s(total.sent),
            s(total.xact_us),
            s(total.query_us),
            s(total.wait_us),
            s(total.parses),
            None,
            s(total.binds),
            per_sec(last.server_assignments),
            per_sec(last.xacts),
            per_sec(last.queries),
            per_sec(last.received),
            per_sec(last.sent),
            per(last.xact_us, last.xacts),
            per(last.query_us, last.queries),
            per(last.wait_us, last.server_assignments),
            per_sec(last.parses),
            None,
            per_sec(last.binds),
        ]);
    }
    t
}

pub(super) fn databases(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int8),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int8),
        ("min_pool_size", Int8),
        ("reserve_pool_size", Int8),
        ("server_lifetime", Int8),
        ("pool_mode", Text),
        ("load_balance_hosts", Text),
        ("max_connections", Int8),
        ("current_connections", Int8),
        ("max_client_connections", Int8),
        ("current_client_connections", Int8),
        ("paused", Int8),
        ("disabled", Int8),
    ]);
    let config = shared.config();
    let pools = shared.pools.stats();
    let clients = clients_per_pool(shared);
    for (name, d) in &config.databases {
        let servers: usize = pools.iter().filter(|p| &p.key.database == name).map(|p| p.open).sum();
        let cl: u64 = clients.iter().filter(|((db, _), _)| db == name).map(|(_, v)| v.0).sum();
        t.rows.push(vec![
            s(name),
            s(&d.host),
            s(d.port),
            s(d.dbname.clone().unwrap_or_else(|| name.clone())),
            None,
            s(d.pool_size.unwrap_or(config.pool.pool_size)),
            s(0),
            s(0),
            s(config.pool.server_lifetime.as_secs()),
            s(d.pool_mode.unwrap_or(config.pool.pool_mode)),
            None,
            s(0),
            s(servers),
            s(0),
            s(cl),
            s(u8::from(shared.pauses.is_paused(name))),
            s(0),
        ]);
    }
    t
}

pub(super) fn users(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("name", Text),
        ("pool_size", Int8),
        ("reserve_pool_size", Int8),
        ("pool_mode", Text),
        ("max_user_connections", Int8),
        ("current_connections", Int8),
        ("max_user_client_connections", Int8),
        ("current_client_connections", Int8),
    ]);
    let config = shared.config();
    let pools = shared.pools.stats();
    let clients = clients_per_pool(shared);
    for (name, u) in &config.users {
        let servers: usize = pools.iter().filter(|p| &p.key.user == name).map(|p| p.open).sum();
        let cl: u64 = clients.iter().filter(|((_, us), _)| us == name).map(|(_, v)| v.0).sum();
        t.rows.push(vec![
            s(name),
            u.pool_size.map(|n| n.to_string()),
            s(0),
            u.pool_mode.map(|m| m.to_string()),
            s(0),
            s(servers),
            s(0),
            s(cl),
        ]);
    }
    t
}

/// `SHOW CONFIG`: every setting with its value, default, and whether RELOAD changes it.
/// Passwords and verifiers are never listed.
pub(super) fn config(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[("key", Text), ("value", Text), ("default", Text), ("changeable", Text)]);
    let c = shared.config();
    let d = Config::default_settings();
    let now = settings(&c);
    for ((key, value, live), (_, default, _)) in now.into_iter().zip(settings(&d)) {
        t.rows
            .push(vec![s(key), s(value), s(default), s(if live { "yes" } else { "no" })]);
    }
    t
}

/// (key, value, changeable by RELOAD).
fn settings(c: &Config) -> Vec<(&'static str, String, bool)> {
    let (p, q, l) = (&c.proxy, &c.pool, &c.locks);
    let d = |x: Duration| secs(x).unwrap_or_default();
    let list = |v: &[String]| v.join(",");
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        ("listen", p.listen.clone(), false),
        ("max_client_connections", p.max_client_connections.to_string(), false),
        ("client_login_timeout", d(p.client_login_timeout), true),
        ("auth_type", format!("{:?}", p.auth_type), true),
        ("max_message_size", p.max_message_size.0.to_string(), true),
        ("max_startup_packet_size", p.max_startup_packet_size.to_string(), true),
        ("shutdown_timeout", d(p.shutdown_timeout), true),
        ("worker_threads", p.worker_threads.to_string(), false),
        (
            "session_threads",
            p.session_threads.map_or_else(|| "auto".to_string(), |n| n.to_string()),
            false,
        ),
        ("pool_mode", q.pool_mode.to_string(), true),
        ("pool_size", q.pool_size.to_string(), true),
        ("max_server_connections", c.max_server_connections().to_string(), true),
        (
            "max_server_connections_source",
            c.server_budget.as_ref().map(|b| b.source.clone()).unwrap_or_default(),
            true,
        ),
        ("query_wait_timeout", d(q.query_wait_timeout), true),
        ("server_connect_timeout", d(q.server_connect_timeout), true),
        ("server_reset_query", q.server_reset_query.clone(), true),
        ("server_check_delay", d(q.server_check_delay), true),
        ("server_login_retry", d(q.server_login_retry), true),
        ("server_idle_timeout", d(q.server_idle_timeout), true),
        ("server_lifetime", d(q.server_lifetime), true),
        ("query_timeout", d(q.query_timeout), true),
        ("idle_transaction_timeout", d(q.idle_transaction_timeout), true),
        ("transaction_timeout", d(q.transaction_timeout), true),
        ("max_prepared_statements", q.max_prepared_statements.to_string(), true),
        ("track_parameters", list(&q.track_parameters), true),
        ("auth_user", p.auth_user.clone().unwrap_or_default(), true),
        ("auth_query", p.auth_query.clone(), true),
        ("auth_dbname", p.auth_dbname.clone().unwrap_or_default(), true),
        ("auth_cache_ttl", d(p.auth_cache_ttl), true),
        ("auth_failure_limit", p.auth_failure_limit.to_string(), true),
        ("proxy_protocol_trusted", p.proxy_protocol_trusted.to_string(), true),
        ("hba_file", path(&p.hba_file), true),
        ("ident_file", path(&p.ident_file), true),
        ("client_tls_mode", c.tls.client.mode.to_string(), true),
        ("client_tls_cert_file", path(&c.tls_settings.client_tls_cert_file), true),
        ("client_tls_key_file", path(&c.tls_settings.client_tls_key_file), true),
        ("server_tls_mode", c.tls.server.mode.to_string(), true),
        ("server_tls_ca_file", path(&c.tls_settings.server_tls_ca_file), true),
        ("client_tls_ca_file", path(&c.tls_settings.client_tls_ca_file), true),
        ("admin_users", list(&c.admin.admin_users), true),
        ("stats_users", list(&c.admin.stats_users), true),
        ("locks.enabled", l.enabled.to_string(), false),
        ("locks.poll_interval", d(l.poll_interval), true),
        ("locks.warn_after", d(l.warn_after), true),
        ("locks.long_transaction_after", d(l.long_transaction_after), true),
        ("locks.dangerous_modes", list(&l.dangerous_modes), true),
        (
            "http.listen",
            c.http_listen.map(|a| a.to_string()).unwrap_or_default(),
            false,
        ),
    ]
}

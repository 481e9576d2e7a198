//! `[pgbouncer]`: each PgBouncer setting mapped to its pgvalve setting, or noted with the
//! reason it is not. Settings that depend on others (listen address, auth, TLS modes, the
//! per-user and per-database caps) are read here and applied by [`super::pools`] or below.
//!
//! Part of `import`. The table [`GLOBAL`] lists every PgBouncer setting; one not in it is
//! noted as unknown, never dropped.

use std::collections::BTreeMap;

use super::emit::Draft;
use super::ini::{At, Entry, ImportError};
use super::values::{self, count, duration, millis};

/// What becomes of one `[pgbouncer]` setting.
#[derive(Debug, Clone, Copy)]
enum Map {
    /// A whole number: `[table] key`.
    Count(&'static str, &'static str),
    /// A time: `[table] key`; 0 means the same in both (`None`) or not (`Some(why)`).
    Time(&'static str, &'static str, Option<&'static str>),
    /// Text as it is: `[table] key`.
    Text(&'static str, &'static str),
    /// Read by a function of its own (after every setting is known).
    Later,
    /// Not mapped, for this reason.
    No(&'static str),
}

const LOGS: &str = "pgvalve logs to stderr (text, or --log-format json; the level with PGVALVE_LOG); under systemd the journal keeps it";
const SOCKET: &str = "pgvalve's socket options are not configurable";
const TLS_OPTS: &str =
    "pgvalve uses rustls' safe defaults (TLS 1.2 and 1.3, modern ciphers and curves); not configurable";
const UNIX: &str = "pgvalve listens on TCP only ([proxy] listen); unix_socket_dir is still used as the server host of databases without host=";

/// Every `[pgbouncer]` setting of PgBouncer 1.24.
const GLOBAL: &[(&str, Map)] = &[
    ("listen_addr", Map::Later),
    ("listen_port", Map::Later),
    ("pool_mode", Map::Later),
    ("auth_type", Map::Later),
    ("auth_file", Map::Later),
    ("auth_user", Map::Later),
    ("auth_query", Map::Later),
    ("auth_dbname", Map::Later),
    ("admin_users", Map::Later),
    ("stats_users", Map::Later),
    ("client_tls_sslmode", Map::Later),
    ("server_tls_sslmode", Map::Later),
    ("max_packet_size", Map::Later),
    ("reserve_pool_size", Map::Later),
    ("reserve_pool_timeout", Map::Later),
    ("max_db_connections", Map::Later),
    ("max_user_connections", Map::Later),
    ("max_db_client_connections", Map::Later),
    ("max_user_client_connections", Map::Later),
    ("unix_socket_dir", Map::Later),
    ("max_client_conn", Map::Count("proxy", "max_client_connections")),
    ("default_pool_size", Map::Count("pool", "pool_size")),
    ("max_prepared_statements", Map::Count("pool", "max_prepared_statements")),
    ("server_reset_query", Map::Text("pool", "server_reset_query")),
    ("client_tls_cert_file", Map::Text("tls", "client_tls_cert_file")),
    ("client_tls_key_file", Map::Text("tls", "client_tls_key_file")),
    ("server_tls_ca_file", Map::Text("tls", "server_tls_ca_file")),
    ("server_lifetime", Map::Time("pool", "server_lifetime", Some("0 means each server connection is used once in PgBouncer and never closed for age in pgvalve; set server_lifetime to a small value instead"))),
    ("server_idle_timeout", Map::Time("pool", "server_idle_timeout", None)),
    ("server_connect_timeout", Map::Time("pool", "server_connect_timeout", Some("0 is not a usable connect timeout in pgvalve"))),
    ("server_login_retry", Map::Time("pool", "server_login_retry", Some("pgvalve always waits at least 100 ms before connecting again to a server that failed"))),
    ("server_check_delay", Map::Time("pool", "server_check_delay", None)),
    ("client_login_timeout", Map::Time("proxy", "client_login_timeout", Some("0 (no login timeout) is not offered: pgvalve bounds every login"))),
    ("query_timeout", Map::Time("pool", "query_timeout", None)),
    ("query_wait_timeout", Map::Time("pool", "query_wait_timeout", Some("0 (wait forever) is not offered: pgvalve bounds every wait; its default (120s) is kept"))),
    ("query_wait_notify", Map::Time("admission", "queue_notice_after", None)),
    ("idle_transaction_timeout", Map::Time("pool", "idle_transaction_timeout", None)),
    ("transaction_timeout", Map::Time("pool", "transaction_timeout", None)),
    ("logfile", Map::No(LOGS)),
    ("syslog", Map::No(LOGS)),
    ("syslog_ident", Map::No(LOGS)),
    ("syslog_facility", Map::No(LOGS)),
    ("log_connections", Map::No(LOGS)),
    ("log_disconnections", Map::No(LOGS)),
    ("log_pooler_errors", Map::No(LOGS)),
    ("log_stats", Map::No("statistics are at /metrics ([http] listen) and in SHOW STATS")),
    ("verbose", Map::No(LOGS)),
    ("stats_period", Map::No("statistics are at /metrics ([http] listen) and in SHOW STATS")),
    ("pidfile", Map::No("pgvalve does not daemonize; systemd (deploy/systemd/pgvalve.service) tracks it")),
    ("user", Map::No("run pgvalve as that user (User= in deploy/systemd/pgvalve.service)")),
    ("unix_socket_mode", Map::No(UNIX)),
    ("unix_socket_group", Map::No(UNIX)),
    ("min_pool_size", Map::No("pgvalve opens server connections on demand and keeps them until server_idle_timeout")),
    ("server_round_robin", Map::No("pgvalve picks server connections in its own order")),
    ("track_extra_parameters", Map::No("pgvalve re-applies every startup parameter a client sent on each server connection it gets")),
    ("ignore_startup_parameters", Map::No("pgvalve passes the startup parameters clients send (options, extra_float_digits, ...) to PostgreSQL instead of refusing them")),
    ("peer_id", Map::No("pgvalve has no peer list")),
    ("disable_pqexec", Map::No("not supported: the simple query protocol is always allowed")),
    ("application_name_add_host", Map::No("pgvalve keeps application_name as sent; the client address is in SHOW CLIENTS and can name identities ([[identity]] source)")),
    ("conffile", Map::No("the config file is the one given with -c")),
    ("service_name", Map::No("Windows only")),
    ("job_name", Map::No("Windows only")),
    ("server_reset_query_always", Map::No("pgvalve resets a server connection after a session (session mode) or a pinned session (transaction mode), never after a plain transaction")),
    ("server_check_query", Map::No("pgvalve checks an idle server connection with a non-blocking read, not a query")),
    ("server_fast_close", Map::No("not supported")),
    ("autodb_idle_timeout", Map::No("pools of databases reached through \"*\" close idle server connections after server_idle_timeout like every pool")),
    ("dns_max_ttl", Map::No("pgvalve resolves host names with the system resolver at each connect")),
    ("dns_nxdomain_ttl", Map::No("pgvalve resolves host names with the system resolver at each connect")),
    ("dns_zone_check_period", Map::No("pgvalve resolves host names with the system resolver at each connect")),
    ("resolv_conf", Map::No("pgvalve resolves host names with the system resolver at each connect")),
    ("cancel_wait_timeout", Map::No("not configurable")),
    ("client_idle_timeout", Map::No("not supported: an idle client holds no server connection in transaction mode; idle_transaction_timeout ends idle transactions")),
    ("suspend_timeout", Map::No("no SUSPEND or online restart: pgvalve drains on SIGTERM within [proxy] shutdown_timeout")),
    ("pkt_buf", Map::No(SOCKET)),
    ("sbuf_loopcnt", Map::No(SOCKET)),
    ("listen_backlog", Map::No(SOCKET)),
    ("so_reuseport", Map::No("pgvalve uses every core in one process (worker_threads)")),
    ("tcp_defer_accept", Map::No(SOCKET)),
    ("tcp_socket_buffer", Map::No(SOCKET)),
    ("tcp_keepalive", Map::No(SOCKET)),
    ("tcp_keepcnt", Map::No(SOCKET)),
    ("tcp_keepidle", Map::No(SOCKET)),
    ("tcp_keepintvl", Map::No(SOCKET)),
    ("tcp_user_timeout", Map::No(SOCKET)),
    ("client_tls_ca_file", Map::Text("tls", "client_tls_ca_file")),
    ("client_tls_protocols", Map::No(TLS_OPTS)),
    ("client_tls_ciphers", Map::No(TLS_OPTS)),
    ("client_tls13_ciphers", Map::No(TLS_OPTS)),
    ("client_tls_ecdhcurve", Map::No(TLS_OPTS)),
    ("client_tls_dheparams", Map::No(TLS_OPTS)),
    ("server_tls_protocols", Map::No(TLS_OPTS)),
    ("server_tls_ciphers", Map::No(TLS_OPTS)),
    ("server_tls13_ciphers", Map::No(TLS_OPTS)),
    ("server_tls_cert_file", Map::No("pgvalve does not present a client certificate to PostgreSQL")),
    ("server_tls_key_file", Map::No("pgvalve does not present a client certificate to PostgreSQL")),
    ("auth_hba_file", Map::Later),
    ("auth_ident_file", Map::Later),
    ("scram_iterations", Map::No("verifiers printed by `pgvalve passwd` use 4096 iterations, as PostgreSQL's")),
];

/// The `[pgbouncer]` settings as written (the last of a repeated one wins, as in PgBouncer).
pub type Globals = BTreeMap<String, Entry>;

/// Maps the simple settings into `d` and notes the unmapped ones; returns every setting
/// for the functions that read the rest.
///
/// # Errors
/// A value of the wrong kind, naming its line.
pub fn map(entries: &[Entry], d: &mut Draft) -> Result<Globals, ImportError> {
    let mut g = Globals::new();
    for e in entries.iter().filter(|e| e.section == "pgbouncer") {
        g.insert(e.key.clone(), e.clone());
    }
    for e in g.values() {
        let from = format!("{} ({})", e.key, e.at);
        match GLOBAL.iter().find(|(k, _)| *k == e.key).map(|&(_, m)| m) {
            None => d.note(Some(&e.at), &e.key, "not a PgBouncer setting pgvalve knows"),
            Some(Map::Later) => {}
            Some(Map::No(why)) => d.note(
                Some(&e.at),
                format!("{} = {}", e.key, values::shown(&e.key, &e.value)),
                why,
            ),
            Some(Map::Count(t, k)) => {
                let n = count(&e.value, &e.key, &e.at)?;
                d.set(t, k, i64::from(n), from);
            }
            Some(Map::Text(t, k)) => d.set(t, k, e.value.clone(), from),
            Some(Map::Time(t, k, zero)) => {
                let ms = millis(&e.value, &e.key, &e.at)?;
                match (ms, zero) {
                    (0, Some(why)) => d.note(Some(&e.at), format!("{} = {}", e.key, e.value), why),
                    _ => d.set(t, k, duration(ms), from),
                }
            }
        }
    }
    Ok(g)
}

/// `listen_addr` and `listen_port` as `[proxy] listen`.
pub fn listen(g: &Globals, d: &mut Draft) -> Result<(), ImportError> {
    let port_at = g
        .get("listen_port")
        .map_or(String::new(), |e| format!(", listen_port ({})", e.at));
    let port = match g.get("listen_port") {
        Some(e) => {
            let p = count(&e.value, "listen_port", &e.at)?;
            u16::try_from(p).map_err(|_| ImportError::line(&e.at, format!("listen_port: {p} is not a port")))?
        }
        None => 6432,
    };
    let Some(e) = g.get("listen_addr") else {
        d.set(
            "proxy",
            "listen",
            format!("127.0.0.1:{port}"),
            format!("listen_addr not set{port_at}"),
        );
        d.note(
            None,
            "listen_addr (not set)",
            "PgBouncer listened on a Unix socket only; pgvalve listens on TCP, here on 127.0.0.1",
        );
        return Ok(());
    };
    let addrs = values::list(&e.value);
    let first = addrs.first().map(String::as_str).unwrap_or("*");
    let ip = match first {
        "*" => "0.0.0.0".to_string(),
        "localhost" => "127.0.0.1".to_string(),
        a => a.trim_matches(['[', ']']).to_string(),
    };
    let listen = match ip.parse::<std::net::IpAddr>() {
        Ok(a) => std::net::SocketAddr::new(a, port).to_string(),
        Err(_) => {
            d.note(
                Some(&e.at),
                format!("listen_addr = {first}"),
                "pgvalve listens on an IP address, not a host name: 127.0.0.1 is used; give the address",
            );
            format!("127.0.0.1:{port}")
        }
    };
    d.set("proxy", "listen", listen, format!("listen_addr ({}){port_at}", e.at));
    if addrs.len() > 1 {
        d.note(
            Some(&e.at),
            format!("listen_addr = {}", e.value),
            format!("pgvalve listens on one address: {first} is used"),
        );
    }
    Ok(())
}

/// `pool_mode`, also valid in `[databases]` and `[users]`: "statement" is not offered.
pub fn pool_mode(v: &str, setting: &str, at: &At, d: &mut Draft) -> Result<Option<&'static str>, ImportError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "session" => Ok(Some("session")),
        "transaction" => Ok(Some("transaction")),
        "statement" => {
            d.note(Some(at), format!("{setting} = statement"), "pgvalve has no statement pooling: transaction mode is used (a transaction of several statements is allowed there)");
            Ok(Some("transaction"))
        }
        _ => Err(ImportError::line(
            at,
            format!("{setting}: expected session, transaction or statement, found {v:?}"),
        )),
    }
}

/// `client_tls_sslmode`, `server_tls_sslmode`, and PgBouncer's default of no TLS towards
/// clients even with a certificate (pgvalve's default there is "prefer").
pub fn tls_modes(g: &Globals, d: &mut Draft) -> Result<(), ImportError> {
    match g.get("client_tls_sslmode") {
        Some(e) => {
            let m = e.value.trim().to_ascii_lowercase();
            let mode = match m.as_str() {
                "disable" | "allow" | "prefer" | "require" => m.clone(),
                "verify-ca" | "verify-full" => {
                    d.note(
                        Some(&e.at),
                        format!("client_tls_sslmode = {m}"),
                        "\"require\" is used: pgvalve checks a client certificate against client_tls_ca_file when one is presented, and requires one only where authentication is cert (auth_type or hba_file)",
                    );
                    "require".into()
                }
                _ => {
                    return Err(ImportError::line(
                        &e.at,
                        format!("client_tls_sslmode: unknown mode {:?}", e.value),
                    ))
                }
            };
            d.set("tls", "client_tls_mode", mode, format!("client_tls_sslmode ({})", e.at));
        }
        None if g.contains_key("client_tls_cert_file") => {
            d.set(
                "tls",
                "client_tls_mode",
                "disable",
                "client_tls_sslmode not set: PgBouncer's default",
            );
        }
        None => {}
    }
    if let Some(e) = g.get("server_tls_sslmode") {
        let m = e.value.trim().to_ascii_lowercase();
        let mode = match m.as_str() {
            "disable" | "prefer" | "require" | "verify-ca" | "verify-full" => m.clone(),
            "allow" => {
                d.note(
                    Some(&e.at),
                    "server_tls_sslmode = allow",
                    "pgvalve has no \"allow\": \"prefer\" is used (TLS when the server offers it)",
                );
                "prefer".into()
            }
            _ => {
                return Err(ImportError::line(
                    &e.at,
                    format!("server_tls_sslmode: unknown mode {:?}", e.value),
                ))
            }
        };
        d.set("tls", "server_tls_mode", mode, format!("server_tls_sslmode ({})", e.at));
    }
    Ok(())
}

/// `max_packet_size` as `[proxy] max_message_size` when in pgvalve's range (8kB..1GB).
pub fn max_packet_size(g: &Globals, d: &mut Draft) -> Result<(), ImportError> {
    let Some(e) = g.get("max_packet_size") else {
        return Ok(());
    };
    let n: u64 = e.value.trim().parse().map_err(|_| {
        ImportError::line(
            &e.at,
            format!("max_packet_size: expected a number of bytes, found {:?}", e.value),
        )
    })?;
    if (8192..=1 << 30).contains(&n) {
        d.set(
            "proxy",
            "max_message_size",
            i64::try_from(n).unwrap_or(i64::MAX),
            format!("max_packet_size ({})", e.at),
        );
    } else {
        d.note(
            Some(&e.at),
            format!("max_packet_size = {n}"),
            "pgvalve's max_message_size is between 8kB and 1GB; its default (256MB) is kept",
        );
    }
    Ok(())
}

/// `reserve_pool_size` / `reserve_pool_timeout`: pgvalve has no reserve pool.
pub fn reserve_pool(g: &Globals, d: &mut Draft) -> Result<(), ImportError> {
    if let Some(e) = g.get("reserve_pool_size") {
        let r = count(&e.value, "reserve_pool_size", &e.at)?;
        if r > 0 {
            let size = match g.get("default_pool_size") {
                Some(p) => count(&p.value, "default_pool_size", &p.at)?,
                None => 20,
            };
            d.note(Some(&e.at), format!("reserve_pool_size = {r}"), format!(
                "pgvalve has no reserve pool: a pool never exceeds pool_size ({size}), where PgBouncer let a pool reach {} after reserve_pool_timeout; waiting clients are served fairly per identity instead (weight, headroom). Raise pool_size to {} for the same peak",
                size + r, size + r
            ));
        }
    }
    if let Some(e) = g.get("reserve_pool_timeout") {
        d.note(
            Some(&e.at),
            format!("reserve_pool_timeout = {}", e.value),
            "pgvalve has no reserve pool (see reserve_pool_size)",
        );
    }
    Ok(())
}

/// The global per-user and per-database caps, for [`super::pools::identities`].
#[derive(Debug, Default)]
pub struct Caps {
    /// `max_user_connections`.
    pub user_server: Option<(u32, At)>,
    /// `max_db_connections`.
    pub db_server: Option<(u32, At)>,
    /// `max_user_client_connections`.
    pub user_client: Option<(u32, At)>,
    /// `max_db_client_connections`.
    pub db_client: Option<(u32, At)>,
}

/// Reads the global caps (0 = none, as in PgBouncer).
///
/// # Errors
/// Not a number.
pub fn caps(g: &Globals) -> Result<Caps, ImportError> {
    let read = |k: &str| -> Result<Option<(u32, At)>, ImportError> {
        match g.get(k) {
            None => Ok(None),
            Some(e) => Ok(Some((count(&e.value, k, &e.at)?, e.at.clone())).filter(|(n, _)| *n > 0)),
        }
    };
    Ok(Caps {
        user_server: read("max_user_connections")?,
        db_server: read("max_db_connections")?,
        user_client: read("max_user_client_connections")?,
        db_client: read("max_db_client_connections")?,
    })
}

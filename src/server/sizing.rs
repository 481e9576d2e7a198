//! `max_server_connections = "auto"` (or `"80%"`): PostgreSQL's own limits, read on one
//! short connection of pgvalve's, size the budget of server connections.
//!
//! Part of the server side. The proxy sizes its configuration at start ([`size_at_start`],
//! before any pool or other connection of pgvalve's exists, so the one connection is within
//! any cap) and a reload sizes the new configuration off to the side ([`size_with_budget`],
//! on a brief claim of the budgets, like an auth_query look-up: the connection is counted in
//! `pool_size` and `max_server_connections` while it is open). It logs in to the first
//! configured database as the lock monitor's user (`[locks] user`, else the first of
//! `[users]`), reads `max_connections`, `superuser_reserved_connections` and
//! `reserved_connections` (PostgreSQL 16; 0 before), and closes. `pgvalve check --against`
//! reads the same on a URL ([`read_url`]).

use std::str::FromStr;

use super::budget::{Budgets, Hold};
use super::{ServerConn, ServerTarget};
use crate::config::{Config, PgLimits};

/// The three settings; `reserved_connections` is NULL before PostgreSQL 16.
const LIMITS_SQL: &str = "SELECT current_setting('max_connections'), current_setting('superuser_reserved_connections'), current_setting('reserved_connections', true)";

/// The database read when only `"*"` is configured.
const WILDCARD_DBNAME: &str = "postgres";

/// Where the limits are read: the first configured database (`"postgres"` through `"*"`) as
/// the lock monitor's user; with the (database, user) of its pool.
fn target(config: &Config) -> Result<(ServerTarget, String, String, u32), String> {
    let user = config
        .locks
        .user
        .clone()
        .or_else(|| config.users.keys().next().cloned())
        .ok_or("no [users] entry to log in to PostgreSQL with")?;
    let db = config
        .databases
        .keys()
        .find(|d| *d != "*")
        .cloned()
        .unwrap_or_else(|| WILDCARD_DBNAME.to_string());
    let route = config
        .route(&db, &user)
        .ok_or_else(|| format!("database {db:?} is not routed"))?;
    let t = ServerTarget::for_route(config, &route, None);
    Ok((t, db, user, route.pool_size))
}

/// Runs the query on `conn` and closes it.
async fn query(conn: &mut ServerConn, server: String) -> Result<PgLimits, String> {
    let rows = conn.query_rows(LIMITS_SQL, &[]).await;
    conn.terminate().await;
    let row = rows
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("PostgreSQL returned no row")?;
    let num = |i: usize, name: &str| -> Result<u32, String> {
        match row.get(i).cloned().flatten() {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("PostgreSQL's {name} is {v:?}, not a number")),
        }
    };
    Ok(PgLimits {
        server,
        max_connections: num(0, "max_connections")?,
        superuser_reserved_connections: num(1, "superuser_reserved_connections")?,
        reserved_connections: num(2, "reserved_connections")?,
    })
}

/// Connects to `t`, reads the limits, closes.
///
/// # Errors
/// Connecting, logging in or the query failed.
pub(crate) async fn read(t: &ServerTarget) -> Result<PgLimits, String> {
    let mut conn = super::connect(t).await.map_err(|e| e.to_string())?;
    query(&mut conn, format!("{}:{}", t.host, t.port)).await
}

/// Reads the limits of the PostgreSQL at `url` (`pgvalve check --against`), with the TLS
/// and connect timeout `config` gives the pools.
///
/// # Errors
/// A URL that is not postgres://, or what [`read`] says.
pub async fn read_url(config: &Config, url: &str) -> Result<PgLimits, String> {
    let pg = tokio_postgres::Config::from_str(url).map_err(|e| format!("not a postgres:// URL: {e}"))?;
    let user = pg.get_user().ok_or("the URL names no user")?.to_string();
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(dir)) => dir.display().to_string(),
        None => "127.0.0.1".into(),
    };
    let t = ServerTarget {
        port: pg.get_ports().first().copied().unwrap_or(5432),
        dbname: pg.get_dbname().unwrap_or(WILDCARD_DBNAME).to_string(),
        password: pg
            .get_password()
            .map(|p| crate::config::Secret(String::from_utf8_lossy(p).into_owned())),
        connect_timeout: config.pool.server_connect_timeout,
        tls: config.tls.server.clone(),
        keys: None,
        host,
        user,
    };
    read(&t).await.map_err(|e| format!("{}:{}: {e}", t.host, t.port))
}

/// Sizes `config`'s budget from `limits` and logs what was read and chosen.
fn apply(config: &mut Config, limits: &PgLimits) {
    let cap = config.pool.max_server_connections;
    let b = cap.sized(limits);
    tracing::info!(
        setting = %cap,
        max_connections = limits.max_connections,
        superuser_reserved_connections = limits.superuser_reserved_connections,
        reserved_connections = limits.reserved_connections,
        server = %limits.server,
        max_server_connections = b.max,
        "max_server_connections sized from PostgreSQL"
    );
    config.server_budget = Some(b);
}

/// Why sizing failed, naming the setting, the server and the login.
fn failed(config: &Config, t: &ServerTarget, e: &str) -> String {
    format!(
        "max_server_connections = \"{}\": cannot read max_connections from PostgreSQL at {}:{} (database {}, user {}): {e}",
        config.pool.max_server_connections, t.host, t.port, t.dbname, t.user
    )
}

/// At start, before any connection of pgvalve's: sizes `config` when its
/// `max_server_connections` comes from PostgreSQL (a number is left as written).
///
/// # Errors
/// PostgreSQL could not be read (the proxy does not start: it would not know its cap).
pub async fn size_at_start(config: &mut Config) -> Result<(), String> {
    if !config.pool.max_server_connections.from_postgres() {
        return Ok(());
    }
    let (t, ..) = target(config)?;
    let limits = read(&t).await.map_err(|e| failed(config, &t, &e))?;
    apply(config, &limits);
    Ok(())
}

/// At a reload, with pools open: sizes the new `config` on a brief claim of `budgets` (the
/// pool of the database and user read, and so `max_server_connections`). The claim goes
/// before the pools but waits at most `server_connect_timeout` (a reload, and SIGHUP, are not
/// held up by long sessions in a full pool).
///
/// # Errors
/// No slot within `server_connect_timeout`, or PostgreSQL could not be read; `config` is left
/// unsized (the reload keeps the budget in force).
pub(crate) async fn size_with_budget(config: &mut Config, budgets: &Budgets) -> Result<(), String> {
    if !config.pool.max_server_connections.from_postgres() {
        return Ok(());
    }
    let (t, db, user, pool_size) = target(config)?;
    let slot = budgets
        .pool(&db, &user, pool_size)
        .claim(Hold::Brief, Some(config.pool.server_connect_timeout))
        .await
        .map_err(|e| failed(config, &t, &e.to_string()))?;
    let mut conn = super::connect(&t)
        .await
        .map_err(|e| failed(config, &t, &e.to_string()))?;
    conn.slot = Some(slot);
    if !super::seat::verify(&mut conn)
        .await
        .map_err(|e| failed(config, &t, &e.to_string()))?
    {
        return Err(failed(config, &t, &super::seat::lost().to_string()));
    }
    let limits = query(&mut conn, format!("{}:{}", t.host, t.port))
        .await
        .map_err(|e| failed(config, &t, &e))?;
    apply(config, &limits);
    Ok(())
}

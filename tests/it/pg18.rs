//! PostgreSQL 18 behind pgvalve: pgvalve's server connections speak protocol 3.2 (SHOW
//! SERVERS' `protocol`), and every cancel toward them carries the server's 32-byte key: a
//! client's cancel (tokio-postgres with 3.0, libpq 18 with 3.2), query_timeout, and the
//! recovery of a connection whose client left mid-query, in both pool modes. PostgreSQL 15
//! (the test kit's default) offers 3.0 and gets it.
//!
//! PostgreSQL 18 comes from `tests/pg18.sh` (target/pg18) or `PGVALVE_PG18_BINDIR`; without
//! either these tests say so and pass without running.

use std::time::Duration;

use pgvalve::config::{FileConfig, PoolMode};
use pgvalve::testkit::{pg18_bindir, PgOptions};
use tokio_postgres::Client;

use crate::support::*;

const MODES: [PoolMode; 2] = [PoolMode::Session, PoolMode::Transaction];

/// A PostgreSQL 18 cluster with pgvalve in front (in `mode`, app an admin user), or None
/// (with a message) when no PostgreSQL 18 binaries are installed.
async fn pg18(mode: PoolMode, tweak: impl FnOnce(&mut FileConfig)) -> Option<Setup> {
    let Some(bindir) = pg18_bindir() else {
        eprintln!("skipped: no PostgreSQL 18 binaries (run tests/pg18.sh or set PGVALVE_PG18_BINDIR)");
        return None;
    };
    let opts = PgOptions {
        bindir: Some(bindir),
        ..Default::default()
    };
    let s = Setup::with(opts, |f| {
        f.pool.pool_mode = mode;
        f.admin.admin_users = vec!["app".into()];
        tweak(f);
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    let v: String = su.query_one("SHOW server_version_num", &[]).await.unwrap().get(0);
    assert!(v.starts_with("18"), "PostgreSQL 18 expected, got {v}");
    Some(s)
}

/// SHOW SERVERS' `protocol` of the app database's server connections.
async fn server_protocols(s: &Setup) -> Vec<String> {
    let rows = console(s, "SHOW SERVERS").await;
    rows.iter()
        .filter(|r| r["database"] == "app")
        .map(|r| r["protocol"].clone())
        .collect()
}

/// Asserts that there are server connections and all speak `want`.
fn assert_all(protocols: &[String], want: &str, what: &str) {
    assert!(
        !protocols.is_empty() && protocols.iter().all(|p| p == want),
        "{what}: {protocols:?}, all {want} expected"
    );
}

/// Runs `pg_sleep(60)` on `c` until `cancel` has run (once the sleep shows in
/// pg_stat_activity); the query's SQLSTATE.
async fn sleep_cancelled_by<F: std::future::Future<Output = ()>>(s: &Setup, c: Client, cancel: F) -> Option<String> {
    let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await.map(drop) });
    sleep_shows(s).await;
    cancel.await;
    let r = within(Duration::from_secs(30), running).await.unwrap();
    r.err().as_ref().and_then(code)
}

/// Waits until a backend runs pg_sleep.
async fn sleep_shows(s: &Setup) {
    let su = s.pg.superuser().await.unwrap();
    eventually(Duration::from_secs(10), "pg_sleep running", || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'";
        su.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) == 1
    })
    .await;
}

/// A 3.0 client (tokio-postgres) through pgvalve to PostgreSQL 18: pgvalve's server connection
/// speaks 3.2, while in use and idle; the client's cancel (its 4-byte pgvalve key) is forwarded
/// with the server's 32-byte key and ends the sleep with 57014; the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_server_connections_speak_3_2_and_client_cancels_reach_them() {
    for mode in MODES {
        let Some(s) = pg18(mode, |_| {}).await else { return };
        let c = s.client().await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        assert_all(&server_protocols(&s).await, "3.2", &format!("{mode:?}: in use"));
        c.batch_execute("COMMIT").await.unwrap();
        assert_all(&server_protocols(&s).await, "3.2", &format!("{mode:?}: idle"));
        let token = c.cancel_token();
        let cancel = async move { token.cancel_query(tokio_postgres::NoTls).await.unwrap() };
        let c2 = s.client().await;
        assert_eq!(
            sleep_cancelled_by(&s, c, cancel).await.as_deref(),
            Some("57014"),
            "{mode:?}"
        );
        let n: i32 = c2.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(n, 7);
    }
}

/// psycopg's libpq 18 asking for the latest protocol, through pgvalve to PostgreSQL 18: 3.2 on
/// both legs, a query, a running pg_sleep cancelled with the long keys of both legs, and a
/// query after it, in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_libpq_18_latest_protocol_queries_and_cancels() {
    for mode in MODES {
        let Some(s) = pg18(mode, |_| {}).await else { return };
        let python = tokio::task::spawn_blocking(crate::compat::venv_python).await.unwrap();
        crate::compat::libpq_18_latest_protocol_query_and_cancel(&python, &s, mode).await;
        assert_all(&server_protocols(&s).await, "3.2", &format!("{mode:?}"));
    }
}

/// query_timeout cancels a PostgreSQL 18 query with the server's long key (57014 to the
/// client, whose session goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_query_timeout_cancels_with_the_long_key() {
    for mode in MODES {
        let Some(s) = pg18(mode, |f| f.pool.query_timeout = Duration::from_millis(500)).await else {
            return;
        };
        let c = s.client().await;
        let err = within(Duration::from_secs(30), c.simple_query("SELECT pg_sleep(60)"))
            .await
            .unwrap_err();
        assert_eq!(code(&err).as_deref(), Some("57014"), "{mode:?}: {err}");
        let n: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
        assert_eq!(n, 7);
    }
}

/// A client that disconnects while its PostgreSQL 18 query runs: pgvalve cancels the query
/// with the server's long key (recovering the connection in transaction mode, closing it in
/// session mode), so the sleep ends long before its 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg18_a_client_leaving_mid_query_gets_its_query_cancelled() {
    for mode in MODES {
        let Some(s) = pg18(mode, |_| {}).await else { return };
        let (c, task) = connect_killable(&s.url()).await;
        let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await.map(drop) });
        sleep_shows(&s).await;
        task.abort();
        let _ = running.await;
        let su = s.pg.superuser().await.unwrap();
        let filter = "query LIKE 'SELECT pg_sleep%' AND state = 'active'";
        no_backends_left(&su, Duration::from_secs(20), "the sleep cancelled", filter).await;
    }
}

/// PostgreSQL 15 answers the 3.2 request with NegotiateProtocolVersion 3.0: the server
/// connections speak 3.0 and a client's cancel goes with the 4-byte key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg15_offers_3_0_and_cancels_still_reach_it() {
    let s = Setup::new(|f| f.admin.admin_users = vec!["app".into()]).await;
    let c = s.client().await;
    let v: String = c.query_one("SHOW server_version_num", &[]).await.unwrap().get(0);
    if v.starts_with("18") {
        eprintln!("skipped: the default PostgreSQL is 18 here");
        return;
    }
    assert_all(&server_protocols(&s).await, "3.0", "PostgreSQL 15");
    let token = c.cancel_token();
    let cancel = async move { token.cancel_query(tokio_postgres::NoTls).await.unwrap() };
    assert_eq!(sleep_cancelled_by(&s, c, cancel).await.as_deref(), Some("57014"));
}

//! What one client leaves behind on a server connection never reaches the next one.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_is_reset_between_clients() {
    let s = Setup::new(|f| f.pool.pool_size = 1).await;
    let a = connect(&format!(
        "{}?application_name=first&options=-c%20work_mem%3D7MB",
        s.url()
    ))
    .await
    .unwrap();
    let row = a
        .query_one(
            "SELECT pg_backend_pid(), current_setting('application_name'), current_setting('work_mem')",
            &[],
        )
        .await
        .unwrap();
    let (pid, app, wm): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (app.as_str(), wm.as_str()),
        ("first", "7MB"),
        "startup parameters reach the server"
    );
    a.batch_execute(
        "SET statement_timeout = '1234ms'; CREATE TEMP TABLE tmp (x int); SELECT pg_advisory_lock(42); PREPARE p AS SELECT 1; LISTEN chan",
    )
    .await
    .unwrap();
    drop(a);

    let b = connect(&s.url()).await.unwrap();
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), current_setting('statement_timeout'), to_regclass('pg_temp.tmp')::text, \
             (SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'), current_setting('application_name'), current_setting('work_mem')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "same server connection (pool_size = 1)");
    assert_eq!(row.get::<_, String>(1), "0", "SET leaked");
    assert_eq!(row.get::<_, Option<String>>(2), None, "temp table leaked");
    assert_eq!(row.get::<_, i64>(3), 0, "prepared statement leaked");
    assert_eq!(row.get::<_, String>(4), "", "application_name leaked");
    assert_eq!(row.get::<_, String>(5), "4MB", "work_mem leaked");
    let su = s.pg.superuser().await.unwrap();
    let held: i64 = su
        .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "advisory lock leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_commits_nothing() {
    let s = Setup::new(|f| f.pool.pool_size = 1).await;
    let setup = s.client().await;
    setup.batch_execute("CREATE TABLE k (id int)").await.unwrap();
    drop(setup);
    let (victim, task) = connect_killable(&s.url()).await;
    victim.batch_execute("BEGIN; INSERT INTO k VALUES (1)").await.unwrap();
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    task.abort(); // the socket closes without Terminate, mid-transaction
    drop(victim);

    let next = s.client().await;
    let row = next
        .query_one(
            "SELECT (SELECT count(*) FROM k), pg_backend_pid(), pg_current_xact_id_if_assigned() IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0, "an uncommitted insert became visible");
    assert_ne!(
        row.get::<_, i32>(1),
        pid,
        "the server connection of a client killed mid-transaction was reused"
    );
    assert!(
        row.get::<_, bool>(2),
        "the next client started inside an old transaction"
    );
    // In the simple protocol a statement outside a transaction block starts its own.
    let fresh = next.simple_query("SELECT now() = statement_timestamp()").await.unwrap();
    assert!(matches!(&fresh[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t")));
    let su = s.pg.superuser().await.unwrap();
    eventually(Duration::from_secs(5), "the old backend is gone", || async {
        let n: i64 = su
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_transactions_finish() {
    let s = Setup::new(|f| f.proxy.shutdown_timeout = Duration::from_secs(10)).await;
    let setup = s.client().await;
    setup.batch_execute("CREATE TABLE d (id int)").await.unwrap();
    drop(setup);
    let busy = s.client().await;
    let idle = s.client().await;
    busy.batch_execute("BEGIN; INSERT INTO d VALUES (1)").await.unwrap();

    let Setup { pg, proxy } = s;
    let addr = proxy.local_addr();
    let mut phase = proxy.phase();
    let stopping = tokio::spawn(proxy.shutdown());
    phase
        .wait_for(|p| *p != pgvalve::shutdown::Phase::Running)
        .await
        .unwrap();
    // The idle client is told and closed; new clients are not accepted.
    eventually(Duration::from_secs(5), "idle client closed", || async {
        idle.is_closed()
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err()
            || connect(&format!("postgres://app:app-secret@{addr}/app")).await.is_err()
    );
    // The transaction in flight finishes.
    busy.batch_execute("INSERT INTO d VALUES (2); COMMIT").await.unwrap();
    within(Duration::from_secs(10), stopping).await.unwrap();
    let direct = connect(&pg.url()).await.unwrap();
    let n: i64 = direct.query_one("SELECT count(*) FROM d", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

/// Session mode runs sessions on the session threads; one server connection serves clients on
/// every thread in turn (moved to each one's event loop), a cancel still reaches it, and once
/// a pool is in transaction mode new sessions run on the shared runtime again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_threads_share_server_connections_in_both_modes() {
    let s = Setup::new(|f| {
        f.pool.pool_size = 1;
        f.proxy.session_threads = Some(3);
    })
    .await;
    let threads = s.proxy.session_threads().expect("session threads started");
    assert_eq!(threads.len(), 3);
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..6 {
        let c = s.client().await;
        let row = c
            .query_one("SELECT pg_backend_pid(), $1::int + 1", &[&i])
            .await
            .unwrap();
        pids.insert(row.get::<_, i32>(0));
        assert_eq!(row.get::<_, i32>(1), i + 1);
        let rows = c.simple_query("SELECT generate_series(1, 20000)").await.unwrap();
        let rows = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(rows, 20000);
    }
    assert_eq!(pids.len(), 1, "one server connection (pool_size = 1) on every thread");
    assert_eq!(threads.spawned(), 6);

    // A cancel reaches the query of a session on a session thread.
    let c = s.client().await;
    let token = c.cancel_token();
    let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = within(Duration::from_secs(5), running).await.unwrap().unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("57014"), "{err}");
    assert_eq!(threads.spawned(), 8, "the cancel request's connection too");

    let mut f = s.pg.file_config();
    f.pool.pool_size = 1;
    f.proxy.session_threads = Some(3);
    f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
    s.proxy.reload(pgvalve::config::Config::validate(f, "reload").unwrap());
    let c = s.client().await;
    let n: i64 = c.query_one("SELECT 41::bigint + 1", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    assert_eq!(threads.spawned(), 9, "transaction mode runs on the cores too");
}

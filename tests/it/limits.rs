//! Caps: pool size seen from PostgreSQL, query_wait_timeout, max_client_connections,
//! idle and lifetime limits, and the demo's surge.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_share_ten_server_connections() {
    let s = Setup::new(|f| f.pool.pool_size = 10).await;
    let sampler = s.sample_backends().await;
    let url = s.url();
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = connect(&url).await.unwrap_or_else(|e| panic!("client {i}: {e:?}"));
                let v: i32 = c
                    .query_one("SELECT $1::int + 0 FROM pg_sleep(0.05)", &[&i])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(v, i);
            })
        })
        .collect();
    for c in clients {
        within(Duration::from_secs(120), c).await.unwrap();
    }
    let peak = sampler.stop().await;
    assert!(peak <= 10, "PostgreSQL saw {peak} proxy backends, pool_size is 10");
    assert!(peak >= 2, "sampler saw {peak}: the test did not load the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_longer_than_query_wait_timeout_is_53300_with_hint() {
    let s = Setup::new(|f| {
        f.pool.pool_size = 1;
        f.pool.query_wait_timeout = Duration::from_millis(500);
    })
    .await;
    let holder = s.client().await;
    let e = connect(&s.url()).await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(db.severity(), "FATAL");
    assert!(
        db.message().contains("query_wait_timeout") && db.message().contains("pool_size=1"),
        "{}",
        db.message()
    );
    assert!(db.hint().is_some());
    drop(holder);
    // Once the holder leaves, the next client gets the connection.
    eventually(Duration::from_secs(5), "a client gets the freed connection", || async {
        connect(&s.url()).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_connections_refuses_before_auth() {
    let s = Setup::new(|f| f.proxy.max_client_connections = 2).await;
    let _a = s.client().await;
    let _b = s.client().await;
    // Refused even with a wrong password: the decision comes before authentication.
    let e = connect(&s.url_as("app", "wrong", "app")).await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(
        db.message(),
        "pgvalve: too many client connections (max_client_connections=2); client \"127.0.0.1\" refused"
    );
    drop(_a);
    eventually(Duration::from_secs(5), "a slot frees up", || async {
        connect(&s.url()).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connections_are_closed_after_server_idle_timeout() {
    let s = Setup::new(|f| f.pool.server_idle_timeout = Duration::from_secs(1)).await;
    let su = s.pg.superuser().await.unwrap();
    let c = s.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    eventually(Duration::from_secs(3), "the connection is back in the pool", || async {
        s.proxy.shared().pools.stats().first().map(|p| p.idle) == Some(1)
    })
    .await;
    assert_eq!(s.backends(&su).await, 1);
    eventually(
        Duration::from_secs(5),
        "the idle server connection is closed",
        || async { s.backends(&su).await == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_retires_old_connections() {
    let s = Setup::new(|f| {
        f.pool.server_idle_timeout = Duration::ZERO;
        f.pool.server_lifetime = Duration::from_secs(1);
        f.pool.pool_size = 1;
    })
    .await;
    let c = s.client().await;
    let pid1: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let c = s.client().await;
    let pid2: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_ne!(pid1, pid2, "a connection older than server_lifetime was reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_surge_is_absorbed() {
    let report = pgvalve::demo::run(pgvalve::demo::DemoOptions {
        clients: 100,
        ..Default::default()
    })
    .await
    .unwrap();
    println!("{}", report.render());
    assert!(report.proxy_held(), "{}", report.render());
    assert_eq!(report.proxied.ok, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_server_connections_is_shared_across_pools() {
    let s = Setup::new(|f| {
        f.pool.max_server_connections = 2.into();
        f.pool.pool_size = 2;
        let app = f.databases["app"].clone();
        f.databases.insert("other".into(), app);
        f.pool.query_wait_timeout = Duration::from_secs(10);
        // Pools alone here: the lock monitor's connections take slots too (tests/it/budget.rs).
        f.locks.enabled = false;
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute("CREATE DATABASE other OWNER app").await.unwrap();
    let a1 = s.client().await;
    let a2 = s.client().await;
    let other_url = s.url_as("app", "app-secret", "other");
    // Both slots are in use by pool "app": the client of pool "other" waits...
    let waiting = tokio::spawn(async move {
        let c = connect(&other_url).await?;
        c.query_one("SELECT current_database()::text", &[])
            .await
            .map(|r| r.get::<_, String>(0))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third server connection was opened past max_server_connections=2"
    );
    // ...until one of pool "app"'s connections goes idle: it is closed to make room.
    drop(a1);
    let db = within(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!(db, "other");
    let total: i64 = su
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE datname IN ('app', 'other') AND backend_type = 'client backend'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(total <= 2, "{total} server connections with max_server_connections=2");
    drop(a2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_max_server_connections_names_the_limit_and_the_client() {
    let s = Setup::new(|f| {
        f.pool.max_server_connections = 1.into();
        let app = f.databases["app"].clone();
        f.databases.insert("other".into(), app);
        f.pool.query_wait_timeout = Duration::from_millis(500);
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute("CREATE DATABASE other OWNER app").await.unwrap();
    let _holder = s.client().await;
    let e = connect(&format!(
        "{}?application_name=web",
        s.url_as("app", "app-secret", "other")
    ))
    .await
    .unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert_eq!(
        db.message(),
        "pgvalve: client \"web\" waited 500ms for a server connection slot: all 1 are open and busy (max_server_connections=1)"
    );
    assert!(db.hint().is_some());
}

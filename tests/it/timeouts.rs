//! query_timeout, idle_transaction_timeout and transaction_timeout, in both pool modes.

use std::time::{Duration, Instant};

use pgvalve::config::PoolMode;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_the_query_and_the_session_goes_on() {
    let s = Setup::new(|f| f.pool.query_timeout = Duration::from_millis(800)).await;
    let c = s.client().await;
    let t0 = Instant::now();
    let e = c.simple_query("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("57014"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

async fn insert_then(
    s: &Setup,
    act: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
) -> tokio_postgres::Error {
    let _ = s;
    act.await.expect_err("the session should have been ended")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_ends_the_transaction_with_a_clear_error() {
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.idle_transaction_timeout = Duration::from_millis(700);
    })
    .await;
    s.client().await.batch_execute("CREATE TABLE i (x int)").await.unwrap();
    let c = s.client().await;
    c.batch_execute("BEGIN; INSERT INTO i VALUES (1)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = insert_then(&s, c.batch_execute("INSERT INTO i VALUES (2); COMMIT")).await;
    let db = e
        .as_db_error()
        .map(|d| (d.code().code().to_string(), d.message().to_string()));
    assert!(
        db.as_ref()
            .is_some_and(|(c, m)| c == "25P03" && m.contains("idle_transaction_timeout"))
            || c.is_closed(),
        "{e:?}"
    );
    let direct = connect(&s.pg.url()).await.unwrap();
    assert_eq!(
        direct
            .query_one("SELECT count(*) FROM i", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    // Other clients are unaffected.
    assert_eq!(
        s.client()
            .await
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_timeout_ends_a_busy_transaction() {
    let s = Setup::new(|f| f.pool.transaction_timeout = Duration::from_millis(800)).await;
    s.client().await.batch_execute("CREATE TABLE b (x int)").await.unwrap();
    let c = s.client().await;
    c.batch_execute("BEGIN; INSERT INTO b VALUES (1)").await.unwrap();
    // Not idle: a query every 100 ms; the transaction as a whole is still too long.
    let t0 = Instant::now();
    let err = loop {
        match c.simple_query("SELECT 1").await {
            Ok(_) if t0.elapsed() < Duration::from_secs(5) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) => panic!("transaction_timeout never fired"),
            Err(e) => break e,
        }
    };
    if let Some(d) = err.as_db_error() {
        assert_eq!(d.code().code(), "25P04", "{d:?}");
        assert!(d.message().contains("transaction_timeout"));
    }
    let direct = connect(&s.pg.url()).await.unwrap();
    assert_eq!(
        direct
            .query_one("SELECT count(*) FROM b", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
}

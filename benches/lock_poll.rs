//! How long one lock-monitor poll takes when many backends hold locks.
//!
//! Starts a throwaway PostgreSQL (test kit), opens BACKENDS (default 1000) direct connections
//! that each hold a RowExclusiveLock on one of 50 tables in an open transaction, plus one
//! AccessExclusiveLock holder with 10 waiters queued behind it (so pg_blocking_pids() has
//! work), then times the monitor's poll query. `cargo bench --bench lock_poll`,
//! `BACKENDS=200 cargo bench --bench lock_poll`.

use std::time::{Duration, Instant};

use pgvalve::testkit::{PgOptions, TestPostgres};
use tokio_postgres::NoTls;

async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

fn main() {
    let n: usize = std::env::var("BACKENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pg = TestPostgres::start(PgOptions {
            max_connections: (n + 40) as u32,
            ..Default::default()
        })
        .await
        .expect("start PostgreSQL");
        let url = pg.url();
        let admin = client(&url).await;
        for i in 0..50 {
            admin.batch_execute(&format!("CREATE TABLE t{i} (id int)")).await.unwrap();
        }
        admin.batch_execute("CREATE TABLE hot (id int)").await.unwrap();
        let t = Instant::now();
        let mut holders = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
            let batch = futures_util::future::join_all(chunk.iter().map(|i| {
                let url = url.clone();
                async move {
                    let c = client(&url).await;
                    c.batch_execute(&format!("BEGIN; LOCK TABLE t{} IN ROW EXCLUSIVE MODE", i % 50)).await.unwrap();
                    c
                }
            }))
            .await;
            holders.extend(batch);
        }
        let blocker = client(&url).await;
        blocker.batch_execute("BEGIN; LOCK TABLE hot IN ACCESS EXCLUSIVE MODE").await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..10 {
            let c = client(&url).await;
            waiters.push(tokio::spawn(async move { c.simple_query("SELECT count(*) FROM hot").await.map(|_| ()) }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        eprintln!("{n} backends holding locks, set up in {:?}", t.elapsed());
        let monitor = client(&url).await;
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..21 {
            let t = Instant::now();
            rows = pgvalve::locks::poll(&monitor).await.expect("poll").len();
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "lock poll with {n} lock-holding backends + 1 blocker with 10 waiters: {rows} rows; median {:.2} ms, min {:.2} ms, max {:.2} ms (21 polls)",
            times[10].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3,
            times[20].as_secs_f64() * 1e3
        );
        drop(blocker);
        drop(holders);
        for w in waiters {
            let _ = w.await;
        }
    });
}

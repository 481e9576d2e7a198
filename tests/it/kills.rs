//! Randomized client kills in transaction mode: clients die after BEGIN, after an insert,
//! in the middle of a running query, in the middle of an extended-protocol request, or commit.
//! Afterwards exactly the committed rows are in the table, every transaction started on an
//! idle server connection, and no server connection is left busy. `PGVALVE_KILLS` sets how
//! many kills (default 10,000).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgvalve::config::{AuthType, PoolMode};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::support::{eventually, no_backends_left, within, Setup};

/// What the workers saw.
#[derive(Default)]
struct Tally {
    kills: AtomicUsize,
    commits: AtomicUsize,
    /// Transactions that found their server connection not idle (must stay 0).
    dirty_starts: AtomicUsize,
    committed: Mutex<BTreeSet<(u32, u32)>>,
}

fn first_text(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// One client's life: connect, check it starts clean, then die at a random point or commit.
async fn one_life(url: &str, worker: u32, seq: u32, tally: &Tally) -> Result<(), tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let fresh = c
        .simple_query("SELECT (now() = statement_timestamp() AND pg_current_xact_id_if_assigned() IS NULL)::text")
        .await?;
    if first_text(&fresh).as_deref() != Some("true") {
        tally.dirty_starts.fetch_add(1, Ordering::Relaxed);
    }
    let insert = format!("INSERT INTO kills VALUES ({worker}, {seq})");
    let kill = |c: Client, task: tokio::task::JoinHandle<()>| {
        task.abort();
        drop(c);
        tally.kills.fetch_add(1, Ordering::Relaxed);
    };
    match fastrand::u8(0..7) {
        0 => {
            c.simple_query("BEGIN").await?;
            kill(c, task);
        }
        1 => {
            c.simple_query(&format!("BEGIN; {insert}")).await?;
            kill(c, task);
        }
        2 | 3 => {
            // Mid-query: a batch that inserts and then sleeps, cut at a random moment.
            let c = Arc::new(c);
            let q = {
                let (c, sql) = (c.clone(), format!("BEGIN; {insert}; SELECT pg_sleep(0.02)"));
                tokio::spawn(async move { c.simple_query(&sql).await.map(|_| ()) })
            };
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..25_000))).await;
            task.abort();
            q.abort();
            tally.kills.fetch_add(1, Ordering::Relaxed);
        }
        4 => {
            // Extended protocol (Parse/Bind/Execute/Sync) in flight.
            c.simple_query("BEGIN").await?;
            let c = Arc::new(c);
            let q = {
                let c = c.clone();
                let (w, s) = (worker as i32, seq as i32);
                tokio::spawn(async move {
                    c.execute("INSERT INTO kills VALUES ($1, $2)", &[&w, &s])
                        .await
                        .map(|_| ())
                })
            };
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2_000))).await;
            task.abort();
            q.abort();
            tally.kills.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            c.simple_query(&format!("BEGIN; {insert}; COMMIT")).await?;
            tally.committed.lock().unwrap().insert((worker, seq));
            tally.commits.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_client_kills_commit_nothing_and_reuse_nothing_busy() {
    let target: usize = std::env::var("PGVALVE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 10;
        f.proxy.auth_type = AuthType::Trust;
    })
    .await;
    s.client()
        .await
        .batch_execute("CREATE TABLE kills (worker int, seq int, PRIMARY KEY (worker, seq))")
        .await
        .unwrap();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let workers: Vec<_> = (0..40u32)
        .map(|w| {
            let (url, tally) = (s.url(), tally.clone());
            tokio::spawn(async move {
                let mut seq = 0;
                while tally.kills.load(Ordering::Relaxed) < target {
                    seq += 1;
                    // A refused or failed connection is not a kill; the assertions below judge.
                    let _ = one_life(&url, w, seq, &tally).await;
                }
            })
        })
        .collect();
    within(Duration::from_secs(600), futures_util::future::join_all(workers)).await;
    let elapsed = started.elapsed();

    // Nothing left busy: PostgreSQL shows no backend of the application in a transaction or a
    // query, and the proxy has every server connection back in its pool.
    let su = s.pg.superuser().await.unwrap();
    no_backends_left(
        &su,
        Duration::from_secs(10),
        "no backend left busy",
        "datname = 'app' AND state <> 'idle'",
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "every server connection back in the pool",
        || async { s.proxy.shared().pools.stats().iter().all(|p| p.open == p.idle) },
    )
    .await;
    let rows: BTreeSet<(u32, u32)> = s
        .client()
        .await
        .query("SELECT worker, seq FROM kills", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i32>(1) as u32))
        .collect();
    let committed = tally.committed.lock().unwrap().clone();
    let stats = s.proxy.shared().pools.stats();
    eprintln!(
        "{} kills, {} commits in {:.1}s; {} server connections opened, {} closed at checkout",
        tally.kills.load(Ordering::Relaxed),
        tally.commits.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        stats.iter().map(|p| p.created).sum::<u64>(),
        stats.iter().map(|p| p.recycle_rejections).sum::<u64>(),
    );
    let uncommitted: Vec<_> = rows.difference(&committed).collect();
    assert!(
        uncommitted.is_empty(),
        "rows of killed transactions are visible: {uncommitted:?}"
    );
    let lost: Vec<_> = committed.difference(&rows).collect();
    assert!(lost.is_empty(), "committed rows are missing: {lost:?}");
    assert_eq!(
        tally.dirty_starts.load(Ordering::Relaxed),
        0,
        "a transaction began on a busy server connection"
    );
    assert!(tally.kills.load(Ordering::Relaxed) >= target);
}

//! Simple and extended queries, COPY both ways, a large row, cancel.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let s = Setup::new(|_| {}).await;
    let c = s.client().await;
    let rows = c.simple_query("SELECT 1 AS one; SELECT 'two' AS two").await.unwrap();
    let rows: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["1", "two"]);
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let n = c
        .execute("INSERT INTO t VALUES ($1, $2), ($3, $4)", &[&1i32, &"a", &2i32, &"b"])
        .await
        .unwrap();
    assert_eq!(n, 2);
    let stmt = c.prepare("SELECT name FROM t WHERE id = $1").await.unwrap();
    for (id, want) in [(1i32, "a"), (2, "b")] {
        let got: String = c.query_one(&stmt, &[&id]).await.unwrap().get(0);
        assert_eq!(got, want);
    }
    let err = c.simple_query("SELECT * FROM missing").await.unwrap_err();
    assert_eq!(code(&err).as_deref(), Some("42P01"));
    // The session goes on after an error, and transactions work.
    c.batch_execute("BEGIN; INSERT INTO t VALUES (3, 'c'); ROLLBACK")
        .await
        .unwrap();
    let count: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let s = Setup::new(|_| {}).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE c (id int, payload text)").await.unwrap();
    let sink = c.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut expected = 0u64;
    for chunk in 0..50 {
        let mut data = String::new();
        for i in 0..1000 {
            data.push_str(&format!("{}\t{}\n", chunk * 1000 + i, "x".repeat(100)));
        }
        expected += 1000;
        sink.send(Bytes::from(data)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), expected);

    let stream = c.copy_out("COPY c TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let (mut bytes, mut lines) = (0usize, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        bytes += chunk.len();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(lines as u64, expected);
    assert!(bytes > 5_000_000, "copied {bytes} bytes");
    // The connection is usable after COPY.
    let n: i64 = c.query_one("SELECT count(*) FROM c", &[]).await.unwrap().get(0);
    assert_eq!(n as u64, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_row_streams_through_a_small_message_limit() {
    // max_message_size bounds what clients send; a 200 MB row from the server is streamed
    // through in pieces, never buffered whole, so the 64 kB limit does not apply to it.
    let s = Setup::new(|f| f.proxy.max_message_size = pgvalve::config::ByteSize(64 << 10)).await;
    let c = s.client().await;
    let row = within(
        Duration::from_secs(120),
        c.query_one("SELECT convert_to(repeat('x', 200000000), 'UTF8')", &[]),
    )
    .await
    .unwrap();
    let v: Vec<u8> = row.get(0);
    assert_eq!(v.len(), 200_000_000);
    assert!(v.iter().all(|&b| b == b'x'));
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_running_query() {
    let s = Setup::new(|_| {}).await;
    let c = s.client().await;
    let token = c.cancel_token();
    let running = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(10)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = within(Duration::from_secs(5), running).await.unwrap().unwrap_err();
    let took = t0.elapsed();
    assert_eq!(code(&err).as_deref(), Some("57014"), "{err}");
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_cancel_key_never_hits_the_next_client() {
    let s = Setup::new(|f| f.pool.pool_size = 1).await;
    let first = s.client().await;
    let pid: i32 = first.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let stale = first.cancel_token();
    drop(first);
    // The next client gets the same server connection (pool_size = 1).
    let second = s.client().await;
    let pid2: i32 = second.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(pid, pid2);
    let running = tokio::spawn(async move { second.simple_query("SELECT pg_sleep(1)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    stale.cancel_query(tokio_postgres::NoTls).await.unwrap();
    within(Duration::from_secs(5), running)
        .await
        .unwrap()
        .expect("second client's query must not be cancelled");
}

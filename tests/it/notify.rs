//! LISTEN/NOTIFY in transaction mode: listeners share one listening server connection, get
//! every notification once and in order, and a listener that does not read is cut off.

use std::collections::BTreeMap;
use std::time::Duration;

use pgvalve::config::{AuthType, PoolMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::*;

fn txn_setup(pool_size: u32) -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    move |f| {
        f.proxy.auth_type = AuthType::Trust;
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = pool_size;
        f.pool.query_wait_timeout = Duration::from_secs(60);
        // Every slot of the pool for the clients and the listening connection.
        f.locks.enabled = false;
    }
}

/// A client through the proxy whose notifications come out of the returned receiver.
async fn listener(url: &str) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<(String, String)>) {
    let (client, mut conn) = within(Duration::from_secs(30), tokio_postgres::connect(url, NoTls))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = m {
                // Another client's notification names its backend, never a pid pgvalve gives
                // out (those are above 2^22).
                assert!(n.process_id() < 1 << 22, "another client's notification named as own");
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_listeners_on_five_connections_get_every_notification_once_in_order() {
    // 5 server connections for transactions, one more for the shared listening connection.
    let s = Setup::new(txn_setup(6)).await;
    let peak = s.sample_backends().await;
    let mut listeners = Vec::new();
    for _ in 0..50 {
        let (c, rx) = listener(&s.url()).await;
        c.batch_execute("LISTEN c0; LISTEN c1; LISTEN \"C2\"").await.unwrap();
        listeners.push((c, rx));
    }
    let tasks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, (c, mut rx))| {
            tokio::spawn(async move {
                let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
                let mut ended = 0;
                while ended < 3 {
                    // Transactions meanwhile: notifications wait for their ReadyForQuery.
                    let v: i32 = c.query_one("SELECT $1::int", &[&(i as i32)]).await.unwrap().get(0);
                    assert_eq!(v, i as i32);
                    while let Ok((channel, payload)) = rx.try_recv() {
                        ended += usize::from(payload == "end");
                        got.entry(channel).or_default().push(payload);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (c, got)
            })
        })
        .collect();
    let sender = s.client().await;
    for n in 0..30 {
        for ch in ["c0", "c1", "C2"] {
            sender
                .execute("SELECT pg_notify($1, $2)", &[&ch, &n.to_string()])
                .await
                .unwrap();
        }
    }
    sender
        .batch_execute("NOTIFY c0, 'end'; NOTIFY c1, 'end'; NOTIFY \"C2\", 'end'")
        .await
        .unwrap();
    let mut want: Vec<String> = (0..30).map(|n| n.to_string()).collect();
    want.push("end".into());
    let mut clients = Vec::new();
    for t in tasks {
        let (c, got) = within(Duration::from_secs(120), t).await.unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["C2", "c0", "c1"]);
        for (ch, payloads) in got {
            assert_eq!(payloads, want, "channel {ch}");
        }
        clients.push(c);
    }
    assert!(peak.stop().await <= 6, "more server connections than pool_size");
    assert_eq!(s.proxy.shared().pins.total(), 0, "LISTEN pinned");
    // UNLISTEN and disconnects: once nobody listens, the listening connection closes.
    for c in &clients[..25] {
        c.batch_execute("UNLISTEN *").await.unwrap();
    }
    drop(clients);
    let su = s.pg.superuser().await.unwrap();
    no_backends_left(
        &su,
        Duration::from_secs(20),
        "listening connection",
        "backend_type = 'client backend' AND (query LIKE 'LISTEN%' OR query LIKE 'UNLISTEN%')",
    )
    .await;
}

/// A raw protocol client (trust auth), to stop reading at will.
async fn raw_client(s: &Setup) -> TcpStream {
    let mut sock = TcpStream::connect(s.proxy.local_addr()).await.unwrap();
    let mut body = vec![0, 3, 0, 0];
    for part in ["user", "app", "database", "app"] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    sock.write_all(&packet).await.unwrap();
    read_until_ready(&mut sock).await;
    sock
}

/// Reads messages up to ReadyForQuery; their types.
async fn read_until_ready(sock: &mut TcpStream) -> Vec<u8> {
    let mut tags = Vec::new();
    loop {
        let mut head = [0u8; 5];
        sock.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        sock.read_exact(&mut body).await.unwrap();
        tags.push(head[0]);
        if head[0] == b'Z' {
            return tags;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_never_reads_is_disconnected_with_an_error() {
    let s = Setup::new(txn_setup(3)).await;
    let mut slow = raw_client(&s).await;
    let mut q = b"Q\0\0\0\0LISTEN big\0".to_vec();
    let len = (q.len() - 1) as u32;
    q[1..5].copy_from_slice(&len.to_be_bytes());
    slow.write_all(&q).await.unwrap();
    assert_eq!(read_until_ready(&mut slow).await, b"CZ");
    // A reader on the same channel keeps up meanwhile.
    let (fast, mut rx) = listener(&s.url()).await;
    fast.batch_execute("LISTEN big").await.unwrap();
    // Far more than the slow one's queue and socket buffers hold (each payload is distinct:
    // PostgreSQL folds duplicates within a transaction).
    let sender = s.client().await;
    for _ in 0..3 {
        sender
            .batch_execute("SELECT pg_notify('big', repeat('x', 7000) || g) FROM generate_series(1, 1000) g")
            .await
            .unwrap();
    }
    sender.batch_execute("NOTIFY big, 'end'").await.unwrap();
    let mut n = 0;
    loop {
        let (_, payload) = within(Duration::from_secs(60), rx.recv()).await.expect("notification");
        if payload == "end" {
            break;
        }
        n += 1;
    }
    assert_eq!(n, 3000, "the reader got every notification");
    // The slow client finds what was written to it, then a FATAL 53400 and the end.
    let mut rest = Vec::new();
    within(Duration::from_secs(60), slow.read_to_end(&mut rest))
        .await
        .unwrap();
    let mut pos = 0;
    let mut last = None;
    while pos + 5 <= rest.len() {
        let len = u32::from_be_bytes([rest[pos + 1], rest[pos + 2], rest[pos + 3], rest[pos + 4]]) as usize;
        last = Some((rest[pos], rest[pos + 5..(pos + 1 + len).min(rest.len())].to_vec()));
        pos += 1 + len;
    }
    let (tag, body) = last.expect("messages");
    assert_eq!(tag, b'E', "the last message is an error");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("53400") && text.contains("notifications"), "{text}");
    // The proxy still serves.
    assert_eq!(fast.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

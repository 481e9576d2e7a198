//! Bad input gets an ErrorResponse or a clean close, and never disturbs other clients.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends `bytes` and reads until the proxy closes; returns what it said.
async fn send_and_read(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match within(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn error_code(reply: &[u8]) -> Option<String> {
    if reply.first() != Some(&b'E') {
        return None;
    }
    let body = &reply[5..];
    let i = body.windows(1).position(|w| w[0] == b'C')?;
    let end = body[i + 1..].iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&body[i + 1..i + 1 + end]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncation_are_refused_cleanly() {
    let s = Setup::new(|f| f.proxy.client_login_timeout = Duration::from_secs(1)).await;
    let bystander = s.client().await;
    let addr = s.proxy.local_addr();

    // HTTP instead of PostgreSQL: the length field is huge.
    let r = send_and_read(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(error_code(&r).as_deref(), Some("08P01"), "{r:?}");
    // Length below the minimum.
    let r = send_and_read(addr, &[0, 0, 0, 4, 0, 0, 0, 0]).await;
    assert_eq!(error_code(&r).as_deref(), Some("08P01"), "{r:?}");
    // A protocol version we do not speak.
    let r = send_and_read(addr, &[0, 0, 0, 8, 0, 2, 0, 0]).await;
    assert_eq!(error_code(&r).as_deref(), Some("0A000"), "{r:?}");
    // Truncated startup packet, then silence: closed at client_login_timeout.
    let t0 = std::time::Instant::now();
    let r = send_and_read(addr, &[0, 0, 0, 40, 0, 3, 0, 0, b'u']).await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(r.is_empty() || error_code(&r).as_deref() == Some("08P01"), "{r:?}");
    // Random bytes.
    let mut seed = 0x9e37_79b9_u32;
    for _ in 0..50 {
        let junk: Vec<u8> = (0..64)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let r = send_and_read(addr, &junk).await;
        assert!(r.is_empty() || r[0] == b'E' || r[0] == b'N', "{r:?}");
    }
    let v: i32 = bystander.query_one("SELECT 5", &[]).await.unwrap().get(0);
    assert_eq!(v, 5, "a bystander was disturbed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_message_header_after_login_is_refused() {
    // Trust auth lets a raw socket log in with just a startup packet.
    let t = Setup::new(|f| f.proxy.auth_type = pgvalve::config::AuthType::Trust).await;
    let bystander = t.client().await;
    let mut sock = TcpStream::connect(t.proxy.local_addr()).await.unwrap();
    let mut startup = Vec::new();
    let body = b"\0\x03\0\0user\0app\0database\0app\0\0";
    startup.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    startup.extend_from_slice(body);
    sock.write_all(&startup).await.unwrap();
    // Read until ReadyForQuery.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = within(Duration::from_secs(10), sock.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed during login: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    // A Query announcing 1 GiB.
    sock.write_all(&[b'Q', 0x40, 0, 0, 0, b's', b'e']).await.unwrap();
    let mut reply = Vec::new();
    loop {
        match within(Duration::from_secs(10), sock.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
    let v: i32 = bystander.query_one("SELECT 6", &[]).await.unwrap().get(0);
    assert_eq!(v, 6, "a bystander was disturbed");
    let v: i32 = t.client().await.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7, "new clients are still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_closed_by_postgresql_are_never_handed_out() {
    // Idle longer than server_check_delay: probed at checkout.
    closed_connections_are_found_out(Duration::from_millis(200), Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_closed_by_postgresql_are_found_out_within_server_check_delay() {
    // Used moments ago, server_check_delay an hour: their event loop saw them closed.
    closed_connections_are_found_out(Duration::from_secs(3600), Duration::ZERO).await;
}

async fn closed_connections_are_found_out(check_delay: Duration, idle: Duration) {
    let s = Setup::new(|f| {
        f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
        f.pool.pool_size = 4;
        f.pool.server_check_delay = check_delay;
        f.locks.enabled = false;
    })
    .await;
    let clients: Vec<_> = futures_util::future::join_all((0..4).map(|_| s.client())).await;
    // Fill the pool: four transactions at once.
    for c in &clients {
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    }
    for c in &clients {
        c.batch_execute("COMMIT").await.unwrap();
    }
    tokio::time::sleep(idle).await;
    // An operator (or a restart) ends every idle backend behind pgvalve's back.
    let su = s.pg.superuser().await.unwrap();
    let killed: i64 = su
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'app' AND state = 'idle' AND backend_type = 'client backend') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 4);
    // (pg_terminate_backend only signals: give the backends a moment to exit.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // The dead connections are found out before reuse: no client sees an error.
    for round in 0..3 {
        let results = futures_util::future::join_all(clients.iter().map(|c| c.simple_query("SELECT 1"))).await;
        for r in results {
            r.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        }
    }
}

#[allow(clippy::too_many_lines)] // a test: the 80-line rule is for non-test code
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restart_under_load_loses_nothing_and_recovers_fast() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let s = Setup::new(|f| {
        f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
        f.pool.pool_size = 10;
        f.pool.query_wait_timeout = Duration::from_secs(10);
    })
    .await;
    s.client()
        .await
        .batch_execute("CREATE TABLE r (c int, n int)")
        .await
        .unwrap();
    let url = s.url();
    let (stop, committed, errors) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(BTreeSet::new())),
        Arc::new(Mutex::new(Vec::<(String, std::time::Instant)>::new())),
    );
    let last_ok = Arc::new(Mutex::new(vec![None::<std::time::Instant>; 50]));
    let restarted = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..50)
        .map(|c| {
            let (url, stop, committed, errors, last_ok, restarted) = (
                url.clone(),
                stop.clone(),
                committed.clone(),
                errors.clone(),
                last_ok.clone(),
                restarted.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(client) = connect(&url).await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let sql = format!("BEGIN; INSERT INTO r VALUES ({c}, {n}); COMMIT");
                        match client.batch_execute(&sql).await {
                            Ok(()) => {
                                committed.lock().unwrap().insert((c, n));
                                // The first success once PostgreSQL is back.
                                if restarted.load(Ordering::Relaxed) {
                                    last_ok.lock().unwrap()[c as usize].get_or_insert_with(std::time::Instant::now);
                                }
                            }
                            Err(e) => {
                                let what = code(&e).unwrap_or_else(|| format!("client: {e}"));
                                errors.lock().unwrap().push((what, std::time::Instant::now()));
                                if client.is_closed() {
                                    break;
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    within(Duration::from_secs(60), s.pg.restart()).await.unwrap();
    let back = std::time::Instant::now();
    restarted.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        within(Duration::from_secs(10), t).await.unwrap();
    }
    // Every client worked again within 2 s of PostgreSQL accepting connections.
    for (c, ok) in last_ok.lock().unwrap().iter().enumerate() {
        let ok = ok.unwrap_or_else(|| panic!("client {c} never committed after the restart"));
        assert!(ok - back < Duration::from_secs(2), "client {c} needed {:?}", ok - back);
    }
    let errors = errors.lock().unwrap().clone();
    let late: Vec<_> = errors
        .iter()
        .filter(|(_, at)| *at > back + Duration::from_secs(2))
        .collect();
    assert!(
        late.is_empty(),
        "errors more than 2 s after PostgreSQL was back: {late:?}"
    );
    for (e, _) in errors.iter() {
        assert!(
            ["57P01", "08006", "57P03", "08001"].contains(&e.as_str()) || e.starts_with("client:"),
            "a clear error for clients in flight, not {e}"
        );
    }
    // Nothing a client saw committed was lost.
    let direct = connect(&s.pg.url()).await.unwrap();
    let rows: BTreeSet<(i32, i32)> = direct
        .query("SELECT c, n FROM r", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let committed = committed.lock().unwrap();
    assert!(
        committed.is_subset(&rows),
        "{} committed, {} missing",
        committed.len(),
        committed.difference(&rows).count()
    );
    assert!(committed.len() > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_terminated_mid_transaction_fails_only_its_client() {
    let s = Setup::new(|f| {
        f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
        f.pool.pool_size = 4;
    })
    .await;
    let (victim, other) = (s.client().await, s.client().await);
    victim.batch_execute("CREATE TABLE k (n int)").await.unwrap();
    victim.batch_execute("BEGIN; INSERT INTO k VALUES (1)").await.unwrap();
    other.batch_execute("BEGIN; INSERT INTO k VALUES (2)").await.unwrap();
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let su = s.pg.superuser().await.unwrap();
    su.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let e = within(
        Duration::from_secs(5),
        victim.batch_execute("INSERT INTO k VALUES (3); COMMIT"),
    )
    .await
    .unwrap_err();
    assert!(
        e.is_closed() || ["57P01", "08006"].contains(&code(&e).as_deref().unwrap_or("")),
        "{e:?}"
    );
    // The other client's transaction is untouched and commits.
    other.batch_execute("INSERT INTO k VALUES (4); COMMIT").await.unwrap();
    // The dead backend is never handed out again: new clients all work.
    for _ in 0..8 {
        let c = s.client().await;
        c.simple_query("SELECT 1").await.expect("no dead connection is reused");
        let p: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        assert_ne!(p, pid);
    }
    let direct = connect(&s.pg.url()).await.unwrap();
    let rows: Vec<i32> = direct
        .query("SELECT n FROM k ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        vec![2, 4],
        "the victim's transaction rolled back, the other's committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgresql_fails_clients_fast_without_a_reconnect_storm() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let s = Setup::new(|f| {
        f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
        f.http.listen = Some("127.0.0.1:0".into());
        f.locks.enabled = false;
        f.databases.get_mut("app").unwrap().port = dead_port;
    })
    .await;
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    // 40 logins over ~1.6 s, 4 at a time.
    for _ in 0..10 {
        let tries = futures_util::future::join_all((0..4).map(|_| async {
            let t = std::time::Instant::now();
            let e = connect(&s.url()).await.unwrap_err();
            (t.elapsed(), code(&e), e.as_db_error().map(|d| d.message().to_string()))
        }))
        .await;
        failures.extend(tries);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for (took, code, msg) in &failures {
        assert_eq!(code.as_deref(), Some("08006"), "{msg:?}");
        assert!(
            msg.as_deref().unwrap_or("").contains(&format!("127.0.0.1:{dead_port}")),
            "names the server: {msg:?}"
        );
        assert!(*took < Duration::from_secs(1), "fails fast: {took:?}");
    }
    // Attempts were spaced out (100 ms doubling up to server_login_retry = 1 s), not one per client.
    let span = started.elapsed();
    let http = s.proxy.http_addr().unwrap();
    let body = crate::admission::http_get(http, "/metrics").await.1;
    let attempts: f64 = body
        .lines()
        .find(|l| l.starts_with("pgvalve_server_connect_failures_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("the failures are counted");
    assert!(
        (1.0..=8.0).contains(&attempts),
        "{attempts} attempts in {span:?} for 40 clients"
    );
}

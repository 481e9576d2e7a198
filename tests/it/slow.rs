//! Slow and stalled clients against the real binary: a slowloris crowd trickling startup
//! packets is cut off at `client_login_timeout`, a client that stops reading a 1 GB result
//! holds only the relay's bounded buffer, and in both cases other clients are served and
//! pgvalve's resident memory stays bounded (printed for the closing note).

use std::process::Stdio;
use std::time::{Duration, Instant};

use pgvalve::testkit::{PgOptions, TestPostgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{connect, eventually, no_backends_left, within};

const BIN: &str = env!("CARGO_BIN_EXE_pgvalve");

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The binary with a config file: trust auth, `client_login_timeout` 1 s, session pooling.
async fn start(pg: &TestPostgres, dir: &std::path::Path) -> (tokio::process::Child, String, std::net::SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nauth_type = \"trust\"\nclient_login_timeout = \"1s\"\nmax_client_connections = 2000\n\
         [pool]\npool_size = 10\n[databases.app]\nhost = \"127.0.0.1\"\nport = {}\n[users.app]\npassword = \"app-secret\"\n",
        pg.port()
    );
    let path = dir.join("pgvalve.toml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .env("XDG_RUNTIME_DIR", env!("CARGO_TARGET_TMPDIR"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("postgres://app@127.0.0.1:{port}/app");
    eventually(Duration::from_secs(10), "the binary accepts clients", || async {
        connect(&url).await.is_ok()
    })
    .await;
    (child, url, ([127, 0, 0, 1], port).into())
}

fn startup_packet() -> Vec<u8> {
    let body = b"\x00\x03\x00\x00user\x00app\x00database\x00app\x00\x00";
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

/// Sends the startup packet a byte every 150 ms; returns how long until pgvalve closed it.
async fn slowloris(addr: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    for b in startup_packet() {
        if s.write_all(&[b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(150), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {} // the error message before the close
            Err(_) => {}
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_stalled_readers_are_bounded_and_others_are_served() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url, addr) = start(&pg, dir.path()).await;
    let pid = child.id().unwrap();
    let before = rss_kib(pid);

    // 300 clients trickle their startup packets (it would take them 6 s each).
    let crowd: Vec<_> = (0..300).map(|_| tokio::spawn(slowloris(addr))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during_crowd = rss_kib(pid);
    let c = within(Duration::from_secs(2), connect(&url))
        .await
        .expect("served beside the crowd");
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    for t in crowd {
        let held = within(Duration::from_secs(10), t).await.unwrap();
        assert!(
            held < Duration::from_millis(2500),
            "a slowloris client was held {held:?}"
        );
    }

    // A client asks for 1 GB and stops reading; another is served meanwhile.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&startup_packet()).await.unwrap();
    let mut seen = Vec::new();
    while !seen.windows(6).any(|w| w == b"Z\x00\x00\x00\x05I") {
        let mut buf = [0u8; 4096];
        let n = within(Duration::from_secs(5), stalled.read(&mut buf)).await.unwrap();
        assert!(n > 0, "login through pgvalve");
        seen.extend_from_slice(&buf[..n]);
    }
    let sql = b"SELECT repeat('x', 1000) FROM generate_series(1, 1000000)\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    q.extend_from_slice(sql);
    stalled.write_all(&q).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_stall = rss_kib(pid);
    let other = within(Duration::from_secs(2), connect(&url)).await.unwrap();
    let n: i64 = other
        .query_one("SELECT count(*) FROM generate_series(1, 1000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
    // The stalled client leaves: its backend is cancelled and closed, not left writing.
    drop(stalled);
    let su = pg.superuser().await.unwrap();
    no_backends_left(
        &su,
        Duration::from_secs(5),
        "the stalled client's backend ends",
        "query LIKE 'SELECT repeat%' AND state = 'active'",
    )
    .await;
    println!(
        "pgvalve RSS: {before} KiB at start, {during_crowd} KiB with 300 slowloris clients, {during_stall} KiB with a client stalled on a 1 GB result"
    );
    assert!(
        during_crowd < before + 32 * 1024,
        "300 slowloris clients cost {} KiB",
        during_crowd - before
    );
    assert!(
        during_stall < before + 32 * 1024,
        "a stalled reader cost {} KiB",
        during_stall - before
    );
    child.kill().await.unwrap();
}

//! The real binary: check, passwd, quick start with --upstream, SIGTERM drain, console
//! SHUTDOWN, SIGINT fast stop; and psql and
//! pgbench through the proxy.

use std::process::{Command, Stdio};
use std::time::Duration;

use pgvalve::testkit::{PgOptions, TestPostgres};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_pgvalve");
/// Where the binaries these tests start put their takeover control socket: a test that
/// kills one leaves the file here, not in /tmp.
const RUNTIME_DIR: &str = env!("CARGO_TARGET_TMPDIR");

#[test]
fn check_accepts_the_example_and_names_file_and_line_of_errors() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgvalve.toml");
    let out = Command::new(BIN).args(["check", "-c", example]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pool]\npool_size = 5\nbogus = 1\n").unwrap();
    let out = Command::new(BIN).args(["check", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:") && err.contains("bogus"), "{err}");
}

#[test]
fn passwd_prints_a_verifier() {
    let out = Command::new(BIN).args(["passwd", "s3cret"]).output().unwrap();
    let v = String::from_utf8(out.stdout).unwrap();
    assert!(v.trim().parse::<pgvalve::config::ScramVerifier>().is_ok(), "{v}");
    assert!(!v.contains("s3cret"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the real binary in quick-start mode in front of `pg` (upstream from the
/// environment, as containers configure it) and waits until it accepts clients. Returns the
/// child and the URL of the application role through it.
async fn quick_start(pg: &TestPostgres, extra: &[&str]) -> (tokio::process::Child, String) {
    let port = free_port();
    let child = tokio::process::Command::new(BIN)
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env("XDG_RUNTIME_DIR", RUNTIME_DIR)
        .env(
            "PGVALVE_UPSTREAM",
            format!("postgres://app:app-secret@127.0.0.1:{}", pg.port()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("postgres://app:app-secret@127.0.0.1:{port}/app");
    eventually(Duration::from_secs(10), "the binary accepts clients", || async {
        connect(&url).await.is_ok()
    })
    .await;
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_binary_serves_and_drains_on_sigterm() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let (mut child, url) = quick_start(&pg, &["--pool-size", "4"]).await;
    let c = connect(&url).await.unwrap();
    c.batch_execute("CREATE TABLE s (id int); BEGIN; INSERT INTO s VALUES (1)")
        .await
        .unwrap();
    // Any database name is routed to the same server.
    let nosuch = format!("{}/nosuch", url.rsplit_once('/').unwrap().0);
    let e = connect(&nosuch).await.unwrap_err();
    assert_eq!(
        code(&e).as_deref(),
        Some("3D000"),
        "PostgreSQL's own answer is forwarded: {e}"
    );

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect(&url).await.is_err(), "accepting new clients while draining");
    c.batch_execute("INSERT INTO s VALUES (2); COMMIT").await.unwrap();
    let status = within(Duration::from_secs(15), child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status}");
    let direct = connect(&pg.url()).await.unwrap();
    let n: i64 = direct.query_one("SELECT count(*) FROM s", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shutdown_drains_and_sigint_stops_at_once() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let (mut child, url) = quick_start(&pg, &[]).await;
    let c = connect(&url).await.unwrap();
    c.batch_execute("CREATE TABLE s (id int); BEGIN; INSERT INTO s VALUES (1)")
        .await
        .unwrap();
    let idle = connect(&url).await.unwrap();
    // Quick start: the upstream user is the console's admin.
    let console = format!("{}/pgvalve", url.rsplit_once('/').unwrap().0);
    connect(&console).await.unwrap().simple_query("SHUTDOWN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect(&url).await.is_err(), "accepting new clients while draining");
    let e = within(Duration::from_secs(5), idle.simple_query("SELECT 1"))
        .await
        .unwrap_err();
    assert!(
        e.is_closed() || code(&e).as_deref() == Some("57P01"),
        "idle clients are told: {e:?}"
    );
    c.batch_execute("INSERT INTO s VALUES (2); COMMIT").await.unwrap();
    let status = within(Duration::from_secs(15), child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status}");
    let direct = connect(&pg.url()).await.unwrap();
    let n: i64 = direct.query_one("SELECT count(*) FROM s", &[]).await.unwrap().get(0);
    assert_eq!(n, 2, "the transaction in flight finished");

    // SIGINT: no drain, even with a transaction open and shutdown_timeout at 30 s.
    let (mut child, url) = quick_start(&pg, &[]).await;
    let c = connect(&url).await.unwrap();
    c.batch_execute("BEGIN; INSERT INTO s VALUES (3)").await.unwrap();
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = within(Duration::from_secs(10), child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        c.batch_execute("COMMIT").await.is_err(),
        "the open transaction was cut off"
    );
    let n: i64 = direct.query_one("SELECT count(*) FROM s", &[]).await.unwrap().get(0);
    assert_eq!(n, 2, "nothing uncommitted was kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_exits_64_before_binding() {
    let out = Command::new(BIN)
        .args(["run", "--upstream", "mysql://nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_through_the_proxy() {
    // Session mode: each pgbench client keeps a server connection, and pgbench starts once all
    // 8 are in: the pool fits them beside the lock monitor's connection (one slot of the pool)
    // and the headroom (10% of 10: 1, kept for another app).
    let s = Setup::new(|f| f.pool.pool_size = 10).await;
    assert_eq!(psql(s.proxy.local_addr().port(), &["-c", "SELECT 40 + 2"]), "42");
    pgbench_all_modes(&s, &["-S"]);
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_copy_out_streams_through_the_binary_in_bounded_memory() {
    use futures_util::StreamExt;
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let (mut child, url) = quick_start(&pg, &[]).await;
    let c = connect(&url).await.unwrap();
    // 1,000,000 rows of 1,000 bytes (plus newline): 1.001 GB of COPY data.
    let stream = c
        .copy_out("COPY (SELECT repeat('x', 1000) FROM generate_series(1, 1000000)) TO STDOUT")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut total = 0u64;
    while let Some(chunk) = within(Duration::from_secs(60), stream.next()).await {
        total += chunk.unwrap().len() as u64;
    }
    assert_eq!(total, 1_001_000_000);
    let peak = peak_rss_kib(child.id().unwrap());
    println!("pgvalve peak RSS while relaying 1 GB of COPY data: {peak} KiB");
    assert!(peak < 64 * 1024, "pgvalve peaked at {peak} KiB while relaying 1 GB");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_identity_caps_and_a_bad_file_keeps_the_running_config() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgvalve.toml");
    let rules = |max: &str| {
        format!("[[identity]]\nname = \"web\"\napplication_name = \"web*\"\nmax_client_connections = {max}\n")
    };
    std::fs::write(&file, rules("1")).unwrap();
    let (child, url) = quick_start(&pg, &["-c", file.to_str().unwrap()]).await;
    let web = format!("{url}?application_name=web");
    let first = connect(&web).await.unwrap();
    let e = connect(&web).await.unwrap_err();
    assert!(e
        .as_db_error()
        .unwrap()
        .message()
        .contains("(max_client_connections=1)"));
    let hup = |child: &tokio::process::Child| {
        let pid = child.id().unwrap().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    };
    // An invalid file is refused as a whole: the cap stays 1.
    std::fs::write(&file, rules("-3")).unwrap();
    hup(&child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect(&web).await.is_err());
    std::fs::write(&file, rules("2")).unwrap();
    hup(&child);
    eventually(
        Duration::from_secs(5),
        "the raised cap admits a second client",
        || async { connect(&web).await.is_ok() },
    )
    .await;
    first
        .simple_query("SELECT 1")
        .await
        .expect("the first client was not dropped");
}

#[allow(clippy::too_many_lines)] // a test: the 80-line rule is for non-test code
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_debug_output_the_console_or_metrics() {
    let pg = TestPostgres::start(PgOptions::default()).await.unwrap();
    let verifier = postgres_protocol::password::scram_sha_256(b"watch-secret-42");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgvalve.toml");
    let (port, http) = (free_port(), free_port());
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n\
             [admin]\nadmin_users = [\"app\"]\nstats_users = [\"watcher\"]\n\
             [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n\
             [users.app]\npassword = \"app-secret\"\n[users.watcher]\nscram_verifier = \"{verifier}\"\n",
            pg.port()
        ),
    )
    .unwrap();
    let config = pgvalve::config::load(&path).unwrap();
    let debug = format!("{config:?}");
    assert!(
        !debug.contains("app-secret") && !debug.contains(&verifier),
        "Debug output: {debug}"
    );

    let child = tokio::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .env("PGVALVE_LOG", "trace")
        .env("XDG_RUNTIME_DIR", RUNTIME_DIR)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = |user: &str, pw: &str, db: &str| format!("postgres://{user}:{pw}@127.0.0.1:{port}/{db}");
    eventually(Duration::from_secs(10), "the binary accepts clients", || async {
        connect(&url("app", "app-secret", "app")).await.is_ok()
    })
    .await;
    // Wrong passwords, right ones, the console, metrics, a reload.
    assert!(connect(&url("app", "wrong-app-secret", "app")).await.is_err());
    assert!(connect(&url("watcher", "watch-secret-4", "pgvalve")).await.is_err());
    let watcher = connect(&url("watcher", "watch-secret-42", "pgvalve")).await.unwrap();
    let admin = connect(&url("app", "app-secret", "pgvalve")).await.unwrap();
    let mut console = String::new();
    for cmd in [
        "SHOW CONFIG",
        "SHOW USERS",
        "SHOW DATABASES",
        "SHOW CLIENTS",
        "SHOW SERVERS",
    ] {
        for m in admin.simple_query(cmd).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                console += &(0..r.len())
                    .map(|i| r.get(i).unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("|");
            }
        }
    }
    watcher.simple_query("SHOW POOLS").await.unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", http)).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut metrics = String::new();
    sock.read_to_string(&mut metrics).await.unwrap();
    drop((watcher, admin));
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = within(Duration::from_secs(20), child.wait_with_output()).await.unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.len() > 1000, "trace logging was on");
    let salted = verifier.split('$').nth(2).unwrap_or(&verifier).to_string();
    for (place, text) in [("logs", &logs), ("console", &console), ("metrics", &metrics)] {
        for secret in ["app-secret", "watch-secret-42", verifier.as_str(), salted.as_str()] {
            assert!(!text.contains(secret), "{secret:?} appears in the {place}");
        }
    }
}

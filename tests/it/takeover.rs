//! Takeover: a second proxy takes the first one's listening socket and its clients over a
//! Unix control socket (file descriptors passed for real), while clients keep running
//! queries; none of them sees an error or a dropped connection, the first proxy ends with no
//! client, and PostgreSQL never sees more backends than the cap.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgvalve::config::{Config, FileConfig, PoolMode};
use pgvalve::ProxyHandle;
use tokio_postgres::{Client, NoTls};

use crate::support::{connect, eventually, within, Setup};

const CAP: u32 = 8;

fn takeover_config(dir: &std::path::Path) -> impl FnOnce(&mut FileConfig) + '_ {
    move |f: &mut FileConfig| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = CAP;
        f.pool.max_server_connections = CAP.into();
        f.pool.query_wait_timeout = Duration::from_secs(30);
        f.proxy.max_client_connections = 1000;
        f.proxy.takeover_socket = Some(dir.join("ctl.sock"));
        f.proxy.shutdown_timeout = Duration::from_secs(20);
    }
}

/// The running proxy, and the configuration its successor starts with (the same).
async fn old_and_new_config(dir: &std::path::Path) -> (Setup, Config) {
    let s = Setup::new(takeover_config(dir)).await;
    let mut f = s.pg.file_config();
    takeover_config(dir)(&mut f);
    (s, Config::validate(f, "test").expect("valid config"))
}

/// Every pgvalve backend of the application user (the sampler logs in as the superuser).
async fn sample_all_backends(s: &Setup) -> (Arc<AtomicI64>, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let su = s.pg.superuser().await.expect("superuser");
    let (peak, stop) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicBool::new(false)));
    let user = s.pg.opts.user.clone();
    let task = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = su
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
                        &[&user],
                    )
                    .await
                    .expect("count")
                    .get(0);
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    (peak, stop, task)
}

/// One client's loop: a prepared statement made before the takeover, plain queries, and
/// (every 4th round) a transaction of two statements with a short sleep inside.
async fn client_loop(c: Client, i: i32, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) -> Result<u64, String> {
    let st = c.prepare("SELECT $1::int4 + 1").await.map_err(|e| e.to_string())?;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let v: i32 = c
            .query_one(&st, &[&i])
            .await
            .map_err(|e| format!("prepared: {e}"))?
            .get(0);
        if v != i + 1 {
            return Err(format!("client {i} got {v}"));
        }
        if n.is_multiple_of(4) {
            c.batch_execute("BEGIN; SELECT pg_sleep(0.002); SELECT 1; COMMIT")
                .await
                .map_err(|e| format!("transaction: {e}"))?;
        } else {
            c.simple_query("SELECT 1").await.map_err(|e| format!("simple: {e}"))?;
        }
        n += 1;
        rounds.fetch_add(1, Ordering::Relaxed);
    }
    Ok(n)
}

async fn wait_rounds(rounds: &AtomicU64, more: u64) {
    let target = rounds.load(Ordering::Relaxed) + more;
    eventually(Duration::from_secs(60), "clients keep running queries", || async {
        rounds.load(Ordering::Relaxed) >= target
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_clients_move_to_the_new_process_without_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, config) = old_and_new_config(dir.path()).await;
    let (peak, stop_sampling, sampler) = sample_all_backends(&s).await;
    let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for i in 0..200 {
        let c = connect(&s.url()).await.expect("connect");
        clients.push(tokio::spawn(client_loop(c, i, stop.clone(), rounds.clone())));
    }
    wait_rounds(&rounds, 400).await;

    let new = within(Duration::from_secs(30), ProxyHandle::start_takeover(config))
        .await
        .expect("take over");
    assert_eq!(new.local_addr().port(), s.proxy.local_addr().port());
    within(Duration::from_secs(60), s.proxy.handed_over()).await;
    assert_eq!(
        s.proxy.shared().admission.clients(),
        0,
        "no client is left on the old process"
    );
    let Setup { pg, proxy: old } = s;
    within(Duration::from_secs(30), old.shutdown()).await;
    // Served by the new process alone from here on.
    wait_rounds(&rounds, 400).await;
    assert_eq!(
        new.shared().admission.clients(),
        200,
        "every client moved to the new process"
    );

    stop.store(true, Ordering::Relaxed);
    for (i, c) in clients.into_iter().enumerate() {
        let n = c
            .await
            .expect("client task")
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert!(n > 0, "client {i} ran queries");
    }
    stop_sampling.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "peak pgvalve backends {peak}, rounds {}",
        rounds.load(Ordering::Relaxed)
    );
    assert!(
        peak <= i64::from(CAP),
        "PostgreSQL saw {peak} pgvalve backends at once, cap {CAP}"
    );
    // A new client after the old process is gone reaches the new one.
    let c = connect(&format!(
        "postgres://{}:{}@{}/{}",
        pg.opts.user,
        pg.opts.password,
        new.local_addr(),
        pg.opts.database
    ))
    .await
    .expect("connect after the takeover");
    c.simple_query("SELECT 1").await.expect("query");
    new.shutdown().await;
}

#[tokio::test]
async fn a_moved_client_keeps_its_parameters_and_its_cancel_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, config) = old_and_new_config(dir.path()).await;
    let c = connect(&format!("{}?application_name=mover", s.url()))
        .await
        .expect("connect");
    c.batch_execute("CREATE SCHEMA moved_schema; SET search_path = moved_schema, public")
        .await
        .expect("set");
    let token = c.cancel_token();
    let new = within(Duration::from_secs(30), ProxyHandle::start_takeover(config))
        .await
        .expect("take over");
    within(Duration::from_secs(30), s.proxy.handed_over()).await;
    // Its parameters moved with it: the startup ones and the ones it SET.
    let row = c
        .query_one(
            "SELECT current_setting('search_path'), current_setting('application_name')",
            &[],
        )
        .await
        .expect("query after the takeover");
    assert_eq!(row.get::<_, String>(0), "moved_schema, public");
    assert_eq!(row.get::<_, String>(1), "mover");
    let sleeping = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    // Cancel until it lands (the sleep must have reached the server first).
    let mut cancelled = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel_query(NoTls).await.expect("send cancel");
        if sleeping.is_finished() {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "the cancel reached the moved client's query");
    let e = sleeping.await.expect("task").expect_err("cancelled");
    assert_eq!(crate::support::code(&e).as_deref(), Some("57014"));
    let Setup { proxy: old, .. } = s;
    old.shutdown().await;
    new.shutdown().await;
}

/// A client in a transaction stays on the old process; its CancelRequest lands on the new
/// one (which has the listening socket), which passes it to the old one: the query stops.
#[tokio::test]
async fn a_cancel_for_a_client_still_on_the_old_process_reaches_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, config) = old_and_new_config(dir.path()).await;
    let c = connect(&s.url()).await.expect("connect");
    c.batch_execute("BEGIN").await.expect("begin");
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await.map(|_| ());
        (c, r)
    });
    let new = within(Duration::from_secs(30), ProxyHandle::start_takeover(config))
        .await
        .expect("take over");
    // From here on only the new process accepts, the cancel's connection included.
    eventually(Duration::from_secs(10), "the old process hands over", || async {
        s.proxy.is_handing_over()
    })
    .await;
    let mut cancelled = false;
    for _ in 0..100 {
        token.cancel_query(NoTls).await.expect("send cancel");
        tokio::time::sleep(Duration::from_millis(50)).await;
        if sleeping.is_finished() {
            cancelled = true;
            break;
        }
    }
    assert!(cancelled, "the cancel reached the query on the old process");
    let (c, r) = sleeping.await.expect("task");
    assert_eq!(
        crate::support::code(&r.expect_err("cancelled")).as_deref(),
        Some("57014")
    );
    // The transaction ends; the client moves at its next idle moment and goes on.
    c.batch_execute("ROLLBACK").await.expect("rollback");
    within(Duration::from_secs(30), s.proxy.handed_over()).await;
    let one: i32 = c.query_one("SELECT 1", &[]).await.expect("after the move").get(0);
    assert_eq!(one, 1);
    let Setup { proxy: old, .. } = s;
    old.shutdown().await;
    new.shutdown().await;
}

/// What cannot move ends at its next idle moment with 57P01 (it reconnects, to the new
/// process): a transaction-mode client that LISTENs, and one pinned by a temporary table;
/// an ordinary idle client beside them moves and goes on.
#[tokio::test]
async fn listening_and_pinned_clients_are_closed_at_their_next_idle_moment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, config) = old_and_new_config(dir.path()).await;
    let watched = |url: String| async move {
        let (c, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        (c, tokio::spawn(conn))
    };
    let (listener, listener_conn) = watched(s.url()).await;
    listener.batch_execute("LISTEN jobs").await.expect("listen");
    let (pinned, pinned_conn) = watched(s.url()).await;
    pinned
        .batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .expect("pin");
    let ordinary = connect(&s.url()).await.expect("connect");
    ordinary.batch_execute("SELECT 1").await.expect("query");
    let new = within(Duration::from_secs(30), ProxyHandle::start_takeover(config))
        .await
        .expect("take over");
    for (what, conn) in [("listening", listener_conn), ("pinned", pinned_conn)] {
        let end = within(Duration::from_secs(20), conn).await.expect("task");
        let e = end.expect_err("closed by the old process");
        assert_eq!(crate::support::code(&e).as_deref(), Some("57P01"), "{what}: {e:?}");
    }
    within(Duration::from_secs(30), s.proxy.handed_over()).await;
    let one: i32 = ordinary.query_one("SELECT 1", &[]).await.expect("moved").get(0);
    assert_eq!(one, 1);
    // They reconnect to the new process, which has the listening socket now.
    let again = connect(&s.url()).await.expect("reconnect");
    again.batch_execute("LISTEN jobs").await.expect("listen again");
    drop((listener, pinned));
    let Setup { proxy: old, .. } = s;
    old.shutdown().await;
    new.shutdown().await;
}

/// A TLS client's loop of transactions (each inserts one row of `i`), reconnecting after a
/// close: (transactions committed, closes seen).
async fn tls_loop(
    cfg: tokio_postgres::Config,
    ca: String,
    i: i32,
    stop: Arc<AtomicBool>,
) -> Result<(i64, u32), String> {
    let connect = || async {
        let (c, conn) = cfg
            .connect(crate::tls::connector(&ca, false))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok::<_, String>(c)
    };
    let (mut c, mut committed, mut closes) = (connect().await?, 0i64, 0u32);
    let sql = format!("BEGIN; INSERT INTO moved VALUES ({i}); SELECT pg_sleep(0.002); COMMIT");
    while !stop.load(Ordering::Relaxed) {
        match c.batch_execute(&sql).await {
            Ok(()) => committed += 1,
            // A clean close between transactions: 57P01, or the connection closed.
            Err(e) if c.is_closed() || crate::support::code(&e).as_deref() == Some("57P01") => {
                closes += 1;
                c = connect().await?;
            }
            Err(e) => return Err(format!("tls client {i}: {e}")),
        }
    }
    Ok((committed, closes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_clients_are_closed_between_transactions_and_plaintext_ones_move() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = crate::tls::pki("takeover");
    let (cert, key) = crate::tls::write_pair(dir.path(), &p);
    let tweak = |f: &mut FileConfig| {
        takeover_config(dir.path())(f);
        f.tls.client_tls_cert_file = Some(cert.clone());
        f.tls.client_tls_key_file = Some(key.clone());
    };
    let s = Setup::new(tweak).await;
    let mut f = s.pg.file_config();
    tweak(&mut f);
    let config = Config::validate(f, "test").expect("valid config");
    s.client()
        .await
        .batch_execute("CREATE TABLE moved (client int)")
        .await
        .expect("table");
    let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let c = connect(&s.url()).await.expect("connect");
        plain.push(tokio::spawn(client_loop(c, i, stop.clone(), rounds.clone())));
        let mut cfg = crate::tls::client_config(&s.proxy);
        cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
        tls.push(tokio::spawn(tls_loop(cfg, p.ca_pem.clone(), i, stop.clone())));
    }
    wait_rounds(&rounds, 100).await;
    let new = within(Duration::from_secs(30), ProxyHandle::start_takeover(config))
        .await
        .expect("take over");
    let t0 = std::time::Instant::now();
    within(Duration::from_secs(60), s.proxy.handed_over()).await;
    eprintln!("handed over in {:?}", t0.elapsed());
    assert_eq!(
        s.proxy.shared().admission.clients(),
        0,
        "the old process has no client left"
    );
    wait_rounds(&rounds, 200).await;
    stop.store(true, Ordering::Relaxed);
    for (i, c) in plain.into_iter().enumerate() {
        c.await
            .expect("task")
            .unwrap_or_else(|e| panic!("plaintext client {i}: {e}"));
    }
    // Through the new process (same port).
    let su = s.client().await;
    for (i, t) in tls.into_iter().enumerate() {
        let (committed, closes) = t.await.expect("task").unwrap_or_else(|e| panic!("{e}"));
        // Closed once by the old process (its TLS state cannot move), never by the new one.
        assert_eq!(closes, 1, "TLS client {i} was closed {closes} times");
        let rows: i64 = su
            .query_one("SELECT count(*) FROM moved WHERE client = $1", &[&(i as i32)])
            .await
            .expect("count")
            .get(0);
        assert_eq!(
            rows, committed,
            "TLS client {i}: every acknowledged transaction, and only those"
        );
    }
    let Setup { pg: _pg, proxy: old } = s;
    old.shutdown().await;
    new.shutdown().await;
}

/// `pgvalve run -c FILE` (with `--takeover` when `takeover`).
fn spawn_binary(file: &std::path::Path, takeover: bool) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgvalve"));
    cmd.args(["run", "-c"]).arg(file);
    if takeover {
        cmd.arg("--takeover");
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn pgvalve")
}

/// Pids of processes whose command line has `file` and `--takeover`.
fn successors_of(file: &std::path::Path) -> Vec<u32> {
    let file = file.display().to_string();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.contains(&file) && args.iter().any(|a| a == "--takeover") {
            pids.push(pid);
        }
    }
    pids
}

fn kill(pid: u32, sig: &str) {
    let pid = pid.to_string();
    assert!(std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

/// The binary takes itself over (`--takeover`, or SIGUSR2 to the running one) while 50
/// clients run queries: the old process exits cleanly once empty, no client sees an error.
async fn binary_takeover(by_signal: bool) {
    let pg = pgvalve::testkit::TestPostgres::start(Default::default())
        .await
        .expect("PostgreSQL");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (o, file) = (&pg.opts, dir.path().join("pgvalve.toml"));
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\ntakeover_socket = {ctl:?}\n[pool]\npool_mode = \"transaction\"\npool_size = 4\nmax_server_connections = 4\n[databases.{db}]\nhost = \"127.0.0.1\"\nport = {pg_port}\n[users.{user}]\npassword = {pw:?}\n",
        ctl = dir.path().join("ctl.sock").display().to_string(),
        db = o.database,
        pg_port = pg.port(),
        user = o.user,
        pw = o.password,
    );
    std::fs::write(&file, text).expect("config");
    let mut old = spawn_binary(&file, false);
    let url = format!("postgres://{}:{}@127.0.0.1:{port}/{}", o.user, o.password, o.database);
    eventually(Duration::from_secs(30), "the first pgvalve accepts clients", || async {
        connect(&url).await.is_ok()
    })
    .await;
    let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for i in 0..50 {
        let c = connect(&url).await.expect("connect");
        clients.push(tokio::spawn(client_loop(c, i, stop.clone(), rounds.clone())));
    }
    wait_rounds(&rounds, 200).await;
    let new = if by_signal {
        kill(old.id().expect("pid"), "-USR2");
        None
    } else {
        Some(spawn_binary(&file, true))
    };
    let status = within(Duration::from_secs(60), old.wait()).await.expect("wait");
    assert!(status.success(), "the old pgvalve exits cleanly once empty: {status}");
    wait_rounds(&rounds, 200).await;
    stop.store(true, Ordering::Relaxed);
    for (i, c) in clients.into_iter().enumerate() {
        c.await.expect("task").unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    let successors = successors_of(&file);
    assert_eq!(successors.len(), 1, "one successor: {successors:?}");
    kill(successors[0], "-TERM");
    if let Some(mut new) = new {
        let status = within(Duration::from_secs(30), new.wait()).await.expect("wait");
        assert!(status.success(), "{status}");
    } else {
        eventually(Duration::from_secs(30), "the successor stops", || async {
            successors_of(&file).is_empty()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_hands_over_to_a_new_binary_and_exits_when_empty() {
    binary_takeover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_a_successor_that_takes_the_binary_over() {
    binary_takeover(true).await;
}

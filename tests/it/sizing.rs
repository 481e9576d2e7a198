//! `max_server_connections = "auto"` and `"N%"`: sized from a real PostgreSQL's
//! max_connections at start and at each reload, shown in SHOW CONFIG, held under load; start
//! refused when PostgreSQL cannot be read; `pgvalve check --against` warns about pools that
//! do not fit.

use std::process::Command;
use std::time::Duration;

use pgvalve::config::{self, Overrides, PoolMode};
use pgvalve::testkit::{PgOptions, TestPostgres};
use pgvalve::ProxyHandle;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_pgvalve");

fn small(max_connections: u32) -> PgOptions {
    PgOptions {
        max_connections,
        ..Default::default()
    }
}

/// SHOW CONFIG's (value, source) of max_server_connections.
async fn shown(proxy: &ProxyHandle) -> (String, String) {
    let c = connect(&format!("postgres://app:app-secret@{}/pgvalve", proxy.local_addr()))
        .await
        .unwrap();
    let rows = c.simple_query("SHOW CONFIG").await.unwrap();
    let get = |key: &str| {
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get("key") == Some(key) => {
                    r.get("value").map(str::to_string)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("SHOW CONFIG has no {key}"))
    };
    (get("max_server_connections"), get("max_server_connections_source"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_is_what_max_connections_leaves_after_the_reserved_ones() {
    let s = Setup::with(small(20), |f| {
        f.pool.max_server_connections = "auto".parse().unwrap();
        f.admin.admin_users = vec!["app".into()];
    })
    .await;
    let (value, source) = shown(&s.proxy).await;
    assert_eq!(
        value, "17",
        "20 - 3 superuser_reserved_connections (PostgreSQL 15: no reserved_connections)"
    );
    assert!(
        source.starts_with("auto: max_connections 20 - superuser_reserved_connections 3 - reserved_connections 0 = 17"),
        "{source}"
    );
    assert_eq!(
        s.client()
            .await
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    // A configuration handed over already validated (not sized): the budget in force stays;
    // a number replaces it at once.
    let mut f = s.pg.file_config();
    f.pool.max_server_connections = "auto".parse().unwrap();
    f.admin.admin_users = vec!["app".into()];
    let r = s.proxy.reload(config::Config::validate(f.clone(), "reload").unwrap());
    assert!(
        r.changes.iter().all(|c| !c.starts_with("max_server_connections")),
        "{r:?}"
    );
    let (value, source) = shown(&s.proxy).await;
    assert_eq!(value, "17");
    assert!(
        source.ends_with("(kept: not read again at the last reload)"),
        "{source}"
    );
    f.pool.max_server_connections = 5.into();
    let r = s.proxy.reload(config::Config::validate(f, "reload").unwrap());
    assert!(
        r.changes.iter().any(|c| c == "max_server_connections: 17 -> 5"),
        "{r:?}"
    );
    assert_eq!(shown(&s.proxy).await, ("5".to_string(), "config".to_string()));
}

/// The most backends of pgvalve's (the pools' and the lock monitor's, all as "app") that
/// PostgreSQL had at once, sampled on a superuser connection.
struct Peak {
    peak: std::sync::Arc<std::sync::atomic::AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Peak {
    async fn start(s: &Setup) -> Peak {
        let su = s.pg.superuser().await.expect("superuser connection");
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                let n: i64 = su
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = 'app'",
                        &[],
                    )
                    .await
                    .expect("sample")
                    .get(0);
                p.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Peak { peak, task }
    }

    fn stop(self) -> i64 {
        self.task.abort();
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_of_what_postgres_allows_holds_under_a_load_of_more_clients() {
    let s = Setup::with(small(20), |f| {
        f.pool.max_server_connections = "50%".parse().unwrap();
        f.pool.pool_size = 20;
        f.pool.pool_mode = PoolMode::Session;
        f.admin.admin_users = vec!["app".into()];
    })
    .await;
    let (value, source) = shown(&s.proxy).await;
    assert_eq!(value, "8", "50% of 17, rounded down");
    assert!(source.starts_with("50% of max_connections 20"), "{source}");
    let peak = Peak::start(&s).await;
    // Session mode: each client holds a server connection for its whole session.
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let url = s.url();
            tokio::spawn(async move {
                let c = connect(&url).await.unwrap_or_else(|e| panic!("client {i}: {e:?}"));
                for r in 0..3 {
                    c.query_one("SELECT $1::int FROM pg_sleep(0.05)", &[&r])
                        .await
                        .unwrap_or_else(|e| panic!("client {i} round {r}: {e:?}"));
                }
            })
        })
        .collect();
    for t in tasks {
        within(Duration::from_secs(120), t).await.unwrap();
    }
    let peak = peak.stop();
    assert!(
        peak <= 8,
        "PostgreSQL saw {peak} backends from pgvalve with a budget of 8"
    );
    assert_eq!(peak, 8, "24 clients and the lock monitor filled the budget of 8");
}

/// A config file for `pg` with `max_server_connections = "auto"` whose first database is at
/// `port`.
fn auto_file(dir: &std::path::Path, port: u16, pool: &str) -> std::path::PathBuf {
    let path = dir.join("pgvalve.toml");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[databases.app]\nhost = \"127.0.0.1\"\nport = {port}\n[users.app]\npassword = \"app-secret\"\n[pool]\nmax_server_connections = \"auto\"\n{pool}\n[admin]\nadmin_users = [\"app\"]\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_sizes_again_and_keeps_the_budget_when_postgres_cannot_be_read() {
    let mut pg = TestPostgres::start(small(20)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = auto_file(dir.path(), pg.port(), "");
    let proxy = ProxyHandle::start(config::load(&path).unwrap()).await.unwrap();
    proxy.set_reload_source(Some(path.clone()), Overrides::default());
    assert_eq!(shown(&proxy).await.0, "17");
    // PostgreSQL restarted with more connections: the next reload reads them.
    pg.opts.max_connections = 30;
    within(Duration::from_secs(60), pg.restart()).await.unwrap();
    let r = proxy.reload_from_source().await.expect("reload");
    assert!(
        r.changes.iter().any(|c| c == "max_server_connections: 17 -> 27"),
        "{r:?}"
    );
    let (value, source) = shown(&proxy).await;
    assert_eq!(value, "27");
    assert!(source.starts_with("auto: max_connections 30"), "{source}");
    // PostgreSQL cannot be read (the first database now points at a closed port): the
    // reload goes through, the budget in force stays.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[databases.app]",
        &format!("[databases.aaa]\nhost = \"127.0.0.1\"\nport = {closed}\n[databases.app]"),
    );
    std::fs::write(&path, text).unwrap();
    let s = Setup { pg, proxy };
    let c = connect(&s.url_as("app", "app-secret", "pgvalve")).await.unwrap();
    c.simple_query("RELOAD").await.expect("RELOAD goes through");
    let (value, source) = shown(&s.proxy).await;
    assert_eq!(value, "27", "the budget in force stays");
    assert!(source.contains("kept"), "{source}");
    assert_eq!(
        s.client()
            .await
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    s.proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_refused_when_postgres_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = auto_file(dir.path(), closed, "");
    let e = ProxyHandle::start(config::load(&path).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "max_server_connections = \"auto\": cannot read max_connections from PostgreSQL at 127.0.0.1:{closed} (database app, user app):"
        )),
        "{e}"
    );
}

/// Runs `pgvalve check -c FILE --against URL` with `extra` arguments.
fn check(file: &std::path::Path, url: &str, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(file)
        .args(["--against", url])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_against_warns_about_pools_postgres_cannot_take() {
    let pg = TestPostgres::start(small(20)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pool: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "[databases.app]\nport = {}\n[databases.other]\nport = {}\n[users.app]\npassword = \"app-secret\"\n[pool]\n{pool}\n",
            pg.port(),
            pg.port()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let fits = write("fits.toml", "pool_size = 8\nmax_server_connections = 0");
    let (code, out) = check(&fits, &pg.url(), &["--strict"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("warning"), "{out}");
    assert!(
        out.contains("max_connections 20 - superuser_reserved_connections 3 - reserved_connections 0 = 17"),
        "{out}"
    );
    assert!(out.contains("ok: the pools fit"), "{out}");

    let oversize = write("oversize.toml", "pool_size = 10\nmax_server_connections = 50");
    let (code, out) = check(&oversize, &pg.url(), &[]);
    assert_eq!(code, Some(0), "warnings alone do not fail without --strict: {out}");
    assert!(
        out.contains("warning: pgvalve may open 20 server connections, more than the 17 PostgreSQL allows"),
        "{out}"
    );
    assert!(
        out.contains("warning: max_server_connections = 50 is more than the 17"),
        "{out}"
    );
    let (code, _) = check(&oversize, &pg.url(), &["--strict"]);
    assert_eq!(code, Some(1));

    // "auto" makes the same pools fit.
    let auto = write("auto.toml", "pool_size = 10\nmax_server_connections = \"auto\"");
    let (code, out) = check(&auto, &pg.url(), &["--strict"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("max_server_connections = \"auto\": 17 on this PostgreSQL"),
        "{out}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, out) = check(&fits, &format!("postgres://app:app-secret@127.0.0.1:{closed}/app"), &[]);
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("cannot read PostgreSQL's limits"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_postgres_within_the_budget_or_keeps_it() {
    let pg = TestPostgres::start(small(10)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = auto_file(dir.path(), pg.port(), "pool_size = 20\nserver_connect_timeout = \"1s\"");
    let proxy = ProxyHandle::start(config::load(&path).unwrap()).await.unwrap();
    proxy.set_reload_source(Some(path.clone()), Overrides::default());
    assert_eq!(shown(&proxy).await.0, "7", "10 - 3 superuser_reserved_connections");
    let s = Setup { pg, proxy };
    // The lock monitor holds one slot; six sessions hold the rest. (No superuser session
    // meanwhile: PostgreSQL counts them in the slots "auto" gives pgvalve.)
    let mut held = Vec::new();
    for i in 0..6 {
        let c = s.client().await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        held.push(c);
        if i == 0 {
            eventually(Duration::from_secs(15), "the lock monitor holds its slot", || async {
                console(&s, "SHOW POOLS")
                    .await
                    .iter()
                    .any(|r| r["database"] == "app" && r["sv_own"] == "1")
            })
            .await;
        }
    }
    // No slot for the reload's own connection: pgvalve's budget refuses it (PostgreSQL would
    // refuse an eighth backend too, with another message) after server_connect_timeout, and
    // the budget in force stays.
    let r = s.proxy.reload_from_source().await.expect("the reload goes through");
    assert!(
        r.warnings.iter().any(
            |w| w.contains("all 7 server connections of max_server_connections are in use")
                && w.contains("max_server_connections stays 7")
        ),
        "{r:?}"
    );
    // A slot free: the reload reads PostgreSQL again.
    drop(held.pop());
    eventually(Duration::from_secs(15), "a reload sized from PostgreSQL", || async {
        s.proxy.reload_from_source().await.is_ok_and(|r| r.warnings.is_empty())
    })
    .await;
    assert!(shown(&s.proxy).await.1.starts_with("auto: max_connections 10"));
    drop(held);
    s.proxy.shutdown().await;
}

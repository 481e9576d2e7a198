//! Real drivers in transaction mode: psycopg 3 + Django (200 client threads on 5 server
//! connections) and asyncpg (prepared statements and cache invalidation), in a virtualenv the
//! test creates under target/ (pip, from PyPI).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use pgvalve::config::PoolMode;

use crate::support::*;

/// A virtualenv with psycopg 3, Django and asyncpg, created once (asyncpg added to one made
/// before it was needed).
pub(crate) fn venv_python() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/compat-venv");
    let python = dir.join("bin/python");
    if !dir.join(".ready").exists() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&dir).status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "python3 -m venv failed: install python3 with the venv module"
        );
    }
    pip_install(&python, &dir.join(".ready"), &["psycopg[binary]>=3.1", "django>=4.2"]);
    pip_install(&python, &dir.join(".ready-asyncpg"), &["asyncpg>=0.29"]);
    python
}

/// Installs `packages` into the venv of `python` unless `marker` says it was done.
pub fn pip_install(python: &std::path::Path, marker: &std::path::Path, packages: &[&str]) {
    if marker.exists() {
        return;
    }
    let pip = Command::new(python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .expect("pip");
    assert!(pip.success(), "pip install {packages:?} failed");
    std::fs::write(marker, b"").unwrap();
}

/// Runs tests/compat/asyncpg_compat.py with clients on `port` and schema changes made
/// directly on `ddl_port`; its JSON summary (it checks every result itself).
async fn asyncpg_run(python: &std::path::Path, port: u16, ddl_port: u16) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/asyncpg_compat.py");
    let out = within(
        Duration::from_secs(180),
        tokio::process::Command::new(python)
            .args([
                script,
                "127.0.0.1",
                &port.to_string(),
                &ddl_port.to_string(),
                "app",
                "app",
                "app-secret",
                "8",
            ])
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "asyncpg compat on port {port} failed: {stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// asyncpg's prepared statements and statement-cache invalidation (8 connections on 4 server
/// connections, schema changed beside them): every result right, and the same outcomes as
/// the same script run directly against PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_prepared_statements_and_cache_invalidation_as_directly() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 4;
        f.pool.query_wait_timeout = Duration::from_secs(60);
    })
    .await;
    let direct = asyncpg_run(&python, s.pg.port(), s.pg.port()).await;
    let proxied = asyncpg_run(&python, s.proxy.local_addr().port(), s.pg.port()).await;
    println!("asyncpg directly: {direct}\nasyncpg through pgvalve: {proxied}");
    assert_eq!(proxied["ok"], true);
    assert_eq!(proxied["seen"], direct["seen"], "through pgvalve as directly");
    assert_eq!(proxied["checks"], direct["checks"]);
    assert!(proxied["checks"].as_u64().unwrap() > 300, "{proxied}");
    assert!(s.proxy.shared().pools.stats().iter().all(|p| p.open <= 4));
    // Prepared statements pin nothing; asyncpg's look-up of a type that is not built in
    // (set_config('jit', 'off', false) around it) pins the three connections that do it.
    let pins = s.proxy.shared().pins.total();
    assert!(pins <= 3, "{pins} sessions pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_and_psycopg3_share_five_server_connections() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pgvalve=info")
        .with_test_writer()
        .try_init();
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 5;
        f.pool.query_wait_timeout = Duration::from_secs(60);
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/django_compat.py");
    let addr = s.proxy.local_addr();
    let out = within(
        Duration::from_secs(300),
        tokio::process::Command::new(&python)
            .args([
                script,
                "127.0.0.1",
                &addr.port().to_string(),
                "app",
                "app",
                "app-secret",
                "200",
            ])
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("django compat: {stdout}");
    assert!(out.status.success(), "django compat failed: {stdout}\n{stderr}");
    assert!(stdout.contains("\"ok\": 200"), "{stdout}");
    assert!(s.proxy.shared().pools.stats().iter().all(|p| p.open <= 5));
    // Only .iterator()'s WITH HOLD cursor pins (one per thread); prepared statements do not.
    let pins = s.proxy.shared().pins.total();
    println!("django compat: {pins} sessions pinned");
    assert!(pins <= 200, "{pins}");
}

/// psycopg 3.3's bundled libpq 18 with `max_protocol_version=latest` asks for protocol 3.2
/// and gets it from pgvalve (whatever the server behind speaks; the test kit's is older), with
/// a 32-byte cancel key: it connects, queries, and cancels a running pg_sleep with that key,
/// in both pool modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_18_asking_for_the_latest_protocol_gets_3_2_and_cancels() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let s = Setup::new(|f| f.pool.pool_mode = mode).await;
        libpq_18_latest_protocol_query_and_cancel(&python, &s, mode).await;
    }
}

/// Through `s`'s proxy (in `mode`), psycopg with libpq 18 and `max_protocol_version=latest`:
/// speaks 3.2, queries, has a running `pg_sleep(60)` cancelled (57014) by `cancel_safe`, and
/// queries again. Panics when any of it does not happen.
pub(crate) async fn libpq_18_latest_protocol_query_and_cancel(python: &std::path::Path, s: &Setup, mode: PoolMode) {
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=app user=app password=app-secret max_protocol_version=latest",
        s.proxy.local_addr().port()
    );
    let script = "import sys, threading, psycopg\n\
        print(psycopg.pq.version())\n\
        with psycopg.connect(sys.argv[1], autocommit=True) as c:\n\
        \x20   print(c.pgconn.full_protocol_version, c.execute('select 40 + 2').fetchone()[0])\n\
        \x20   done = threading.Event()\n\
        \x20   def canceller():\n\
        \x20       while not done.wait(0.5):\n\
        \x20           c.cancel_safe()\n\
        \x20   t = threading.Thread(target=canceller)\n\
        \x20   t.start()\n\
        \x20   try:\n\
        \x20       c.execute('select pg_sleep(60)')\n\
        \x20       print('not cancelled')\n\
        \x20   except psycopg.errors.QueryCanceled:\n\
        \x20       print('cancelled')\n\
        \x20   done.set()\n\
        \x20   t.join()\n\
        \x20   print(c.execute('select 7').fetchone()[0])\n";
    let out = within(
        Duration::from_secs(60),
        tokio::process::Command::new(python).args(["-c", script, &dsn]).output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{mode:?}: {stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let libpq: u32 = lines[0].trim().parse().unwrap();
    assert!(
        libpq >= 180_000,
        "the bundled libpq is {libpq}: this test needs libpq 18"
    );
    assert_eq!(
        lines[1..],
        ["30002 42", "cancelled", "7"],
        "{mode:?}: protocol 3.2, the query's result, the cancelled sleep, and the session after it"
    );
}

/// Runs `manage.py test --noinput` of tests/compat/djproject through pgvalve in `mode`, with
/// `extra` arguments (`--parallel 2`); the config routes every database name ("*") to the
/// cluster, so Django reaches `app`, `postgres` and its `test_app*` databases. Returns
/// Django's output; panics with it when the run fails.
async fn django_test_run(python: &std::path::Path, s: &Setup, extra: &[&str]) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/djproject");
    let out = within(
        Duration::from_secs(240),
        tokio::process::Command::new(python)
            .current_dir(dir)
            .args(["manage.py", "test", "--noinput", "-v", "2"])
            .args(extra)
            .env("PGVALVE_HOST", "127.0.0.1")
            .env("PGVALVE_PORT", s.proxy.local_addr().port().to_string())
            .env("PGVALVE_DB", &s.pg.opts.database)
            .env("PGVALVE_USER", &s.pg.opts.user)
            .env("PGVALVE_PASSWORD", &s.pg.opts.password)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output(),
    )
    .await
    .expect("run manage.py test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "manage.py test {extra:?} failed:\n{text}");
    text
}

/// A proxy in `mode` in front of a fresh cluster where the app role may create databases,
/// with every database name routed to it.
async fn django_setup(mode: PoolMode) -> Setup {
    let s = Setup::new(|f| {
        f.pool.pool_mode = mode;
        f.pool.pool_size = 5;
        let app = f.databases.values().next().cloned().expect("the app database");
        f.databases.insert("*".into(), app);
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute(&format!("ALTER ROLE \"{}\" CREATEDB", s.pg.opts.user))
        .await
        .unwrap();
    s
}

/// Names of the test databases left on the server.
async fn test_databases(s: &Setup) -> Vec<String> {
    let su = s.pg.superuser().await.unwrap();
    su.query(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'test\\_%' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Django's test runner through pgvalve: it creates test_app (connected to `postgres`), runs
/// its tests there, and drops it again from `postgres` while pgvalve still has idle pooled
/// connections and the lock monitor's connection to test_app; with `--parallel 2` it first
/// clones test_app twice (`CREATE DATABASE ... TEMPLATE test_app`). pgvalve closes its own
/// idle connections to the database before forwarding each of those statements, so every run
/// succeeds and no test database is left behind.
async fn django_test_runner_in(mode: PoolMode) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pgvalve=info")
        .with_test_writer()
        .try_init();
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let s = django_setup(mode).await;
    let out = django_test_run(&python, &s, &[]).await;
    assert!(out.contains("Ran 6 tests") && out.contains("OK"), "{mode:?}:\n{out}");
    assert_eq!(test_databases(&s).await, Vec::<String>::new(), "{mode:?}:\n{out}");
    let out = django_test_run(&python, &s, &["--parallel", "2"]).await;
    assert!(
        out.contains("Cloning test database"),
        "{mode:?}: the run cloned:\n{out}"
    );
    assert!(out.contains("Ran 6 tests") && out.contains("OK"), "{mode:?}:\n{out}");
    assert_eq!(test_databases(&s).await, Vec::<String>::new(), "{mode:?}:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_test_runner_creates_and_drops_its_databases_in_session_mode() {
    django_test_runner_in(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_test_runner_creates_and_drops_its_databases_in_transaction_mode() {
    django_test_runner_in(PoolMode::Transaction).await;
}

/// psycopg 3 closes ("deallocates") a prepared statement it evicts from its cache: pgvalve
/// closes the shared statement on the server too once no client uses it (seen through
/// pg_prepared_statements on the only server connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_deallocated_statements_are_closed_on_the_server() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 1;
    })
    .await;
    let dsn = format!(
        "host=127.0.0.1 port={} dbname=app user=app password=app-secret",
        s.proxy.local_addr().port()
    );
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True, prepare_threshold=0) as c:
    c.prepared_max = 1
    def copies(text):
        q = "select count(*) from pg_prepared_statements where statement = %s and name like 'pgv\\_%%'"
        return c.execute(q, (text,), prepare=False).fetchone()[0]
    assert c.execute("select 1 + %s::int", (1,)).fetchone()[0] == 2
    before = copies("select 1 + $1::int")
    assert c.execute("select 2 + %s::int", (1,)).fetchone()[0] == 3  # evicts the first
    print(before, copies("select 1 + $1::int"), copies("select 2 + $1::int"))
"#;
    let out = within(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .args(["-c", script, &dsn])
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.trim(),
        "1 0 1",
        "prepared, closed after psycopg deallocated it; the other stays"
    );
}

/// psycopg 3's view of its backend pid (`conn.info.backend_pid`, from BackendKeyData) and of
/// its own notifications: in session mode the pid is the backend's (pg_backend_pid() and
/// pg_stat_activity agree); in transaction mode a notification its own NOTIFY caused carries
/// the pid it was given, so "skip my own notifications" works in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sees_its_backend_pid_and_its_own_notifications() {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let script = r#"
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True, application_name="pid-probe") as c:
    given = c.info.backend_pid
    real = c.execute("select pg_backend_pid()").fetchone()[0]
    seen = c.execute("select count(*) from pg_stat_activity where pid = %s and application_name = 'pid-probe'", (given,)).fetchone()[0]
    c.execute("LISTEN ch")
    c.execute("NOTIFY ch, 'mine'")
    n = next(c.notifies(timeout=5, stop_after=1))
    print(given == real, seen, n.pid == given, n.payload)
"#;
    for (mode, want) in [
        (PoolMode::Session, "True 1 True mine"),
        (PoolMode::Transaction, "False 0 True mine"),
    ] {
        let s = Setup::new(|f| f.pool.pool_mode = mode).await;
        let dsn = format!(
            "host=127.0.0.1 port={} dbname=app user=app password=app-secret",
            s.proxy.local_addr().port()
        );
        let out = within(
            Duration::from_secs(60),
            tokio::process::Command::new(&python)
                .args(["-c", script, &dsn])
                .output(),
        )
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode:?}: {stdout}\n{stderr}");
        assert_eq!(
            stdout.trim(),
            want,
            "{mode:?}: pid as given = real, in pg_stat_activity, own notification"
        );
    }
}

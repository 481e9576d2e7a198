//! Shared helpers: a throwaway PostgreSQL with a pgvalve in front, clients, bounded waits.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvalve::config::{Config, FileConfig};
use pgvalve::testkit::{PgOptions, TestPostgres};
use pgvalve::ProxyHandle;
use tokio_postgres::{Client, NoTls};

/// A cluster and a proxy in front of it.
pub struct Setup {
    pub pg: TestPostgres,
    pub proxy: ProxyHandle,
}

impl Setup {
    /// Default cluster, proxy config adjusted by `tweak`.
    pub async fn new(tweak: impl FnOnce(&mut FileConfig)) -> Setup {
        Self::with(PgOptions::default(), tweak).await
    }

    pub async fn with(opts: PgOptions, tweak: impl FnOnce(&mut FileConfig)) -> Setup {
        let pg = TestPostgres::start(opts).await.expect("start PostgreSQL");
        let mut f = pg.file_config();
        tweak(&mut f);
        let proxy = ProxyHandle::start(Config::validate(f, "test").expect("valid config"))
            .await
            .expect("start proxy");
        Setup { pg, proxy }
    }

    /// URL of the application role through the proxy.
    pub fn url(&self) -> String {
        self.url_as(&self.pg.opts.user, &self.pg.opts.password, &self.pg.opts.database)
    }

    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@{}/{db}", self.proxy.local_addr())
    }

    /// A client through the proxy.
    pub async fn client(&self) -> Client {
        connect(&self.url()).await.expect("connect through pgvalve")
    }

    /// Client backends of the application database, seen by PostgreSQL.
    pub async fn backends(&self, su: &Client) -> i64 {
        count_backends(su, &self.pg.opts.database).await
    }

    /// Starts sampling [`Setup::backends`] every 5 ms (on a superuser connection of its own).
    pub async fn sample_backends(&self) -> PeakBackends {
        let su = self.pg.superuser().await.expect("superuser connection");
        let (peak, stop) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicBool::new(false)));
        let task = {
            let (peak, stop, db) = (peak.clone(), stop.clone(), self.pg.opts.database.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(count_backends(&su, &db).await, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        PeakBackends { peak, stop, task }
    }
}

/// Pool backends of `db` (client backends other than the lock monitor's).
async fn count_backends(su: &Client, db: &str) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> 'pgvalve lock monitor'",
        &[&db],
    )
    .await
    .expect("count backends")
    .get(0)
}

/// Waits up to `d` until no backend matching `filter` (a WHERE clause on pg_stat_activity)
/// is left; panics naming `what` otherwise.
pub async fn no_backends_left(su: &Client, d: Duration, what: &str, filter: &str) {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {filter}");
    eventually(d, what, || async {
        let n: i64 = su.query_one(&sql, &[]).await.expect("count backends").get(0);
        n == 0
    })
    .await;
}

/// A running sample of the peak number of backends (see [`Setup::sample_backends`]).
pub struct PeakBackends {
    peak: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakBackends {
    /// Stops sampling; the most backends seen at once.
    pub async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("sampler");
        self.peak.load(Ordering::Relaxed)
    }
}

pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = within(Duration::from_secs(30), tokio_postgres::connect(url, NoTls)).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connects and keeps the connection task's handle (to kill the client abruptly).
pub async fn connect_killable(url: &str) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, task)
}

/// Awaits `f` or panics after `d`.
pub async fn within<T>(d: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| panic!("did not finish within {d:?}"))
}

/// Polls `check` until it returns true, or panics after `d`.
pub async fn eventually<F, Fut>(d: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < d {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not true within {d:?}");
}

/// SQLSTATE of an error from tokio-postgres, if it came from the server side.
pub fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Runs pgbench as the application role. Returns its report.
pub fn pgbench(port: u16, args: &[&str]) -> String {
    let bindir = pgvalve::testkit::find_bindir().expect("PostgreSQL binaries");
    let out = std::process::Command::new(bindir.join("pgbench"))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app", "app"])
        .env("PGPASSWORD", "app-secret")
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// pgbench -i (scale 1) directly on the cluster, then `script_args` for 2 s with 8 clients
/// through the proxy in every query mode; every run must finish with no failed transaction.
pub fn pgbench_all_modes(s: &Setup, script_args: &[&str]) {
    pgbench(s.pg.port(), &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        let mut args = vec!["-n", "-c", "8", "-j", "2", "-T", "2", "-M", mode];
        args.extend_from_slice(script_args);
        let text = pgbench(s.proxy.local_addr().port(), &args);
        assert!(text.contains("number of failed transactions: 0"), "-M {mode}: {text}");
    }
}

/// Runs psql as the application role against `port` with `args` (-c ... and the like);
/// returns its trimmed standard output.
pub fn psql(port: u16, args: &[&str]) -> String {
    let bindir = pgvalve::testkit::find_bindir().expect("PostgreSQL binaries");
    let out = std::process::Command::new(bindir.join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app",
            "-d",
            "app",
            "-tA",
        ])
        .args(args)
        .env("PGPASSWORD", "app-secret")
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Rows of a console command (as the app user, an admin) as (column -> value) maps.
pub async fn console(s: &Setup, cmd: &str) -> Vec<std::collections::HashMap<String, String>> {
    let c = connect(&s.url_as("app", "app-secret", "pgvalve")).await.unwrap();
    c.simple_query(cmd)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

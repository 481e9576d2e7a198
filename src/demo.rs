//! `pgvalve demo`: the main job on an embedded default.
//!
//! Beside the flow, using the test kit: starts a throwaway PostgreSQL with a small
//! `max_connections`, starts pgvalve in front of it, and fires the same surge of concurrent
//! clients at both. Each client connects, runs one short transaction and disconnects. A
//! sampler counts the server's client backends every 10 ms. Everything stops on return.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Barrier;
use tokio_postgres::NoTls;

use crate::config::Config;
use crate::testkit::{PgOptions, TestPostgres};
use crate::ProxyHandle;

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Concurrent clients in the surge.
    pub clients: usize,
    /// PostgreSQL's max_connections.
    pub max_connections: u32,
    /// pgvalve's pool size (server connections).
    pub pool_size: u32,
    /// How long each transaction holds its connection.
    pub hold: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            clients: 300,
            max_connections: 20,
            pool_size: 15,
            hold: Duration::from_millis(20),
        }
    }
}

/// Results of one surge.
#[derive(Debug, Clone, Default)]
pub struct SurgeResult {
    /// Clients that committed.
    pub ok: usize,
    /// Clients refused with SQLSTATE 53300.
    pub refused: usize,
    /// Other failures, first message.
    pub(crate) other_errors: usize,
    /// One example of an error message.
    pub(crate) example_error: Option<String>,
    /// Highest number of client backends seen on PostgreSQL.
    pub peak_server_connections: i64,
    /// Median latency from release to commit.
    pub(crate) p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// Both surges.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Options used.
    pub opts: DemoOptions,
    /// Straight at PostgreSQL.
    pub direct: SurgeResult,
    /// Through pgvalve.
    pub proxied: SurgeResult,
}

impl DemoReport {
    /// The demo's claim: through pgvalve nobody is refused and PostgreSQL stays under the cap.
    pub fn proxy_held(&self) -> bool {
        self.proxied.refused == 0
            && self.proxied.other_errors == 0
            && self.proxied.peak_server_connections <= i64::from(self.opts.pool_size)
    }

    /// A side-by-side table.
    pub fn render(&self) -> String {
        let (d, p) = (&self.direct, &self.proxied);
        let ms = |x: Duration| format!("{:.0} ms", x.as_secs_f64() * 1000.0);
        let mut s = format!(
            "\n{:<34}{:>16}{:>20}\n",
            format!("surge of {} clients", self.opts.clients),
            "direct",
            "through pgvalve"
        );
        let rows = [
            ("committed", d.ok.to_string(), p.ok.to_string()),
            (
                "refused: too many clients (53300)",
                d.refused.to_string(),
                p.refused.to_string(),
            ),
            ("other errors", d.other_errors.to_string(), p.other_errors.to_string()),
            (
                "peak server connections",
                format!("{} / {}", d.peak_server_connections, self.opts.max_connections),
                format!("{} (cap {})", p.peak_server_connections, self.opts.pool_size),
            ),
            ("latency p50", ms(d.p50), ms(p.p50)),
            ("latency p99", ms(d.p99), ms(p.p99)),
        ];
        for (name, a, b) in rows {
            s.push_str(&format!("{name:<34}{a:>16}{b:>20}\n"));
        }
        if let Some(e) = &d.example_error {
            s.push_str(&format!("\ndirect error, for example: {e}\n"));
        }
        if let Some(e) = &p.example_error {
            s.push_str(&format!("through pgvalve, error: {e}\n"));
        }
        s
    }
}

/// Runs the demo.
///
/// # Errors
/// PostgreSQL or the proxy could not be started.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let pg = TestPostgres::start(PgOptions {
        max_connections: opts.max_connections,
        ..Default::default()
    })
    .await
    .context("starting a throwaway PostgreSQL")?;
    let setup = connect(&pg.url()).await?;
    setup
        .batch_execute("CREATE TABLE surge_kv (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0); INSERT INTO surge_kv SELECT g FROM generate_series(1, 100) g")
        .await?;
    drop(setup);

    let mut file = pg.file_config();
    file.pool.pool_size = opts.pool_size;
    file.pool.query_wait_timeout = Duration::from_secs(60);
    file.proxy.max_client_connections = (opts.clients as u32).max(100) * 2;
    let proxy = ProxyHandle::start(Config::validate(file, "demo")?).await?;
    let proxied_url = format!(
        "postgres://{}:{}@{}/{}",
        pg.opts.user,
        pg.opts.password,
        proxy.local_addr(),
        pg.opts.database
    );

    let direct = surge(&pg, &pg.url(), &opts).await?;
    let proxied = surge(&pg, &proxied_url, &opts).await?;
    proxy.shutdown_now().await;
    Ok(DemoReport { opts, direct, proxied })
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

enum Outcome {
    Ok(Duration),
    Refused(String),
    Other(String),
}

async fn one_client(url: String, id: i32, hold: Duration, start: Arc<Barrier>) -> Outcome {
    start.wait().await;
    let t0 = Instant::now();
    let work = async {
        let c = connect(&url).await?;
        let sql = format!(
            "BEGIN; UPDATE surge_kv SET n = n + 1 WHERE id = {}; SELECT pg_sleep({}); COMMIT",
            id % 100 + 1,
            hold.as_secs_f64()
        );
        c.batch_execute(&sql).await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(120), work).await {
        Ok(Ok(())) => Outcome::Ok(t0.elapsed()),
        Ok(Err(e)) => {
            let db = e.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.as_db_error());
            match db {
                Some(d) if d.code().code() == "53300" => Outcome::Refused(d.message().to_string()),
                Some(d) => Outcome::Other(format!("{}: {}", d.code().code(), d.message())),
                None => Outcome::Other(e.to_string()),
            }
        }
        Err(_) => Outcome::Other("timed out after 120 s".into()),
    }
}

async fn surge(pg: &TestPostgres, url: &str, opts: &DemoOptions) -> anyhow::Result<SurgeResult> {
    let sampler = pg.superuser().await?;
    let peak = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampling = {
        let (peak, done, db) = (peak.clone(), done.clone(), pg.opts.database.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let q = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend' AND application_name <> 'pgvalve lock monitor'";
                if let Ok(row) = sampler.query_one(q, &[&db]).await {
                    peak.fetch_max(row.get::<_, i64>(0), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let barrier = Arc::new(Barrier::new(opts.clients));
    let tasks: Vec<_> = (0..opts.clients)
        .map(|i| tokio::spawn(one_client(url.to_string(), i as i32, opts.hold, barrier.clone())))
        .collect();
    let mut r = SurgeResult::default();
    let mut lat = Vec::new();
    for t in tasks {
        match t.await? {
            Outcome::Ok(d) => {
                r.ok += 1;
                lat.push(d);
            }
            Outcome::Refused(m) => {
                r.refused += 1;
                r.example_error.get_or_insert(format!("53300 {m}"));
            }
            Outcome::Other(m) => {
                r.other_errors += 1;
                r.example_error.get_or_insert(m);
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    sampling.await?;
    r.peak_server_connections = peak.load(Ordering::Relaxed);
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (r.p50, r.p99) = (pct(0.50), pct(0.99));
    Ok(r)
}

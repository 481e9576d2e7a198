//! Issue 23: one budget of server connections across several pgvalve instances in front of
//! the same PostgreSQL, coordinated through PostgreSQL (docs/cluster.md). Several instances
//! run in this one test process, each on a runtime of its own so one can be aborted.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvalve::config::{ClusterSettings, Config, FileConfig, PoolMode};
use pgvalve::testkit::{PgOptions, TestPostgres};
use pgvalve::ProxyHandle;
use tokio_postgres::Client;

use crate::support::{connect, eventually};

const BUDGET: u32 = 20;

/// One instance on its own runtime (dropping the runtime aborts it: tasks dropped, sockets
/// closed, nothing cleaned up).
pub(crate) struct Instance {
    proxy: Option<ProxyHandle>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Instance {
    fn start(pg: &TestPostgres, cluster: &str) -> Instance {
        Instance::start_with(pg, cluster, |_| {})
    }

    fn start_in(pg: &TestPostgres, cluster: &str, mode: PoolMode) -> Instance {
        Instance::start_with(pg, cluster, |f| f.pool.pool_mode = mode)
    }

    pub(crate) fn start_with(pg: &TestPostgres, cluster: &str, tweak: impl FnOnce(&mut FileConfig)) -> Instance {
        let mut f = pg.file_config();
        f.locks.enabled = false;
        f.admin.stats_users.push(pg.opts.user.clone());
        f.cluster = Some(ClusterSettings::new(cluster, BUDGET));
        tweak(&mut f);
        let config = Config::validate(f, "test").expect("valid config");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let proxy = std::thread::scope(|s| {
            s.spawn(|| rt.block_on(ProxyHandle::start(config)))
                .join()
                .expect("start thread")
        })
        .expect("start proxy");
        Instance {
            proxy: Some(proxy),
            rt: Some(rt),
        }
    }

    pub(crate) fn url(&self, pg: &TestPostgres) -> String {
        let o = &pg.opts;
        let addr = self.proxy.as_ref().expect("running").local_addr();
        format!("postgres://{}:{}@{addr}/{}", o.user, o.password, o.database)
    }

    /// Server connections this instance has open (its pools' and its own).
    fn in_use(&self) -> usize {
        let c = self.proxy.as_ref().and_then(|p| p.cluster()).expect("in a cluster");
        c.root().usage().used
    }

    /// One identity's SHOW LIMITS row, as admission holds it.
    pub(crate) fn limits(&self, identity: &str) -> Option<pgvalve::admission::IdentityStatus> {
        self.proxy.as_ref()?.shared().admission.identity(identity)
    }

    /// Its `[http]` listener's address (when the test gave it one).
    pub(crate) fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.proxy.as_ref()?.http_addr()
    }

    pub(crate) fn cluster(&self) -> Arc<pgvalve::cluster::Cluster> {
        self.proxy.as_ref().and_then(|p| p.cluster()).expect("in a cluster")
    }

    fn abort(&mut self) {
        self.proxy.take();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.abort();
    }
}

pub(crate) async fn start_pg() -> TestPostgres {
    TestPostgres::start(PgOptions {
        max_connections: 60,
        ..PgOptions::default()
    })
    .await
    .expect("start PostgreSQL")
}

/// Backends of the application role (every connection of every instance: pools and
/// coordination), sampled every 2 ms until stopped; the peak.
struct Sampler {
    peak: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    async fn start(pg: &TestPostgres) -> Sampler {
        let su = pg.superuser().await.expect("superuser");
        let user = pg.opts.user.clone();
        let (peak, stop) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = backends(&su, &user).await {
                    p.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        Sampler { peak, stop, task }
    }

    fn peak(&self) -> i64 {
        self.peak.load(Ordering::Relaxed)
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

async fn backends(su: &Client, user: &str) -> Result<i64, tokio_postgres::Error> {
    Ok(su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'",
            &[&user],
        )
        .await?
        .get(0))
}

/// `n` clients of `url`, each running `sql` until `stop` (in sessions of `per_session`
/// queries each, reconnecting, when given); counts queries and errors.
fn load(
    (url, n, sql, per_session): (String, usize, &'static str, Option<u64>),
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (url, stop, done, errors) = (url.clone(), stop.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let c = match connect(&url).await {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("connect: {e:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    if !session(&c, sql, per_session, (&stop, &done, &errors)).await {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// Runs `sql` on `c` until `stop` or `per_session` queries; false when the connection closed.
async fn session(
    c: &tokio_postgres::Client,
    sql: &str,
    per_session: Option<u64>,
    (stop, done, errors): (&AtomicBool, &AtomicU64, &AtomicU64),
) -> bool {
    let mut ran = 0;
    while !stop.load(Ordering::Relaxed) && per_session.is_none_or(|n| ran < n) {
        match c.simple_query(sql).await {
            Ok(_) => {
                ran += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("query: {e:?}");
                errors.fetch_add(1, Ordering::Relaxed);
                if c.is_closed() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    true
}

pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, n: usize) -> Load {
        Load::running(url, n, "SELECT pg_sleep(0.005)")
    }

    /// `n` clients of `url` running `sql` over and over.
    pub(crate) fn running(url: String, n: usize, sql: &'static str) -> Load {
        Load::sessions(url, n, sql, None)
    }

    /// `n` clients of `url` running `sql` over and over, reconnecting after every
    /// `per_session` queries when given.
    pub(crate) fn sessions(url: String, n: usize, sql: &'static str, per_session: Option<u64>) -> Load {
        let (stop, done, errors) = (Arc::default(), Arc::default(), Arc::default());
        let run = (url, n, sql, per_session);
        let tasks = load(run, Arc::clone(&stop), Arc::clone(&done), Arc::clone(&errors));
        Load {
            stop,
            done,
            errors,
            tasks,
        }
    }

    /// Queries done so far.
    pub(crate) fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Stops the clients; (queries done, errors).
    pub(crate) async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (self.done.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed))
    }
}

pub(crate) async fn all_joined(instances: &[&Instance]) {
    eventually(Duration::from_secs(10), "every instance joined", || async {
        instances.iter().all(|i| {
            let v = i.proxy.as_ref().and_then(|p| p.cluster()).map(|c| c.view());
            v.is_some_and(|v| v.connected && v.peers.len() == instances.len())
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_budget_under_a_surge_of_600_clients() {
    let pg = start_pg().await;
    // Transaction mode: a session-mode client holds its server connection for its whole
    // session, so an instance whose clients came last would wait for sessions to end (as
    // sessions hold connections in any pooler), and 600 never-ending sessions never end.
    let is: Vec<Instance> = (0..3)
        .map(|_| Instance::start_in(&pg, "surge", PoolMode::Transaction))
        .collect();
    all_joined(&is.iter().collect::<Vec<_>>()).await;
    let sampler = Sampler::start(&pg).await;
    let loads: Vec<Load> = is.iter().map(|i| Load::start(i.url(&pg), 200)).collect();
    // Every instance serves its clients (on a loaded machine 600 logins take a while), then
    // the surge goes on for a moment with all three serving.
    eventually(Duration::from_secs(30), "every instance served its clients", || async {
        loads.iter().all(|l| l.done.load(Ordering::Relaxed) > 0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut done = 0;
    for l in loads {
        let (d, e) = l.stop().await;
        assert_eq!(e, 0, "no client gets an error");
        assert!(d > 0, "every instance served its clients");
        done += d;
    }
    let peak = sampler.stop().await;
    eprintln!("600 clients on 3 instances: {done} queries, peak {peak} backends of {BUDGET}");
    assert!(
        peak <= i64::from(BUDGET),
        "PostgreSQL saw {peak} pgvalve backends, budget {BUDGET}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_follows_the_load_from_one_instance_to_another() {
    let pg = start_pg().await;
    let is: Vec<Instance> = (0..3).map(|_| Instance::start(&pg, "follow")).collect();
    all_joined(&is.iter().collect::<Vec<_>>()).await;
    let sampler = Sampler::start(&pg).await;
    for (i, other) in [(0usize, 1usize), (1, 2)] {
        let load = Load::start(is[i].url(&pg), 60);
        let t0 = Instant::now();
        eventually(
            Duration::from_secs(5),
            "the loaded instance gets at least 17 of 20",
            || async { is[i].in_use() >= 17 },
        )
        .await;
        eprintln!("instance {i}: 17 server connections after {:?}", t0.elapsed());
        assert!(
            is[other].in_use() <= 2,
            "the idle instance holds nothing beyond its own"
        );
        let (_, errors) = load.stop().await;
        assert_eq!(errors, 0);
        assert!(sampler.peak() <= i64::from(BUDGET));
    }
    let peak = sampler.stop().await;
    assert!(peak <= i64::from(BUDGET), "peak {peak} backends, budget {BUDGET}");
}

/// Terminates `i`'s coordination connection (as an operator or a failover would); its pid.
pub(crate) async fn kill_coordination(pg: &TestPostgres, i: &Instance) -> i32 {
    let su = pg.superuser().await.expect("superuser");
    let pid = view_of(i).peers.iter().find(|p| p.me).expect("itself").pid;
    su.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    pid
}

fn view_of(i: &Instance) -> pgvalve::cluster::View {
    i.proxy.as_ref().and_then(|p| p.cluster()).expect("in a cluster").view()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_instance_and_a_killed_coordination_connection_keep_the_budget() {
    let pg = start_pg().await;
    let mut is: Vec<Instance> = (0..3).map(|_| Instance::start(&pg, "crash")).collect();
    all_joined(&is.iter().collect::<Vec<_>>()).await;
    let sampler = Sampler::start(&pg).await;
    // Session mode: a session keeps its seat until it ends and these never end, so the load
    // that comes first keeps what it took. The doomed instance's 8 sessions come first, then
    // the survivor's 40 take what is left (the budget less 8 sessions and three coordination
    // seats), so both hold seats when one dies whatever the rounds' timing.
    let doomed = Load::start(is[0].url(&pg), 8);
    eventually(Duration::from_secs(10), "the doomed instance holds slots", || async {
        is[0].in_use() >= 5
    })
    .await;
    let survivor = Load::start(is[1].url(&pg), 40);
    eventually(Duration::from_secs(10), "both loaded instances hold slots", || async {
        is[0].in_use() >= 5 && is[1].in_use() >= 5
    })
    .await;
    // Instance 0 dies mid-load: its runtime is dropped, nothing is cleaned up.
    is[0].abort();
    let _ = doomed.stop().await;
    eventually(Duration::from_secs(10), "the survivor gets the freed slots", || async {
        is[1].in_use() >= 17
    })
    .await;
    // Its coordination connection is killed under load: the connections it has keep their
    // seats (their own markers), it rejoins, nobody exceeds the budget meanwhile.
    let pid = kill_coordination(&pg, &is[1]).await;
    eventually(
        Duration::from_secs(10),
        "it rejoins with a new coordination connection",
        || async {
            let v = view_of(&is[1]);
            v.connected && v.peers.iter().any(|p| p.me && p.pid != pid)
        },
    )
    .await;
    // The new coordination connection leases again the seats its connections sit on, so it
    // is back to the whole budget less the others' coordination seats.
    eventually(Duration::from_secs(5), "it holds 17 again", || async {
        is[1].in_use() >= 17
    })
    .await;
    let (done, errors) = survivor.stop().await;
    assert_eq!(errors, 0, "the survivor's clients saw no error");
    assert!(done > 0);
    let peak = sampler.stop().await;
    assert!(
        peak <= i64::from(BUDGET),
        "PostgreSQL saw {peak} pgvalve backends, budget {BUDGET}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_rejoins_and_serves_after_postgres_restarts() {
    let pg = start_pg().await;
    let is: Vec<Instance> = (0..3).map(|_| Instance::start(&pg, "restart")).collect();
    all_joined(&is.iter().collect::<Vec<_>>()).await;
    // Session mode, where a session keeps its seat until it ends and these never end: 5 clients
    // per instance leave seats for the probes below (the budget less three coordination seats
    // is 17). With more clients than seats, those still waiting when PostgreSQL goes down take
    // every seat when it comes back and a probe waits behind them for good, as it would in any
    // pooler.
    let loads: Vec<Load> = is.iter().map(|i| Load::start(i.url(&pg), 5)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.restart().await.expect("restart PostgreSQL");
    let up = Instant::now();
    for (n, i) in is.iter().enumerate() {
        let url = i.url(&pg);
        eventually(Duration::from_secs(10), "the instance serves again", || async {
            match connect(&url).await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
        eprintln!(
            "instance {n} serves {:?} after PostgreSQL accepted connections",
            up.elapsed()
        );
    }
    all_joined(&is.iter().collect::<Vec<_>>()).await;
    let sampler = Sampler::start(&pg).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for l in loads {
        let _ = l.stop().await;
    }
    let peak = sampler.stop().await;
    assert!(
        peak <= i64::from(BUDGET),
        "PostgreSQL saw {peak} pgvalve backends, budget {BUDGET}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_cluster_lists_every_instance_and_marks_this_one() {
    let pg = start_pg().await;
    let is: Vec<Instance> = (0..2).map(|_| Instance::start(&pg, "seen")).collect();
    all_joined(&is.iter().collect::<Vec<_>>()).await;
    let o = &pg.opts;
    let addr = is[0].proxy.as_ref().expect("running").local_addr();
    let console = connect(&format!("postgres://{}:{}@{addr}/pgvalve", o.user, o.password)).await;
    let console = match console {
        Ok(c) => c,
        Err(e) => panic!("console: {e}"),
    };
    let rows: Vec<Vec<String>> = console
        .simple_query("SHOW CLUSTER")
        .await
        .expect("SHOW CLUSTER")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).unwrap_or("").to_string()).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter().all(|r| r[0] == "seen" && r[3] != "0"),
        "each holds its own slot: {rows:?}"
    );
    assert_eq!(rows.iter().filter(|r| r[7] == "yes").count(), 1, "{rows:?}");
    let mut published: Vec<String> = rows.iter().map(|r| r[10].clone()).collect();
    let mut listeners: Vec<String> = is
        .iter()
        .map(|i| i.proxy.as_ref().expect("running").local_addr().to_string())
        .collect();
    published.sort();
    listeners.sort();
    assert_eq!(
        published, listeners,
        "each publishes its listener for forwarded cancels"
    );
}

/// The lock monitor's own connection sits on a seat of the cluster like any other (its
/// marker taken with typed parameters), and watches: SHOW LOCKS names a client's lock. (Every
/// other test here turns the monitor off.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_monitor_sits_on_a_seat_and_watches_in_cluster_mode() {
    let pg = start_pg().await;
    let i = Instance::start_with(&pg, "watched", |f| {
        f.locks.enabled = true;
        f.locks.poll_interval = Duration::from_millis(100);
    });
    all_joined(&[&i]).await;
    let holder = connect(&format!("{}?application_name=migrator", i.url(&pg)))
        .await
        .expect("connect");
    holder
        .batch_execute("CREATE TABLE orders (id int)")
        .await
        .expect("create");
    holder
        .batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let o = &pg.opts;
    let addr = i.proxy.as_ref().expect("running").local_addr();
    let console = connect(&format!("postgres://{}:{}@{addr}/pgvalve", o.user, o.password))
        .await
        .expect("console");
    eventually(Duration::from_secs(10), "SHOW LOCKS names migrator's lock", || async {
        console
            .simple_query("SHOW LOCKS")
            .await
            .expect("SHOW LOCKS")
            .iter()
            .any(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    r.get("relation") == Some("orders") && r.get("identity") == Some("migrator")
                }
                _ => false,
            })
    })
    .await;
    holder.batch_execute("ROLLBACK").await.expect("rollback");
}

/// A CancelRequest (protocol 3.0) sent by hand to `addr`; returns once pgvalve has handled it
/// (closed the connection), forwarding included.
async fn raw_cancel(addr: std::net::SocketAddr, pid: i32, secret: [u8; 4]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut b = Vec::new();
    for n in [16, 80877102, pid] {
        b.extend_from_slice(&i32::to_be_bytes(n));
    }
    b.extend_from_slice(&secret);
    s.write_all(&b).await.expect("send");
    let _ = s.read_to_end(&mut Vec::new()).await;
}

/// Issue 23, "cancel anywhere": a client's CancelRequest sent to instance B cancels its query
/// running through instance A, in session mode (the key's pid is the real backend's, found on
/// its seat) and in transaction mode (a made-up pid carrying A's tag); a forged key sent to B
/// is forwarded to A at most and cancels nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_instance_cancels_the_query() {
    let pg = start_pg().await;
    let su = pg.superuser().await.expect("superuser");
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let name = format!("cancel-{mode:?}");
        let [a, b] = [0, 1].map(|_| Instance::start_with(&pg, &name, |f| f.pool.pool_mode = mode));
        all_joined(&[&a, &b]).await;
        let client = connect(&a.url(&pg)).await.expect("client of A");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        // The key B must route: the backend's pid (session) or one with A's tag (transaction).
        let (tag, key_pid) = match mode {
            PoolMode::Session => (None, pid),
            _ => (Some(a.cluster().tag()), (i32::from(a.cluster().tag()) << 16) | 1),
        };
        eventually(Duration::from_secs(10), "B knows where A's keys go", || async {
            b.cluster().cancel_route(tag, key_pid) == vec![a.proxy.as_ref().expect("A").local_addr()]
        })
        .await;
        let token = client.cancel_token();
        let running = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
        let sleeping = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'";
        eventually(Duration::from_secs(10), "the query runs", || async {
            su.query_one(sleeping, &[]).await.expect("count").get::<_, i64>(0) == 1
        })
        .await;
        let b_addr = b.proxy.as_ref().expect("B").local_addr();
        raw_cancel(b_addr, key_pid, [0x5a; 4]).await;
        let still: i64 = su.query_one(sleeping, &[]).await.expect("count").get(0);
        assert_eq!(still, 1, "{mode:?}: a forged key cancels nothing");
        let stream = tokio::net::TcpStream::connect(b_addr).await.expect("connect B");
        token
            .cancel_query_raw(stream, tokio_postgres::NoTls)
            .await
            .expect("cancel through B");
        let r = crate::support::within(Duration::from_secs(10), running)
            .await
            .expect("task");
        let e = r.expect_err("the query is canceled");
        assert_eq!(crate::support::code(&e).as_deref(), Some("57014"), "{mode:?}: {e:?}");
    }
}

//! pgvalve's own connections inside the caps, seen from PostgreSQL: under saturating load, with
//! the lock monitor on and auth_query look-ups running, a direct superuser connection samples
//! pg_stat_activity and never sees more of pgvalve's backends than `pool_size` for a pool's
//! (database, user), nor more than `max_server_connections` in all; the lock monitor keeps
//! recording while the pool is saturated, also when it has to reconnect then.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgvalve::config::{FileConfig, PoolMode, Secret, UserConfig};

use crate::support::*;

/// Peaks of pgvalve's backends seen by PostgreSQL (every client backend but the sampling
/// superuser's own sessions: the tests' clients all go through pgvalve).
struct Census {
    /// Most backends of database "app" as `user` at once.
    pool: Arc<AtomicI64>,
    /// Most backends of pgvalve in all at once.
    total: Arc<AtomicI64>,
    /// Most lock monitor backends at once.
    monitor: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Peaks {
    pool: i64,
    total: i64,
    monitor: i64,
}

impl Census {
    async fn start(s: &Setup, user: &str) -> Census {
        let su = s.pg.superuser().await.expect("superuser connection");
        let (pool, total, monitor) = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (pool, total, monitor, stop): (Arc<AtomicI64>, Arc<AtomicI64>, Arc<AtomicI64>, _) = (
                Arc::clone(&pool),
                Arc::clone(&total),
                Arc::clone(&monitor),
                stop.clone(),
            );
            let user = user.to_string();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let row = su
                        .query_one(
                            "SELECT count(*) FILTER (WHERE datname = 'app' AND usename = $1),
                                    count(*),
                                    count(*) FILTER (WHERE application_name = 'pgvalve lock monitor')
                             FROM pg_stat_activity
                             WHERE backend_type = 'client backend' AND usename <> current_user",
                            &[&user],
                        )
                        .await
                        .expect("census");
                    pool.fetch_max(row.get(0), Ordering::Relaxed);
                    total.fetch_max(row.get(1), Ordering::Relaxed);
                    monitor.fetch_max(row.get(2), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Census {
            pool,
            total,
            monitor,
            stop,
            task,
        }
    }

    async fn stop(self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("census task");
        Peaks {
            pool: self.pool.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            monitor: self.monitor.load(Ordering::Relaxed),
        }
    }
}

/// `clients` clients doing `rounds` short transactions each: in session mode each round is a
/// session of its own (connect, query, leave), in transaction mode one session runs them all.
async fn saturate(url: &str, mode: PoolMode, clients: usize, rounds: usize) {
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut c = None;
                for r in 0..rounds {
                    if c.is_none() || mode == PoolMode::Session {
                        // A session ends before the client's next one starts.
                        drop(c.take());
                        c = Some(connect(&url).await.unwrap_or_else(|e| panic!("client {i}: {e:?}")));
                    }
                    let v: i32 = c
                        .as_ref()
                        .expect("connected")
                        .query_one("SELECT $1::int FROM pg_sleep(0.02)", &[&(r as i32)])
                        .await
                        .unwrap_or_else(|e| panic!("client {i} round {r}: {e:?}"))
                        .get(0);
                    assert_eq!(v, r as i32);
                }
            })
        })
        .collect();
    for t in tasks {
        within(Duration::from_secs(120), t).await.unwrap();
    }
}

fn with_monitor(mode: PoolMode, pool_size: u32, max_server_connections: u32) -> impl FnOnce(&mut FileConfig) {
    move |f| {
        f.pool.pool_mode = mode;
        f.pool.pool_size = pool_size;
        f.pool.max_server_connections = max_server_connections.into();
        f.locks.enabled = true;
        f.locks.poll_interval = Duration::from_millis(100);
        f.admin.admin_users = vec!["app".into()];
    }
}

async fn caps_hold_with_the_monitor(mode: PoolMode, pool_size: u32, max_server_connections: u32) {
    let s = Setup::new(with_monitor(mode, pool_size, max_server_connections)).await;
    let census = Census::start(&s, "app").await;
    saturate(&s.url(), mode, 24, 6).await;
    let peaks = census.stop().await;
    let cap = i64::from(pool_size.min(max_server_connections));
    assert_eq!(peaks.monitor, 1, "the lock monitor was connected: {peaks:?}");
    assert!(
        peaks.pool <= i64::from(pool_size) && peaks.total <= i64::from(max_server_connections),
        "PostgreSQL saw {peaks:?} from pgvalve with pool_size={pool_size}, max_server_connections={max_server_connections}"
    );
    assert_eq!(
        peaks.total, cap,
        "the load filled the cap (the monitor's slot and the clients'): {peaks:?}"
    );
    let pools = console(&s, "SHOW POOLS").await;
    let app = pools
        .iter()
        .find(|r| r["database"] == "app" && r["user"] == "app")
        .expect("pool app/app");
    assert_eq!(
        (app["pool_size"].as_str(), app["sv_own"].as_str()),
        (pool_size.to_string().as_str(), "1"),
        "SHOW POOLS: the pool's size and the monitor's slot in it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_pool_size_counts_the_lock_monitor() {
    caps_hold_with_the_monitor(PoolMode::Session, 3, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_pool_size_counts_the_lock_monitor() {
    caps_hold_with_the_monitor(PoolMode::Transaction, 3, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_server_connections_counts_the_lock_monitor() {
    caps_hold_with_the_monitor(PoolMode::Transaction, 5, 3).await;
}

/// Waits until SHOW LOCKS names the AccessExclusiveLock on "t" held by client "greedy".
async fn lock_recorded(s: &Setup) {
    eventually(Duration::from_secs(15), "SHOW LOCKS names greedy's lock", || async {
        console(s, "SHOW LOCKS").await.iter().any(|r| {
            r["identity"] == "greedy"
                && r["relation"] == "t"
                && r["mode"] == "AccessExclusiveLock"
                && r["source"] == "pgvalve"
        })
    })
    .await;
}

/// Waits until the lock monitor's backend is there.
async fn monitor_connected(su: &tokio_postgres::Client) {
    eventually(Duration::from_secs(15), "the lock monitor is connected", || async {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvalve lock monitor'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
}

/// Session mode, pool_size 3: the monitor took its slot at start; the clients fill the
/// other two (one of them holding a lock) with more queued behind, and the monitor still sees
/// the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_records_locks_in_a_saturated_session_pool() {
    let s = Setup::new(with_monitor(PoolMode::Session, 3, 100)).await;
    s.client().await.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    monitor_connected(&s.pg.superuser().await.unwrap()).await;
    let census = Census::start(&s, "app").await;
    let greedy = connect(&format!("{}?application_name=greedy", s.url())).await.unwrap();
    greedy
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let other = s.client().await;
    other.simple_query("SELECT 1").await.unwrap();
    // Saturated: these wait for a server connection all along.
    let url = s.url();
    let queued: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { connect(&url).await.map(drop) })
        })
        .collect();
    lock_recorded(&s).await;
    assert!(queued.iter().all(|q| !q.is_finished()), "the pool was saturated");
    greedy.batch_execute("COMMIT").await.unwrap();
    drop((greedy, other));
    for q in queued {
        within(Duration::from_secs(30), q)
            .await
            .unwrap()
            .expect("served once freed");
    }
    let peaks = census.stop().await;
    assert!(peaks.pool <= 3 && peaks.monitor == 1, "{peaks:?}");
}

/// Transaction mode, pool_size 3, saturated by a lock holder and a crowd of short
/// transactions: the monitor's connection is terminated; it claims a slot again (the next
/// connection coming back to the pool is closed for it), reconnects and records the lock,
/// and PostgreSQL never sees more than 3 backends of the pool meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_reconnects_into_a_saturated_pool_and_records_locks() {
    let s = Setup::new(with_monitor(PoolMode::Transaction, 3, 100)).await;
    s.client().await.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let su = s.pg.superuser().await.unwrap();
    monitor_connected(&su).await;
    let census = Census::start(&s, "app").await;
    let greedy = connect(&format!("{}?application_name=greedy", s.url())).await.unwrap();
    greedy
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let crowd: Vec<_> = (0..12)
        .map(|_| {
            let (url, stop) = (s.url(), stop.clone());
            tokio::spawn(async move {
                let c = connect(&url).await.expect("crowd client");
                while !stop.load(Ordering::Relaxed) {
                    c.simple_query("SELECT pg_sleep(0.01)").await.expect("crowd query");
                }
            })
        })
        .collect();
    lock_recorded(&s).await;
    let killed: i64 = su
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pgvalve lock monitor'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    no_backends_left(
        &su,
        Duration::from_secs(5),
        "the monitor's backend ends",
        "application_name = 'pgvalve lock monitor'",
    )
    .await;
    // The lock is still held: the monitor records it again only once it has reconnected.
    monitor_connected(&su).await;
    lock_recorded(&s).await;
    stop.store(true, Ordering::Relaxed);
    for c in crowd {
        within(Duration::from_secs(30), c).await.unwrap();
    }
    greedy.batch_execute("COMMIT").await.unwrap();
    let peaks = census.stop().await;
    assert!(
        peaks.pool <= 3,
        "PostgreSQL saw {peaks:?} backends of the pool, pool_size is 3"
    );
    assert_eq!(peaks.pool, 3, "the crowd filled the pool: {peaks:?}");
}

/// auth_query look-ups run as `auth_user`, whose own pool the load saturates: each look-up
/// takes a slot of that pool's budget (going before the pool), so PostgreSQL never sees more
/// than pool_size backends as `auth_user`, and every looked-up login succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_look_ups_take_their_slot_from_a_saturated_pool() {
    let s = Setup::new(|f| {
        with_monitor(PoolMode::Transaction, 3, 100)(f);
        f.proxy.auth_user = Some("pgvalve_auth".into());
        f.proxy.auth_cache_ttl = Duration::ZERO;
        f.users.insert(
            "pgvalve_auth".into(),
            UserConfig {
                password: Some(Secret("auth-pw".into())),
                ..Default::default()
            },
        );
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute(
        "CREATE ROLE pgvalve_auth LOGIN SUPERUSER PASSWORD 'auth-pw';
         CREATE ROLE carol LOGIN PASSWORD 'carol-pw';",
    )
    .await
    .unwrap();
    let census = Census::start(&s, "pgvalve_auth").await;
    let lookups = || s.proxy.shared().auth.lookups.load(Ordering::Relaxed);
    let before = lookups();
    let auth_url = s.url_as("pgvalve_auth", "auth-pw", "app");
    let load = tokio::spawn(async move { saturate(&auth_url, PoolMode::Transaction, 12, 25).await });
    let carol = s.url_as("carol", "carol-pw", "app");
    for _ in 0..8 {
        let c = connect(&carol).await.expect("a looked-up user logs in");
        let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(who, "carol");
    }
    within(Duration::from_secs(120), load).await.unwrap();
    let peaks = census.stop().await;
    assert!(lookups() - before >= 8, "every login looked carol up");
    assert!(
        peaks.pool <= 3,
        "PostgreSQL saw {peaks:?} backends as pgvalve_auth (its pool and the look-ups), pool_size is 3"
    );
    assert_eq!(peaks.pool, 3, "the load filled the auth_user's pool: {peaks:?}");
}

//! A running proxy: its shared state and the handle to stop it.
//!
//! Owns the pieces of the flow — listener, admission, pools, cancel registry — and passes
//! them to tasks as one `Arc<Shared>`; nothing is global, so a test can run several proxies
//! in one process. [`ProxyHandle::shutdown`] drives the drain described in [`crate::shutdown`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::admission::Admission;
use crate::cancel::CancelRegistry;
use crate::config::{Config, ScramVerifier};
use crate::pool::PoolSet;
use crate::session_threads::SessionThreads;
use crate::shutdown::{Phase, PhaseSender};

/// State every session of one proxy shares.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force (replaced whole by a reload; see [`Shared::config`]).
    pub live_config: Arc<ArcSwap<Config>>,
    /// Server connection pools.
    pub pools: PoolSet,
    /// Cancel keys.
    pub cancels: Arc<CancelRegistry>,
    /// Client admission.
    pub admission: Admission,
    /// Shutdown phase (the proxy's own tasks watch a `watch` receiver of it).
    pub phase_bell: Arc<crate::shutdown::PhaseBell>,
    /// Verifier used for unknown users, so they cost the same SCRAM exchange as known ones.
    pub decoy_verifier: ScramVerifier,
    /// Users looked up with auth_query: verifiers, learned keys, failed logins.
    pub auth: Arc<crate::client::auth_query::AuthQuery>,
    /// Sessions pinned to a server connection in transaction mode, so far.
    pub pins: Arc<crate::sessions::Pins>,
    /// Proxy-wide ids of prepared statement definitions (transaction mode).
    pub statements: Arc<crate::client::StatementRegistry>,
    /// Event metrics (histograms).
    pub events: crate::observe::Events,
    /// Client sessions and the backends they use.
    pub sessions: Arc<crate::sessions::Sessions>,
    /// What the lock monitor saw.
    pub locks: Arc<crate::locks::LockMonitor>,
    /// Databases paused from the console.
    pub pauses: crate::pool::Pauses,
    /// Reloads and what to reload from.
    pub reloads: crate::reload::Reloads,
    /// The console asked for SHUTDOWN.
    pub shutdown_requested: tokio::sync::Notify,
}

impl Shared {
    /// The configuration in force now (cheap: no shared reference count is touched). Take
    /// it once per use and do not hold it across long waits: a reload may replace it.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.live_config.load()
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    phase_tx: Arc<PhaseSender>,
    tracker: TaskTracker,
    tasks: Vec<JoinHandle<()>>,
    threads: Option<Arc<SessionThreads>>,
}

impl ProxyHandle {
    /// Binds `config.listen` (and `[http] listen`) and starts serving.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(config: Config) -> io::Result<ProxyHandle> {
        let listener = TcpListener::bind(config.listen).await?;
        let http = match config.http_listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        Ok(Self::serve_with_http(listener, http, config))
    }

    /// Starts serving on an already bound listener (no HTTP endpoint).
    pub fn serve(listener: TcpListener, config: Config) -> ProxyHandle {
        Self::serve_with_http(listener, None, config)
    }

    /// Starts serving on already bound listeners.
    pub fn serve_with_http(listener: TcpListener, http: Option<TcpListener>, config: Config) -> ProxyHandle {
        let addr = listener.local_addr().unwrap_or(config.listen);
        let config = Arc::new(ArcSwap::from_pointee(config));
        let admission_config = crate::admission::AdmissionConfig::from_config(&config.load());
        let (phase_tx, phase, phase_bell) = PhaseSender::new();
        let decoy = hex_nonce();
        let events = crate::observe::Events::default();
        let auth = Arc::new(crate::client::auth_query::AuthQuery::default());
        let shared = Arc::new(Shared {
            pools: PoolSet::new(config.clone(), auth.clone()),
            auth,
            cancels: Arc::new(CancelRegistry::new()),
            admission: Admission::new(admission_config, events.clone()),
            events,
            sessions: Arc::default(),
            locks: Arc::default(),
            pauses: Default::default(),
            reloads: Default::default(),
            shutdown_requested: Default::default(),
            phase_bell,
            decoy_verifier: ScramVerifier::from_password(&decoy),
            pins: Arc::default(),
            statements: Arc::default(),
            live_config: config,
        });
        let tracker = TaskTracker::new();
        let threads = session_threads(&shared.config());
        let accept = tokio::spawn(crate::listener::run(
            listener,
            shared.clone(),
            tracker.clone(),
            phase.clone(),
            threads.clone(),
        ));
        let reaper = tokio::spawn(reap_loop(shared.clone(), phase.clone()));
        let ticker = tokio::spawn(admission_loop(shared.clone(), phase.clone()));
        let clock = tokio::spawn(queue_clock(shared.clone(), phase.clone()));
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let monitor = tokio::spawn(crate::locks::run(shared.clone(), phase.clone()));
        let mut tasks = vec![accept, reaper, ticker, clock, monitor];
        if let Some(l) = http {
            tasks.push(tokio::spawn(crate::http::serve(l, shared.clone(), phase)));
            tracing::info!(addr = ?http_addr, "metrics and health on http://{}/metrics", http_addr.map(|a| a.to_string()).unwrap_or_default());
        }
        tracing::info!(%addr, "pgvalve listening");
        ProxyHandle {
            addr,
            http_addr,
            shared,
            phase_tx: Arc::new(phase_tx),
            tracker,
            tasks,
            threads,
        }
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP endpoint's address, when configured.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The session threads, when there are any (see [`crate::session_threads`]).
    pub fn session_threads(&self) -> Option<&SessionThreads> {
        self.threads.as_deref()
    }

    /// Shared state (pools, admission) for inspection.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies a new, already validated configuration (see [`crate::reload`]): pool sizes,
    /// limits, identity rules, timeouts and users take effect without dropping clients.
    pub fn reload(&self, config: Config) -> crate::reload::Reloaded {
        crate::reload::apply(&self.shared, config)
    }

    /// Reads the configuration again from the source set by [`ProxyHandle::set_reload_source`]
    /// and applies it; what SIGHUP and the console's `RELOAD` do.
    ///
    /// # Errors
    /// Why it was refused (the configuration in force stays).
    pub fn reload_from_source(&self) -> Result<crate::reload::Reloaded, String> {
        crate::reload::reload(&self.shared)
    }

    /// Sets what reloads read: the config file (None: quick start) and the overrides.
    pub fn set_reload_source(&self, path: Option<std::path::PathBuf>, overrides: crate::config::Overrides) {
        self.shared.reloads.set_source(path, overrides);
    }

    /// Resolves when the console asked for SHUTDOWN.
    pub async fn shutdown_requested(&self) {
        self.shared.shutdown_requested.notified().await;
    }

    /// Watches the shutdown phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    /// Graceful stop: stop accepting, let transactions finish up to `shutdown_timeout`, then
    /// close everything.
    pub async fn shutdown(self) {
        let grace = self.shared.config().proxy.shutdown_timeout;
        self.stop(grace).await;
    }

    /// Fast stop: close everything now.
    pub async fn shutdown_now(self) {
        self.stop(Duration::ZERO).await;
    }

    /// A handle that can force a fast stop while a graceful one is under way.
    pub fn stop_signal(&self) -> StopSignal {
        StopSignal(self.phase_tx.clone())
    }

    /// Starts the drain without waiting (a later [`ProxyHandle::shutdown`] completes it).
    pub fn begin_drain(&self) {
        self.phase_tx.begin_drain();
    }

    async fn stop(self, grace: Duration) {
        self.begin_drain();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(
                remaining = self.tracker.len(),
                "shutdown_timeout reached; closing remaining sessions"
            );
        }
        self.phase_tx.stop();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.shared.pools.close();
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(t) = &self.threads {
            t.stop().await;
        }
        tracing::info!("pgvalve stopped");
    }
}

/// Forces the Stopped phase (see [`ProxyHandle::stop_signal`]).
#[derive(Debug, Clone)]
pub struct StopSignal(Arc<PhaseSender>);

impl StopSignal {
    /// Close all sessions now.
    pub fn stop_now(&self) {
        self.0.stop();
    }
}

async fn reap_loop(shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let every = shared.pools.reap_interval();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {
                let n = shared.pools.reap();
                if n > 0 {
                    tracing::debug!(closed = n, "closed idle or old server connections");
                }
            }
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
    }
}

/// SHOW STATS averages over this many seconds (PgBouncer's default `stats_period`).
pub const STATS_PERIOD_SECS: u64 = 60;

/// Once a second: surge detection and cleanup in admission; the stats period.
async fn admission_loop(shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    let mut last = tokio::time::Instant::now();
    shared.pools.stats.roll(std::time::Instant::now());
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            now = every.tick() => {
                shared.admission.tick(now.saturating_duration_since(last));
                last = now;
                ticks += 1;
                if ticks.is_multiple_of(STATS_PERIOD_SECS) {
                    shared.pools.stats.roll(std::time::Instant::now());
                }
            }
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
    }
}

/// Admission's queue clock (queued NOTICEs and queue timeouts) until the proxy has stopped.
async fn queue_clock(shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    tokio::select! {
        () = shared.admission.queue_clock() => {}
        _ = phase.wait_for(|p| *p == Phase::Stopped) => {}
    }
}

/// The session threads the configuration asks for (none if they cannot be started: sessions
/// then run on the shared runtime).
fn session_threads(config: &Config) -> Option<Arc<SessionThreads>> {
    let n = crate::session_threads::wanted(config.proxy.session_threads, config.proxy.worker_threads);
    if n == 0 {
        return None;
    }
    match SessionThreads::start(n) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start session threads; sessions run on the shared runtime");
            None
        }
    }
}

fn hex_nonce() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

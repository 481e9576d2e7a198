//! A running proxy: the one composition root, and the handle to stop it.
//!
//! Builds every service — admission, pools, cancel registry, session registry, lock
//! monitor, reloads, metrics — and hands each task the narrow handles it uses: sessions get
//! [`Services`], the lock monitor a [`crate::locks::Watch`], the HTTP endpoint its
//! [`crate::http::Sources`], the console an [`AdminConsole`]. Nothing is global, so a test can
//! run several proxies in one process. [`ProxyHandle::shutdown`] drives the drain described in
//! [`crate::shutdown`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use tokio::sync::Notify;

use crate::admin::AdminConsole;
use crate::admission::{Admission, AdmissionConfig};
use crate::cancel::CancelRegistry;
use crate::client::{Services, StatementRegistry};
use crate::config::{Config, ScramVerifier};
use crate::dbgate::DbGates;
use crate::locks::LockMonitor;
use crate::observe::Events;
use crate::pool::PoolSet;
use crate::reload::{Reloaded, Reloader};
use crate::server::auth_query::AuthQuery;
use crate::session_threads::SessionThreads;
use crate::shutdown::{Phase, PhaseSender};

/// The services one proxy builds, before its tasks start.
struct Built {
    services: Arc<Services>,
    events: Events,
    locks: Arc<LockMonitor>,
    reloader: Arc<Reloader>,
    shutdown_requested: Arc<Notify>,
}

impl Built {
    fn new(
        config: Config,
        phase_bell: Arc<crate::shutdown::PhaseBell>,
        lent: Option<Arc<crate::server::budget::Budget>>,
    ) -> Built {
        let live_config = Arc::new(ArcSwap::from_pointee(config));
        let admission_config = AdmissionConfig::from_config(&live_config.load());
        let events = Events::default();
        let gates = Arc::new(DbGates::default());
        let auth = Arc::new(AuthQuery::new(gates.clone()));
        let cores = {
            let c = live_config.load();
            crate::session_threads::wanted(c.proxy.session_threads, c.proxy.worker_threads)
        };
        let pools = PoolSet::new(live_config.clone(), auth.clone(), gates.clone(), cores, lent);
        let admission = Admission::with_cores(admission_config, events.clone(), pools.cores());
        let locks = Arc::new(LockMonitor::default());
        let reloader = Arc::new(Reloader::new(live_config.clone(), pools.clone(), admission.clone()));
        let shutdown_requested = Arc::new(Notify::new());
        let console = AdminConsole::new(locks.clone(), reloader.clone(), shutdown_requested.clone());
        let cancels = Arc::new(CancelRegistry::in_cluster(pools.cluster().cloned()));
        let services = Arc::new(Services {
            pools,
            auth,
            cancels,
            admission,
            sessions: Arc::default(),
            pauses: Default::default(),
            gates,
            phase_bell,
            decoy_verifier: ScramVerifier::from_password(&hex_nonce()),
            pins: Arc::default(),
            statements: Arc::new(StatementRegistry::default()),
            console: Arc::new(console),
            notify: Arc::default(),
            handoff: Arc::default(),
            read_buffers: crate::client::ReadBuffers::new(cores),
            live_config,
        });
        Built {
            services,
            events,
            locks,
            reloader,
            shutdown_requested,
        }
    }

    fn lock_watch(&self) -> crate::locks::Watch {
        let s = &self.services;
        crate::locks::Watch {
            live_config: s.live_config.clone(),
            pools: s.pools.clone(),
            sessions: s.sessions.clone(),
            admission: s.admission.clone(),
            locks: self.locks.clone(),
            gates: s.gates.clone(),
        }
    }

    fn http_sources(&self) -> crate::http::Sources {
        crate::http::Sources {
            services: self.services.clone(),
            events: self.events.clone(),
            locks: self.locks.clone(),
            reloader: self.reloader.clone(),
            history: Default::default(),
        }
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    shared: Arc<Services>,
    reloader: Arc<Reloader>,
    shutdown_requested: Arc<Notify>,
    phase_tx: Arc<PhaseSender>,
    tracker: TaskTracker,
    tasks: Vec<JoinHandle<()>>,
    threads: Option<Arc<SessionThreads>>,
    /// True once this proxy handed over to a successor and has no session left.
    handed: watch::Receiver<bool>,
}

impl ProxyHandle {
    /// Sizes `max_server_connections` when it is `"auto"` or a percentage (see
    /// [`crate::server::sizing`]), binds `config.listen` (and `[http] listen`) and starts
    /// serving.
    ///
    /// # Errors
    /// PostgreSQL's limits could not be read (kind `Other`, saying why), or the bind error.
    pub async fn start(mut config: Config) -> io::Result<ProxyHandle> {
        crate::server::sizing::size_at_start(&mut config)
            .await
            .map_err(io::Error::other)?;
        let listener = TcpListener::bind(config.listen).await?;
        let http = match config.http_listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        Ok(Self::serve_with_http(listener, http, config))
    }

    /// Takes over from the pgvalve running with the same `[proxy] takeover_socket` (see
    /// [`crate::takeover`]): its listening sockets, then its clients as they become idle.
    ///
    /// # Errors
    /// No process to take over from, or it refused (the reason is in its log).
    pub async fn start_takeover(config: Config) -> io::Result<ProxyHandle> {
        let path = config
            .proxy
            .takeover_path(config.listen.port())
            .ok_or_else(|| io::Error::other("takeover_socket is off"))?;
        let s = crate::takeover::successor::connect(&path).await?;
        let settled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut handle = Self::serve_all(s.listener, s.http, config, s.lent.clone(), settled.clone());
        let intake = crate::takeover::successor::Intake {
            shared: handle.shared.clone(),
            tracker: handle.tracker.clone(),
            threads: handle.threads.clone(),
            settled,
        };
        let receive = crate::takeover::successor::receive(s.wire, s.lent, intake);
        handle.tasks.push(tokio::spawn(receive));
        Ok(handle)
    }

    /// Resolves once this proxy has handed its clients over to a successor (see
    /// [`crate::takeover`]) and has none left, or `shutdown_timeout` after the handover; what
    /// remains is for [`ProxyHandle::shutdown`] to drain.
    pub async fn handed_over(&self) {
        let mut handed = self.handed.clone();
        let _ = handed.wait_for(|h| *h).await;
    }

    /// Whether this proxy has handed its listening sockets to a takeover's successor (it
    /// accepts no client since).
    pub fn is_handing_over(&self) -> bool {
        self.shared.handoff.is_begun()
    }

    /// Starts serving on already bound listeners.
    pub(crate) fn serve_with_http(listener: TcpListener, http: Option<TcpListener>, config: Config) -> ProxyHandle {
        let settled = Arc::new(std::sync::atomic::AtomicBool::new(true));
        Self::serve_all(listener, http, config, None, settled)
    }

    fn serve_all(
        listener: TcpListener,
        http: Option<TcpListener>,
        config: Config,
        lent: Option<Arc<crate::server::budget::Budget>>,
        settled: Arc<std::sync::atomic::AtomicBool>,
    ) -> ProxyHandle {
        let addr = listener.local_addr().unwrap_or(config.listen);
        open_files_for(&config);
        let (phase_tx, phase, phase_bell) = PhaseSender::new();
        let built = Built::new(config, phase_bell, lent);
        let copies = crate::takeover::predecessor::copies(&listener, http.as_ref());
        let shared = built.services.clone();
        if let Some(c) = shared.pools.cluster() {
            c.set_listen(addr);
        }
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
        let leases = tokio::spawn(lease_loop(shared.clone(), phase.clone()));
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let monitor = tokio::spawn(crate::locks::run(built.lock_watch(), phase.clone()));
        let mut tasks = vec![accept, reaper, ticker, clock, leases, monitor];
        let (handed_tx, handed) = watch::channel(false);
        let control = shared.config().proxy.takeover_path(addr.port());
        if let Some(path) = control {
            let p = crate::takeover::predecessor::Predecessor {
                shared: shared.clone(),
                tracker: tracker.clone(),
                listeners: copies,
                handed: handed_tx,
                phase: phase.clone(),
                settled,
            };
            tasks.extend(crate::takeover::predecessor::start(&path, p));
        }
        if let Some(c) = shared.pools.cluster() {
            c.attach_grants(Arc::new(shared.admission.clone()));
            let run = crate::cluster::run(c.clone(), shared.live_config.clone(), phase.clone());
            tasks.push(tokio::spawn(run));
        }
        if let Some(l) = http {
            tasks.push(tokio::spawn(crate::http::serve(
                l,
                Arc::new(built.http_sources()),
                phase,
            )));
            tracing::info!(addr = ?http_addr, "metrics and health on http://{}/metrics", http_addr.map(|a| a.to_string()).unwrap_or_default());
        }
        tracing::info!(%addr, "pgvalve listening");
        ProxyHandle {
            addr,
            http_addr,
            shared,
            reloader: built.reloader,
            shutdown_requested: built.shutdown_requested,
            phase_tx: Arc::new(phase_tx),
            tracker,
            tasks,
            threads,
            handed,
        }
    }

    /// This instance's membership of its `[cluster]`, if it has one.
    pub fn cluster(&self) -> Option<Arc<crate::cluster::Cluster>> {
        self.shared.pools.cluster().cloned()
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

    /// The sessions' services (pools, admission, pins ...) for inspection.
    pub fn shared(&self) -> &Arc<Services> {
        &self.shared
    }

    /// Applies a new, already validated configuration (see [`crate::reload`]): pool sizes,
    /// limits, identity rules, timeouts and users take effect without dropping clients.
    pub fn reload(&self, config: Config) -> Reloaded {
        self.reloader.apply(config)
    }

    /// Reads the configuration again from the source set by [`ProxyHandle::set_reload_source`]
    /// and applies it; what SIGHUP and the console's `RELOAD` do.
    ///
    /// # Errors
    /// Why it was refused (the configuration in force stays).
    pub async fn reload_from_source(&self) -> Result<Reloaded, String> {
        self.reloader.reload().await
    }

    /// Sets what reloads read: the config file (None: quick start) and the overrides.
    pub fn set_reload_source(&self, path: Option<std::path::PathBuf>, overrides: crate::config::Overrides) {
        self.reloader.set_source(path, overrides);
    }

    /// Resolves when the console asked for SHUTDOWN.
    pub async fn shutdown_requested(&self) {
        self.shutdown_requested.notified().await;
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
    pub(crate) fn begin_drain(&self) {
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

async fn reap_loop(shared: Arc<Services>, mut phase: watch::Receiver<Phase>) {
    let every = shared.pools.reap_interval();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {
                let n = shared.pools.reap();
                if n > 0 {
                    tracing::debug!(closed = n, "closed idle or old server connections");
                }
                let n = shared.pools.reset_stale_params().await;
                if n > 0 {
                    tracing::debug!(reset = n, "reset idle server connections of clients that left");
                }
            }
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
    }
}

/// How often the pools' per-core leases are looked at while clients wait (see
/// `pool::shards`): a core whose clients wait gets lease from another within this and a
/// connection's opening.
const LEASE_EVERY: Duration = Duration::from_millis(2);

/// How seldom they are looked at while nobody waits: an idle proxy wakes ten times a second
/// for them, not five hundred (a client queued wakes the loop at once).
const LEASE_IDLE: Duration = Duration::from_millis(100);

/// Moves the pools' leases between cores to where clients wait, while the proxy runs (only
/// with several cores): every [`LEASE_EVERY`] while some client waits or a lease moved, else
/// less and less often, down to every [`LEASE_IDLE`], until a client is queued.
async fn lease_loop(shared: Arc<Services>, mut phase: watch::Receiver<Phase>) {
    if shared.pools.cores() < 2 {
        return;
    }
    let mut every = LEASE_EVERY;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            // Only while idling: while clients wait it looks every 2 ms anyway, and a wake per
            // queued client would run it hundreds of times more often (a bell rung meanwhile
            // wakes it once, early, when it idles next).
            () = shared.admission.client_queued(), if every > LEASE_EVERY => {}
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
        shared.admission.exchange();
        let moved = shared.pools.rebalance(&shared.admission);
        every = if moved > 0 || shared.admission.anyone_waiting() || shared.pools.anyone_waiting() {
            LEASE_EVERY
        } else {
            (every * 2).min(LEASE_IDLE)
        };
    }
}

/// SHOW STATS averages over this many seconds (PgBouncer's default `stats_period`).
pub(crate) const STATS_PERIOD_SECS: u64 = 60;

/// Once a second: surge detection and cleanup in admission; the stats period.
async fn admission_loop(shared: Arc<Services>, mut phase: watch::Receiver<Phase>) {
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
                if let Some(c) = shared.pools.cluster() {
                    c.set_weight(shared.admission.identities_waiting());
                }
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
async fn queue_clock(shared: Arc<Services>, mut phase: watch::Receiver<Phase>) {
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

/// Lets this process open as many files as its hard limit allows (`ulimit -Hn`; systemd's
/// `LimitNOFILE`): the usual soft limit of 1,024 is below what `max_client_connections`
/// clients and their server connections take (each is one descriptor), and a proxy that hits
/// it refuses clients with "too many open files". Warns when even the hard limit is below
/// what the configuration may need.
fn open_files_for(config: &Config) {
    let Some(hard) = raise_open_files() else {
        return;
    };
    // Clients, server connections, and a margin for listeners, logs and the lock monitor.
    let need = u64::from(config.proxy.max_client_connections) + u64::from(config.max_server_connections()) + 64;
    if need > hard {
        tracing::warn!(
            limit = hard,
            max_client_connections = config.proxy.max_client_connections,
            max_server_connections = config.max_server_connections(),
            "this process may open {hard} files, fewer than max_client_connections and the server connections may need ({need}): raise it (ulimit -n, or LimitNOFILE in the systemd unit)"
        );
    }
}

/// Raises the soft limit on open files to the hard limit, as `ulimit -n $(ulimit -Hn)` would
/// (no privilege needed; process-wide and idempotent, so several proxies in one process do
/// it alike). The limit in force after, None when there is none.
fn raise_open_files() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let (soft, hard) = (now.current?, now.maximum?);
    if soft < hard {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(soft, hard, error = %e, "could not raise the open files limit to its hard limit");
            return Some(soft);
        }
        tracing::debug!(from = soft, to = hard, "open files limit raised to the hard limit");
    }
    Some(hard)
}

#[cfg(test)]
mod tests {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let Some(hard) = getrlimit(Resource::Nofile).maximum else {
            return; // no hard limit: nothing to raise
        };
        // Lowered as a login shell sets it (allowed unprivileged), then raised as the proxy does.
        let low = Rlimit {
            current: Some(hard.min(1024)),
            maximum: Some(hard),
        };
        setrlimit(Resource::Nofile, low).expect("lower the soft limit");
        assert_eq!(super::raise_open_files(), Some(hard));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        assert_eq!(super::raise_open_files(), Some(hard), "idempotent");
    }
}

//! The deadpool manager of raw server connections.
//!
//! Part of the pool: deadpool calls [`ServerManager::create`] when a pool needs a new
//! connection and [`ServerManager::recycle`] before handing an idle one out. Every server
//! connection holds one slot of its pool's [`Budget`] (`pool_size`, under
//! `max_server_connections`) for its whole life; when none is free, an idle connection is
//! closed to make room. The pool's deadpool size follows its share of the budget (pgvalve's
//! own connections to the same database and user take the rest), and an idle connection
//! whose slot a claim waits for is closed instead of reused.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};

use crate::server::budget::{Budget, Slot};
use crate::server::{self, ServerConn, ServerError, ServerTarget};

/// A deadpool pool of server connections.
pub(crate) type Pool = managed::Pool<ServerManager>;

/// Spacing of connection attempts while the server cannot be reached: one attempt per
/// window, 100 ms doubling up to the maximum; everyone else fails at once.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    state: Mutex<BackoffState>,
}

#[derive(Debug, Default)]
struct BackoffState {
    failures: u32,
    retry_at: Option<std::time::Instant>,
    last: String,
}

impl Backoff {
    /// Ok to attempt now (claiming the attempt), or the error to fail with at once.
    fn admit(&self, addr: &str, max: Duration) -> Result<(), ServerError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match st.retry_at {
            Some(at) if now < at => Err(ServerError::Unreachable {
                addr: addr.to_string(),
                last: st.last.clone(),
                retry_in: at - now,
            }),
            Some(_) => {
                // This caller makes the attempt; others keep failing fast until it is known.
                st.retry_at = Some(now + Self::delay(st.failures, max));
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn delay(failures: u32, max: Duration) -> Duration {
        (Duration::from_millis(100) * 2u32.saturating_pow(failures.saturating_sub(1).min(16))).min(max)
    }

    fn failed(&self, e: &ServerError, max: Duration) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.failures += 1;
        st.retry_at = Some(std::time::Instant::now() + Self::delay(st.failures, max));
        st.last = e.to_string();
    }

    fn succeeded(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.failures > 0 {
            tracing::info!(after_failures = st.failures, "server reachable again");
        }
        *st = BackoffState::default();
    }
}

/// Creates and checks server connections for one (database, user) pool.
#[derive(Debug)]
pub struct ServerManager {
    /// Where and as whom to connect.
    pub target: ServerTarget,
    /// The pool's budget (`pool_size`, under `max_server_connections`).
    pub budget: Arc<Budget>,
    /// How long to wait for a slot (query_wait_timeout).
    pub(crate) slot_wait: Duration,
    /// Close connections older than this when they come back (zero = never).
    pub lifetime: Duration,
    /// Probe a connection before reuse only when it was idle longer than this.
    pub(crate) check_delay: Duration,
    /// Connections refused by recycle (closed instead of reused).
    pub recycle_rejections: Arc<AtomicU64>,
    /// Connections created.
    pub created: Arc<AtomicU64>,
    /// Connection attempts that failed.
    pub failed: Arc<AtomicU64>,
    /// Attempt spacing while the server is unreachable.
    pub(crate) backoff: Backoff,
    /// Longest spacing (server_login_retry).
    pub(crate) login_retry: Duration,
    /// The pool's max size (its share of the budget), kept with every resize: read at each
    /// checkout without the pool's lock (`Pool::status` takes it).
    pub size: AtomicUsize,
    /// This core's lease of the pool (see `pool::shards`): its part's max size, and the
    /// capacity of its admission gate.
    pub(crate) lease: AtomicUsize,
    /// Connections handed over between the pool's parts (shared by them all).
    pub(crate) incoming: Arc<super::shards::Incoming>,
    /// This part's admission gate: the pool's label, and `#core` when the pool has one part
    /// per core.
    pub(crate) gate: Arc<str>,
    /// The core whose admission scheduler holds the gate (see `admission::cores`).
    pub(crate) gate_core: usize,
}

impl managed::Manager for ServerManager {
    /// Boxed: deadpool moves its objects by value several times per checkout and return,
    /// and a connection is a few hundred bytes.
    type Type = Box<ServerConn>;
    type Error = ServerError;

    /// Boxed: deadpool keeps the future of `create` inside every checkout's future (an
    /// enum as large as its largest state); unboxed, a checkout that finds an idle
    /// connection would still carry the room to open one, and every transaction copy it.
    async fn create(&self) -> Result<Box<ServerConn>, ServerError> {
        Box::pin(self.create_conn()).await
    }

    async fn recycle(&self, conn: &mut Box<ServerConn>, metrics: &Metrics) -> RecycleResult<ServerError> {
        self.check(conn, metrics)
    }
}

impl ServerManager {
    /// A new connection for this part: one another core handed over, or one opened under a
    /// slot of the budget (see [`managed::Manager::create`]).
    async fn create_conn(&self) -> Result<Box<ServerConn>, ServerError> {
        let started = Instant::now();
        let deadline = started + self.slot_wait;
        loop {
            // A connection another core handed over comes first (its slot comes with it).
            while let Some(mut conn) = self.incoming.take() {
                conn.handed_at = started;
                if let Err(e) = conn.stream.rehome() {
                    tracing::debug!(error = %e, "server connection left on its event loop");
                }
                // Probed whatever its idle time: its new event loop has seen nothing of it yet.
                conn.failures_seen = self.incoming.failures();
                if self.probed(&mut conn).is_ok() {
                    return Ok(conn);
                }
            }
            let Some(slot) = self.slot_or_handover(deadline).await? else {
                continue;
            };
            let mut conn = self.open(slot, deadline).await.map(Box::new)?;
            conn.failures_seen = self.incoming.failures();
            return Ok(conn);
        }
    }

    /// This part's admission gate and the core whose scheduler holds it.
    pub(crate) fn gate(&self) -> (&Arc<str>, usize) {
        (&self.gate, self.gate_core)
    }

    /// The pool's max size: pool_size as configured now, less the slots pgvalve's own
    /// connections to the same database and user hold.
    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// This core's lease of the pool.
    pub(crate) fn lease(&self) -> usize {
        self.lease.load(Ordering::Relaxed)
    }

    /// A slot of the budget, or None when another part handed a connection over first (while
    /// the budget is full, a connection a shrinking part gives back is the one to take: it
    /// spares PostgreSQL a login and a close). Waits until `deadline`.
    async fn slot_or_handover(&self, deadline: Instant) -> Result<Option<Slot>, ServerError> {
        let arrived = self.incoming.arrived();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if self.incoming.len() > 0 {
            return Ok(None);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            biased;
            () = &mut arrived => Ok(None),
            slot = self.budget.take(wait) => Ok(Some(slot?)),
        }
    }

    /// A new connection on `slot`. In a cluster, a seat can be lost while its connection logs
    /// in (the coordination connection died): that connection is closed unused and another
    /// slot taken (until `deadline`).
    async fn open(&self, slot: Slot, deadline: Instant) -> Result<ServerConn, ServerError> {
        let mut slot = Some(slot);
        for _ in 0..3 {
            let s = match slot.take() {
                Some(s) => s,
                None => {
                    self.budget
                        .take(deadline.saturating_duration_since(Instant::now()))
                        .await?
                }
            };
            let mut conn = self.open_once(s).await?;
            if server::seat::verify(&mut conn).await? {
                return Ok(conn);
            }
        }
        Err(server::seat::lost())
    }

    async fn open_once(&self, slot: Slot) -> Result<ServerConn, ServerError> {
        let addr = format!("{}:{}", self.target.host, self.target.port);
        self.backoff.admit(&addr, self.login_retry)?;
        let mut conn = match server::connect(&self.target).await {
            Ok(c) => c,
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if e.unreachable() {
                    self.backoff.failed(&e, self.login_retry);
                    tracing::warn!(server = %addr, error = %e, "cannot reach the server; backing off");
                }
                return Err(e);
            }
        };
        self.backoff.succeeded();
        conn.slot = Some(slot);
        self.created.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pid = conn.pid, db = %self.target.dbname, user = %self.target.user, "server connection opened");
        Ok(conn)
    }

    fn check(&self, conn: &mut ServerConn, metrics: &Metrics) -> RecycleResult<ServerError> {
        let reject = |why: &'static str| {
            self.recycle_rejections.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(why, "server connection closed instead of reused");
            Err(RecycleError::message(why))
        };
        if !conn.is_clean() {
            return reject("not idle");
        }
        if conn.slot.as_ref().is_some_and(|s| s.wanted()) {
            return reject("slot claimed by one of pgvalve's own connections");
        }
        let now = Instant::now();
        conn.handed_at = now;
        if !self.lifetime.is_zero() && now.saturating_duration_since(metrics.created) > self.lifetime {
            return reject("server_lifetime reached");
        }
        self.checked_idle(conn, now).or_else(reject)
    }

    /// Probes `conn` unless it was used within server_check_delay, no part has seen a server
    /// failure since, and its event loop has not seen it readable (an idle backend the server
    /// closed or wrote to is, once its event loop has run: after a restart, no stale connection
    /// waits for server_check_delay). `now`: the caller's clock reading (one per checkout).
    fn checked_idle(&self, conn: &mut ServerConn, now: Instant) -> Result<(), &'static str> {
        let failures = self.incoming.failures();
        let fresh = conn.failures_seen == failures;
        conn.failures_seen = failures;
        let idle = now.saturating_duration_since(conn.idle_since);
        // Back for less than a millisecond (a busy pool's usual case): read to the end moments
        // ago, so asking its event loop would cost a lock for nothing.
        if fresh && idle < self.check_delay && (idle < READINESS_AFTER || !conn.stream.seen_readable()) {
            return Ok(());
        }
        self.probed(conn)
    }

    /// [`probe`], and a failed one makes every part probe its idle connections at their next
    /// use (one backend gone is often all of them: PostgreSQL restarted).
    fn probed(&self, conn: &mut ServerConn) -> Result<(), &'static str> {
        probe(conn).inspect_err(|_| self.incoming.server_failed())
    }
}

/// Idle time after which a checkout asks the connection's event loop whether it saw the
/// socket readable (see [`ServerManager::checked_idle`]).
const READINESS_AFTER: Duration = Duration::from_millis(1);

/// An idle backend says nothing: any byte or EOF means it is gone or in trouble.
fn probe(conn: &mut ServerConn) -> Result<(), &'static str> {
    let mut byte = [0u8; 1];
    match conn.stream.peek(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Ok(0) => Err("closed by server"),
        Ok(_) => Err("unsolicited data from server"),
        Err(_) => Err("socket error"),
    }
}

//! Pools of server connections, one per (database, user), with a global cap.
//!
//! Fourth step of the flow (after admission): a client session asks [`PoolSet::checkout`] for
//! a server connection for its route and gets a [`PooledConn`] guard. Pools are created on
//! first use. A maintenance task closes idle connections past `server_idle_timeout` and old
//! ones past `server_lifetime`, once a second (faster when those limits are short).

mod guard;
mod manager;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{PoolError, QueueMode, Timeouts};
use deadpool::Runtime;

pub use guard::PooledConn;
pub use manager::{Pool, ServerManager, ServerSlots};

use crate::admission::ServerGrant;
use crate::config::{Config, Route};
use crate::error::{sqlstate, PgError};
use crate::server::{ServerError, ServerTarget};

/// Pools are keyed by the database name the client asked for and the user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Database name as the client asked for it.
    pub database: String,
    /// User name.
    pub user: String,
}

/// Why no server connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Waited `query_wait_timeout` for a free server connection.
    #[error("no server connection free for database \"{database}\" user \"{user}\" within {waited:?} (query_wait_timeout); pool_size={pool_size}")]
    Timeout {
        /// Database.
        database: String,
        /// User.
        user: String,
        /// How long the client waited.
        waited: Duration,
        /// The pool's size.
        pool_size: u32,
    },
    /// Creating a server connection failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The pool is closed (shutdown).
    #[error("pool closed")]
    Closed,
}

impl CheckoutError {
    /// The error the client is told.
    pub fn client_error(&self) -> PgError {
        match self {
            CheckoutError::Timeout { database, user, waited, pool_size } => PgError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!(
                    "pgvalve: no server connection available for database \"{database}\" user \"{user}\": all {pool_size} are in use (pool_size={pool_size}); waited {} (query_wait_timeout)",
                    humantime::format_duration(*waited)
                ),
            )
            .with_hint("Retry later, raise pool_size (and PostgreSQL's max_connections), or shorten the sessions that hold server connections."),
            CheckoutError::Server(e) => e.client_error(),
            CheckoutError::Closed => PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgvalve is shutting down"),
        }
    }
}

/// Point-in-time numbers of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The pool.
    pub key: PoolKey,
    /// Max size.
    pub pool_size: usize,
    /// Open server connections (in use + idle).
    pub open: usize,
    /// Idle server connections.
    pub idle: usize,
    /// Clients waiting for one.
    pub waiting: usize,
    /// Server connections created so far.
    pub created: u64,
    /// Connections closed instead of reused at checkout.
    pub recycle_rejections: u64,
}

struct Entry {
    pool: Pool,
    created: Arc<AtomicU64>,
    rejected: Arc<AtomicU64>,
}

/// All pools of one proxy.
#[derive(Clone)]
pub struct PoolSet {
    config: Arc<Config>,
    pools: Arc<Mutex<HashMap<PoolKey, Entry>>>,
    slots: Arc<ServerSlots>,
}

impl std::fmt::Debug for PoolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSet").finish_non_exhaustive()
    }
}

impl PoolSet {
    /// Pools for `config` (none open until first used).
    pub fn new(config: Arc<Config>) -> Self {
        let slots = ServerSlots::new(config.pool.max_server_connections);
        Self {
            config,
            pools: Arc::new(Mutex::new(HashMap::new())),
            slots,
        }
    }

    fn pool(&self, route: &Route) -> Pool {
        let key = PoolKey {
            database: route.database.clone(),
            user: route.user.clone(),
        };
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = pools.get(&key) {
            return e.pool.clone();
        }
        let (created, rejected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let cfg = &self.config.pool;
        let manager = ServerManager {
            target: ServerTarget {
                host: route.host.clone(),
                port: route.port,
                dbname: route.server_dbname.clone(),
                user: route.user.clone(),
                password: self
                    .config
                    .users
                    .get(&route.user)
                    .and_then(|u| u.server_password.clone()),
                connect_timeout: cfg.server_connect_timeout,
            },
            slots: self.slots.clone(),
            slot_wait: cfg.query_wait_timeout,
            check_delay: cfg.server_check_delay,
            lifetime: cfg.server_lifetime,
            recycle_rejections: rejected.clone(),
            created: created.clone(),
        };
        let pool = Pool::builder(manager)
            .max_size(route.pool_size as usize)
            .queue_mode(QueueMode::Lifo)
            .timeouts(Timeouts {
                wait: Some(cfg.query_wait_timeout),
                // create() bounds itself: query_wait_timeout for a global slot, then
                // server_connect_timeout for connect and login.
                create: None,
                recycle: Some(Duration::from_secs(5)),
            })
            .runtime(Runtime::Tokio1)
            .build()
            .expect("invariant: a runtime and a max size are set");
        self.slots.register(&pool);
        pools.insert(
            key,
            Entry {
                pool: pool.clone(),
                created,
                rejected,
            },
        );
        pool
    }

    /// Gets a server connection for `route`, under an admission grant for its pool (which
    /// admission hands out no more than pool_size of, so this rarely waits: only for the
    /// global `max_server_connections`, up to `query_wait_timeout`).
    ///
    /// # Errors
    /// [`CheckoutError`]: timeout (53300), server failure, or shutdown.
    pub async fn checkout(&self, route: &Route, grant: Option<ServerGrant>) -> Result<PooledConn, CheckoutError> {
        let pool = self.pool(route);
        match pool.get().await {
            Ok(obj) => Ok(PooledConn::new(obj, grant)),
            Err(PoolError::Timeout(_)) => Err(CheckoutError::Timeout {
                database: route.database.clone(),
                user: route.user.clone(),
                waited: self.config.pool.query_wait_timeout,
                pool_size: route.pool_size,
            }),
            Err(PoolError::Backend(e)) => Err(CheckoutError::Server(e)),
            Err(PoolError::PostCreateHook(_)) | Err(PoolError::NoRuntimeSpecified) | Err(PoolError::Closed) => {
                Err(CheckoutError::Closed)
            }
        }
    }

    /// Numbers for every pool, sorted by key.
    pub fn stats(&self) -> Vec<PoolStats> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<PoolStats> = pools
            .iter()
            .map(|(k, e)| {
                let s = e.pool.status();
                PoolStats {
                    key: k.clone(),
                    pool_size: s.max_size,
                    open: s.size,
                    idle: s.available,
                    waiting: s.waiting,
                    created: e.created.load(Ordering::Relaxed),
                    recycle_rejections: e.rejected.load(Ordering::Relaxed),
                }
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime`.
    pub fn reap(&self) -> usize {
        let (idle_to, life) = (self.config.pool.server_idle_timeout, self.config.pool.server_lifetime);
        let pools: Vec<Pool> = {
            let p = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            p.values().map(|e| e.pool.clone()).collect()
        };
        pools
            .iter()
            .map(|pool| {
                pool.retain(|c, m| {
                    (idle_to.is_zero() || c.idle_since.elapsed() < idle_to) && (life.is_zero() || m.age() < life)
                })
                .removed
                .len()
            })
            .sum()
    }

    /// How often [`PoolSet::reap`] should run.
    pub fn reap_interval(&self) -> Duration {
        let p = &self.config.pool;
        [p.server_idle_timeout, p.server_lifetime]
            .into_iter()
            .filter(|d| !d.is_zero())
            .map(|d| d / 4)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Closes every pool: idle connections now, checked-out ones when they come back.
    pub fn close(&self) {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        for e in pools.values() {
            e.pool.close();
        }
    }
}

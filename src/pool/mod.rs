//! Pools of server connections, one per (database, user), each the occupant of its budget.
//!
//! Fourth step of the flow (after admission): a client session asks [`PoolSet::checkout`] for
//! a server connection for its route and gets a [`PooledConn`] guard. Pools are created on
//! first use. Every connection holds a slot of the pool's budget (`pool_size`) and so of the
//! proxy's (`max_server_connections`); pgvalve's own connections to PostgreSQL take theirs
//! from the same [`Budgets`] (see `server::budget`), and a pool's size is its share. A
//! maintenance task closes idle connections past `server_idle_timeout` and old ones past
//! `server_lifetime`, once a second (faster when those limits are short). While a client's
//! DROP DATABASE (or the like) holds a server database (see [`crate::dbgate`]), the idle
//! connections of every pool that reaches it are closed and its checkouts wait.

mod guard;
pub mod latency;
mod manager;
pub(crate) mod params;
mod part;
pub(crate) mod pause;
mod report;
mod routes;
pub(crate) mod shards;
pub(crate) mod stats;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use deadpool::managed::PoolError;

pub(crate) use guard::PooledConn;
pub(crate) use manager::Pool;
use part::{part, Shape};
pub(crate) use pause::Pauses;
pub(crate) use stats::Stats;

use crate::admission::ServerGrant;
use crate::config::{Config, Route};
use crate::dbgate::{DbGates, ServerDb};
use crate::error::{sqlstate, PgError, Side, Sided};
use crate::server::budget::{Budget, Budgets};
use crate::server::ServerError;

/// Pools are keyed by the database name the client asked for and the user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Database name as the client asked for it.
    pub database: String,
    /// User name.
    pub user: String,
}

impl PoolKey {
    /// The key of `route`'s pool.
    pub fn of(route: &Route) -> Self {
        PoolKey {
            database: route.database.clone(),
            user: route.user.clone(),
        }
    }

    /// The pool's name in admission (its fair-queue gate) and in messages to clients.
    pub fn label(database: &str, user: &str) -> String {
        format!("database \"{database}\" user \"{user}\"")
    }
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
    pub(crate) fn client_error(&self) -> PgError {
        match self {
            CheckoutError::Timeout { database, user, waited, pool_size } => PgError::fatal(
                self.sqlstate(),
                format!(
                    "pgvalve: no server connection available for database \"{database}\" user \"{user}\": all {pool_size} are in use (pool_size={pool_size}); waited {} (query_wait_timeout)",
                    humantime::format_duration(*waited)
                ),
            )
            .with_hint("Retry later, raise pool_size (and PostgreSQL's max_connections), or shorten the sessions that hold server connections."),
            CheckoutError::Server(e) => e.client_error(),
            CheckoutError::Closed => PgError::fatal(self.sqlstate(), "pgvalve is shutting down"),
        }
    }
}

impl Sided for CheckoutError {
    fn side(&self) -> Side {
        match self {
            CheckoutError::Timeout { .. } | CheckoutError::Closed => Side::Proxy,
            CheckoutError::Server(e) => e.side(),
        }
    }

    fn sqlstate(&self) -> &str {
        match self {
            CheckoutError::Timeout { .. } => sqlstate::TOO_MANY_CONNECTIONS,
            CheckoutError::Server(e) => e.sqlstate(),
            CheckoutError::Closed => sqlstate::ADMIN_SHUTDOWN,
        }
    }
}

struct Entry {
    /// One part per core.
    shards: Arc<shards::Shards>,
    created: Arc<AtomicU64>,
    rejected: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    shape: Shape,
}

/// All pools of one proxy.
#[derive(Clone)]
pub struct PoolSet {
    config: Arc<ArcSwap<Config>>,
    /// Keys of users looked up with auth_query (they have no password in the config).
    auth: Arc<crate::server::auth_query::AuthQuery>,
    pools: Arc<Mutex<crate::FastMap<PoolKey, Entry>>>,
    budgets: Arc<Budgets>,
    /// This instance's membership of a `[cluster]` (its lease is the root of `budgets`).
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Parameter sets live sessions use, per pool (kept across a pool's rebuild).
    live_params: Arc<Mutex<crate::FastMap<PoolKey, Arc<params::LiveParams>>>>,
    /// Holds on server databases: checkouts for a held one wait.
    gates: Arc<DbGates>,
    /// Traffic counters per pool.
    pub stats: Arc<Stats>,
    /// Cores (event loops) sessions run on: each pool has one part per core.
    cores: usize,
    /// The routes sessions hold, shared (see [`PoolSet::shared_route`]).
    routes: Arc<routes::Routes>,
}

impl std::fmt::Debug for PoolSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSet").finish_non_exhaustive()
    }
}

impl PoolSet {
    /// Pools for the live `config` (none open until first used). A hold raised on a server
    /// database in `gates` closes the idle connections of every pool that reaches it.
    /// Each pool has one part per core of `cores` (at least one). `lent`: a budget lent by a
    /// takeover's predecessor that every server connection also holds a slot of (not with a
    /// `[cluster]`, whose lease is the root then).
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        auth: Arc<crate::server::auth_query::AuthQuery>,
        gates: Arc<DbGates>,
        cores: usize,
        lent: Option<Arc<Budget>>,
    ) -> Self {
        let cluster = config.load().cluster.as_ref().map(crate::cluster::Cluster::new);
        let root = cluster.as_ref().map(|c| c.root().clone()).or(lent);
        let budgets = Budgets::under(config.load().max_server_connections(), root);
        let pools: Arc<Mutex<crate::FastMap<PoolKey, Entry>>> = Default::default();
        let weak = Arc::downgrade(&pools);
        gates.on_hold(Box::new(move |db| weak.upgrade().map_or(0, |p| close_idle_to(&p, db))));
        Self {
            config,
            auth,
            pools,
            budgets,
            cluster,
            live_params: Default::default(),
            gates,
            stats: Arc::default(),
            cores: cores.max(1),
            routes: Arc::default(),
        }
    }

    /// `route` as one `Arc` shared by every session whose route is equal (see [`routes`]).
    pub(crate) fn shared_route(&self, route: Route) -> Arc<Route> {
        self.routes.share(route)
    }

    /// How many cores each pool has a part for.
    pub(crate) fn cores(&self) -> usize {
        self.cores
    }

    /// Every core's part of every pool, with its key.
    fn all(&self) -> Vec<(PoolKey, Pool)> {
        let p = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        p.iter()
            .flat_map(|(k, e)| e.shards.pools().iter().map(move |pool| (k.clone(), pool.clone())))
            .collect()
    }

    /// The admission gates of `database`/`user`'s pool, one per core.
    pub(crate) fn gates(&self, database: &str, user: &str) -> Vec<Arc<str>> {
        let key = PoolKey {
            database: database.to_string(),
            user: user.to_string(),
        };
        let p = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        match p.get(&key) {
            Some(e) => e.shards.pools().iter().map(|p| p.manager().gate.clone()).collect(),
            None => vec![PoolKey::label(database, user).into()],
        }
    }

    /// Whether a checkout waits in any pool's part for a connection.
    pub(crate) fn anyone_waiting(&self) -> bool {
        let p = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        p.values()
            .any(|e| e.shards.pools().iter().any(|p| p.status().waiting > 0))
    }

    /// Moves lease between the cores of every pool where clients wait (see [`shards`]);
    /// returns how many pools changed.
    pub(crate) fn rebalance(&self, admission: &crate::admission::Admission) -> usize {
        if self.cores < 2 {
            return 0;
        }
        let all: Vec<Arc<shards::Shards>> = {
            let p = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            p.values().map(|e| e.shards.clone()).collect()
        };
        all.iter().filter(|s| s.rebalance(admission)).count()
    }

    /// A session's hold on its parameter set `key` in `route`'s pool (transaction mode): while
    /// any session holds a set, idle connections carrying it are left as they are.
    pub(crate) fn params_lease(&self, route: &Route, key: u64) -> params::ParamsLease {
        let live = self
            .live_params
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(PoolKey::of(route))
            .or_default()
            .clone();
        params::ParamsLease::new(live, key)
    }

    /// Resets idle connections carrying parameters of clients that are gone (see
    /// [`params`]); returns how many.
    pub(crate) async fn reset_stale_params(&self) -> usize {
        let pools: Vec<(Pool, Arc<params::LiveParams>)> = {
            let all = self.all();
            let live = self.live_params.lock().unwrap_or_else(|p| p.into_inner());
            all.into_iter()
                .map(|(k, pool)| (pool, live.get(&k).cloned().unwrap_or_default()))
                .collect()
        };
        let mut n = 0;
        for (pool, live) in pools {
            n += params::reset_stale(&pool, &live).await;
        }
        n
    }

    /// Core `core`'s part of the pool of `route` (created on first use), with the
    /// configuration in force now.
    pub fn pool(&self, route: &Route, core: usize) -> Pool {
        let key = PoolKey::of(route);
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = pools.get(&key) {
            return e.shards.core(core).clone();
        }
        let config = self.config.load();
        // A session that logged in before a reload keeps its route; the pool follows the
        // configuration in force.
        let live = config.route(&route.database, &route.user);
        let route = live.as_ref().unwrap_or(route);
        let (created, rejected, failed): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) = Default::default();
        let shape = Shape::of(&config, route, &self.auth);
        let budget = self.budget(&key.database, &key.user, route.pool_size);
        let share = budget.share();
        let incoming = Arc::default();
        // A pool too small to give every core two connections is one part the cores share.
        let n = if share >= 2 * self.cores { self.cores } else { 1 };
        let label = PoolKey::label(&key.database, &key.user);
        let parts: Vec<Pool> = (0..n)
            .map(|k| {
                let gate = crate::admission::gate_name(&label, k, n).into();
                part(
                    &shape,
                    &budget,
                    share,
                    &config,
                    (&created, &rejected, &failed),
                    &incoming,
                    gate,
                )
            })
            .collect();
        let shards = shards::Shards::new(parts, share);
        budget.occupy(Box::new(shards::ShardsOccupant(Arc::downgrade(&shards))));
        let pool = shards.core(core).clone();
        pools.insert(
            key,
            Entry {
                shards,
                created,
                rejected,
                failed,
                shape,
            },
        );
        pool
    }

    /// Gets a server connection from `pool` (see [`PoolSet::pool`]), under an admission grant
    /// for it (which admission hands out no more than pool_size of, so this rarely waits:
    /// only for the global `max_server_connections`, up to `query_wait_timeout`).
    ///
    /// # Errors
    /// [`CheckoutError`]: timeout (53300), server failure, or shutdown.
    pub async fn checkout(
        &self,
        pool: &Pool,
        route: &Route,
        grant: Option<ServerGrant>,
    ) -> Result<PooledConn, CheckoutError> {
        let t = &pool.manager().target;
        if self.gates.is_held(&t.host, t.port, &t.dbname) {
            // A client's DROP DATABASE (or the like) needs the database to itself: wait for
            // it, up to query_wait_timeout, then go on (PostgreSQL decides).
            let wait = pool.manager().slot_wait;
            Box::pin(self.gates.wait_open(&t.host, t.port, &t.dbname, wait)).await;
        }
        // Boxed: deadpool's checkout future is several hundred bytes, and this one's caller
        // (a client's transaction) is made anew for every transaction and held by every
        // client that waits in the queue; the box lives only as long as the checkout.
        let mut get = Box::pin(pool.get());
        // An idle connection is there at once nearly always: no clock, no timer then.
        let got = match crate::poll_once(get.as_mut()).await {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => tokio::time::timeout(pool.manager().slot_wait, get).await,
        };
        match got {
            Ok(Ok(obj)) => Ok(PooledConn::new(obj, grant)),
            // The pool's budget stayed full (pgvalve's own connections hold part of it).
            Err(_) | Ok(Err(PoolError::Timeout(_) | PoolError::Backend(ServerError::PoolFull(_)))) => {
                Err(CheckoutError::Timeout {
                    database: route.database.clone(),
                    user: route.user.clone(),
                    waited: pool.manager().slot_wait,
                    // As configured: the slots pgvalve's own connections hold are in use too.
                    pool_size: pool.manager().budget.usage().max as u32,
                })
            }
            Ok(Err(PoolError::Backend(e))) => Err(CheckoutError::Server(e)),
            Ok(Err(PoolError::PostCreateHook(_) | PoolError::NoRuntimeSpecified | PoolError::Closed)) => {
                Err(CheckoutError::Closed)
            }
        }
    }

    /// Applies a reloaded configuration to the pools that exist: a new pool_size resizes a
    /// pool in place; a new server address, credentials or connection settings retire it
    /// (its idle connections close now, busy ones when they come back; the next checkout
    /// opens a new pool). Clients are not touched. Returns what changed, for the log.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut changes = Vec::new();
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|key, e| {
            let Some(route) = config.route(&key.database, &key.user) else {
                e.shards.close();
                changes.push(format!("pool {}/{} closed: no longer routed", key.database, key.user));
                return false;
            };
            let shape = Shape::of(config, &route, &self.auth);
            if shape != e.shape {
                e.shards.close();
                changes.push(format!(
                    "pool {}/{} rebuilt: server or connection settings changed",
                    key.database, key.user
                ));
                return false;
            }
            let (size, budget) = (route.pool_size as usize, &e.shards.core(0).manager().budget);
            let was = budget.usage().max;
            if was != size {
                changes.push(format!("pool {}/{} pool_size {was} -> {size}", key.database, key.user));
            }
            true
        });
        drop(pools);
        // Every budget follows its route, also those of pgvalve's own connections alone (the
        // budget tells its pool its new share).
        for (database, user, budget) in self.budgets.pools() {
            if let Some(route) = config.route(&database, &user) {
                if budget.usage().max != route.pool_size as usize {
                    budget.resize(route.pool_size as usize);
                }
            }
        }
        self.budgets.retain(|d, u| config.route(d, u).is_some());
        changes
    }

    /// This instance's membership of a `[cluster]`, if any.
    pub(crate) fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// Every budget of server connections (pgvalve's own connections take their slots here).
    pub(crate) fn budgets(&self) -> &Arc<Budgets> {
        &self.budgets
    }

    /// The budget of the (database, user) pool, sized as configured now.
    pub(crate) fn budget(&self, database: &str, user: &str, pool_size: u32) -> Arc<Budget> {
        let budget = self.budgets.pool(database, user, pool_size);
        if budget.usage().max != pool_size as usize {
            budget.resize(pool_size as usize);
        }
        budget
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime`.
    pub(crate) fn reap(&self) -> usize {
        let config = self.config.load();
        let (idle_to, life) = (config.pool.server_idle_timeout, config.pool.server_lifetime);
        let pools: Vec<Pool> = self.all().into_iter().map(|(_, p)| p).collect();
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
    pub(crate) fn reap_interval(&self) -> Duration {
        let config = self.config.load();
        let p = &config.pool;
        [p.server_idle_timeout, p.server_lifetime]
            .into_iter()
            .filter(|d| !d.is_zero())
            .map(|d| d / 4)
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Closes the idle connections of `database`'s pools (PAUSE). Returns how many.
    pub(crate) fn close_idle(&self, database: Option<&str>) -> usize {
        let pools: Vec<Pool> = self
            .all()
            .into_iter()
            .filter(|(k, _)| database.is_none_or(|d| k.database == d))
            .map(|(_, p)| p)
            .collect();
        pools.iter().map(|p| p.retain(|_, _| false).removed.len()).sum()
    }

    /// Server connections in use by clients in `database`'s pools (None: all).
    pub(crate) fn in_use(&self, database: Option<&str>) -> usize {
        self.stats()
            .iter()
            .filter(|p| database.is_none_or(|d| p.key.database == d))
            .map(|p| p.open.saturating_sub(p.idle))
            .sum()
    }

    /// Closes every pool: idle connections now, checked-out ones when they come back.
    pub fn close(&self) {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        for e in pools.values() {
            e.shards.close();
        }
    }
}

/// Closes the idle connections of the pools in `pools` that reach `db` (whatever database
/// name their clients use for it). Returns how many.
fn close_idle_to(pools: &Mutex<crate::FastMap<PoolKey, Entry>>, db: &ServerDb) -> usize {
    let reaching: Vec<Pool> = {
        let p = pools.lock().unwrap_or_else(|p| p.into_inner());
        p.values()
            .filter(|e| {
                let t = &e.shape.target;
                db.is(&t.host, t.port, &t.dbname)
            })
            .flat_map(|e| e.shards.pools().to_vec())
            .collect()
    };
    reaching.iter().map(|p| p.retain(|_, _| false).removed.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkout_errors_know_their_side_and_code() {
        let timeout = CheckoutError::Timeout {
            database: "d".into(),
            user: "u".into(),
            waited: Duration::from_secs(5),
            pool_size: 2,
        };
        let refused = PgError::fatal("28P01", "password authentication failed for user \"u\"");
        let cases = [
            (timeout, Side::Proxy, "53300"),
            (CheckoutError::Closed, Side::Proxy, "57P01"),
            (ServerError::Postgres(refused).into(), Side::Server, "28P01"),
            (ServerError::NoSlot(10).into(), Side::Proxy, "53300"),
            (ServerError::NoPassword("u".into()).into(), Side::Config, "08006"),
        ];
        for (e, side, code) in cases {
            assert_eq!((e.side(), e.sqlstate()), (side, code), "{e}");
            assert_eq!(e.client_error().code, code, "{e}");
        }
    }
}

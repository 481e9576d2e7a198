//! `auth_user` + `auth_query` (as in PgBouncer): users not listed in `[users]` are looked up
//! in PostgreSQL. Their SCRAM verifier authenticates the client; the ClientKey the client
//! proves is kept (never a password) so the server leg can log in as that user.
//!
//! Part of the server side (client authentication asks it, the pool logs in with what it
//! learned). Lookups run on a connection of their own as `auth_user`, which holds a slot of
//! the budgets of the `auth_user` pool of that database and of `max_server_connections` while
//! it is open (a brief claim: it goes before the pools, see [`super::budget`]),
//! with the query's `$1` bound as a parameter; results (also "no such user") are cached for
//! `auth_cache_ttl`; failed logins are limited per user and client address, and per address
//! across users, so guessing does not turn into a stream of lookups. A look-up does not
//! connect to a database a client's DROP DATABASE (or the like) holds (see
//! [`crate::dbgate`]): it waits for the statement, up to `query_wait_timeout`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, ScramVerifier};
use crate::dbgate::DbGates;
use crate::server::budget::{Budgets, Hold};
use crate::server::scram::KeySlot;
use crate::server::{ServerError, ServerTarget};

/// Failures counted per window.
const WINDOW: Duration = Duration::from_secs(60);
/// Failures per address (any user) allowed per window, as a multiple of the per-user limit.
const ADDRESS_FACTOR: u32 = 4;
/// Entries kept per map before expired ones are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug, Clone)]
struct Cached {
    verifier: Option<ScramVerifier>,
    at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    fn current(&mut self, now: Instant) -> &mut u32 {
        if now.duration_since(self.start) >= WINDOW {
            *self = Window { start: now, count: 0 };
        }
        &mut self.count
    }
}

fn sweep<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, live: impl Fn(&V) -> bool) {
    if map.len() >= SWEEP_AT {
        map.retain(|_, v| live(v));
    }
}

/// Verifiers looked up, keys learned, failures counted. One per proxy.
#[derive(Debug)]
pub struct AuthQuery {
    cache: Mutex<HashMap<String, Cached>>,
    slots: Mutex<HashMap<String, Arc<KeySlot>>>,
    failures: Mutex<HashMap<(String, IpAddr), Window>>,
    address_failures: Mutex<HashMap<IpAddr, Window>>,
    /// Lookups run against PostgreSQL so far.
    pub lookups: std::sync::atomic::AtomicU64,
    /// A look-up waits while a client's DROP DATABASE (or the like) holds its database.
    gates: Arc<DbGates>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AuthQuery {
    /// Nothing looked up yet; look-ups keep to `gates`.
    pub fn new(gates: Arc<DbGates>) -> Self {
        AuthQuery {
            cache: Mutex::default(),
            slots: Mutex::default(),
            failures: Mutex::default(),
            address_failures: Mutex::default(),
            lookups: std::sync::atomic::AtomicU64::new(0),
            gates,
        }
    }

    /// The key slot of `user`, created empty the first time.
    pub fn slot(&self, user: &str) -> Arc<KeySlot> {
        lock(&self.slots).entry(user.to_string()).or_default().clone()
    }

    /// True when `user` from `addr` failed too often lately: refuse without a lookup.
    pub(crate) fn limited(&self, user: &str, addr: IpAddr, limit: u32) -> bool {
        if limit == 0 {
            return false;
        }
        let now = Instant::now();
        let per_user = lock(&self.failures)
            .get_mut(&(user.to_string(), addr))
            .is_some_and(|w| *w.current(now) >= limit);
        per_user
            || lock(&self.address_failures)
                .get_mut(&addr)
                .is_some_and(|w| *w.current(now) >= limit * ADDRESS_FACTOR)
    }

    /// Counts a failed login of `user` from `addr`.
    pub fn failed(&self, user: &str, addr: IpAddr) {
        let now = Instant::now();
        let fresh = Window { start: now, count: 0 };
        let live = |w: &Window| now.duration_since(w.start) < WINDOW;
        let mut f = lock(&self.failures);
        sweep(&mut f, live);
        *f.entry((user.to_string(), addr)).or_insert(fresh).current(now) += 1;
        drop(f);
        let mut a = lock(&self.address_failures);
        sweep(&mut a, live);
        *a.entry(addr).or_insert(fresh).current(now) += 1;
    }

    /// The verifier of `user` (None: no such login role, no password, expired, or not a SCRAM
    /// verifier), from the cache or looked up in the server of `database` on a connection
    /// that takes its slot from `budgets`.
    ///
    /// # Errors
    /// The lookup connection or query failed, or no slot was free within query_wait_timeout.
    pub async fn verifier(
        &self,
        config: &Config,
        budgets: &Budgets,
        database: &str,
        user: &str,
    ) -> Result<Option<ScramVerifier>, ServerError> {
        let ttl = config.proxy.auth_cache_ttl;
        if let Some(c) = lock(&self.cache).get(user).filter(|c| c.at.elapsed() < ttl) {
            return Ok(c.verifier.clone());
        }
        // Boxed: a whole server login, rare, kept out of every session's future.
        let verifier = Box::pin(self.look_up(config, budgets, database, user)).await?;
        let mut cache = lock(&self.cache);
        sweep(&mut cache, |c| c.at.elapsed() < ttl);
        cache.insert(
            user.to_string(),
            Cached {
                verifier: verifier.clone(),
                at: Instant::now(),
            },
        );
        Ok(verifier)
    }

    async fn look_up(
        &self,
        config: &Config,
        budgets: &Budgets,
        database: &str,
        user: &str,
    ) -> Result<Option<ScramVerifier>, ServerError> {
        let Some(auth_user) = config.proxy.auth_user.as_deref() else {
            return Ok(None);
        };
        let db = config.proxy.auth_dbname.as_deref().unwrap_or(database);
        let Some(route) = config.route(db, auth_user) else {
            return Ok(None);
        };
        let target = ServerTarget::for_route(config, &route, None);
        let wait = config.pool.query_wait_timeout;
        self.gates
            .wait_open(&target.host, target.port, &target.dbname, wait)
            .await;
        let slot = budgets
            .pool(db, auth_user, route.pool_size)
            .claim(Hold::Brief, Some(config.pool.query_wait_timeout))
            .await?;
        self.lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut conn = crate::server::connect(&target).await?;
        conn.slot = Some(slot);
        if !crate::server::seat::verify(&mut conn).await? {
            return Err(crate::server::seat::lost());
        }
        let rows = conn.query_rows(&config.proxy.auth_query, &[user]).await;
        conn.terminate().await;
        let secret = rows?.into_iter().next().and_then(|r| r.into_iter().nth(1).flatten());
        Ok(match secret {
            None => None,
            Some(s) => match s.parse::<ScramVerifier>() {
                Ok(v) => Some(v),
                Err(_) => {
                    tracing::warn!(user, "auth_query returned a password that is not a SCRAM-SHA-256 verifier; only SCRAM verifiers can be used");
                    None
                }
            },
        })
    }
}

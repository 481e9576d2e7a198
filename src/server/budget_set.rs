//! Every budget of one proxy: `max_server_connections` and one budget per (database, user)
//! pool under it.
//!
//! Part of `server::budget`; the proxy makes one and the pools take their budgets from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{lock, Budget, Scale};

/// Every budget of one proxy: `max_server_connections` and one per (database, user) pool.
#[derive(Debug)]
pub struct Budgets {
    server: Arc<Budget>,
    pools: Mutex<HashMap<(String, String), Arc<Budget>>>,
}

impl Budgets {
    /// Budgets under a `max_server_connections` of `max` (0 = unlimited).
    pub fn new(max: u32) -> Arc<Self> {
        Self::under(max, None)
    }

    /// Budgets under a `max_server_connections` of `max` (0 = unlimited), itself under
    /// `root` (the instance's lease of a cluster) when given.
    pub fn under(max: u32, root: Option<Arc<Budget>>) -> Arc<Self> {
        Arc::new(Budgets {
            server: Budget::new(Scale::Server, max as usize, root),
            pools: Mutex::default(),
        })
    }

    /// The proxy-wide budget (`max_server_connections`).
    pub fn server(&self) -> &Arc<Budget> {
        &self.server
    }

    /// The budget of the (database, user) pool, made with `pool_size` slots the first time
    /// (a reload resizes it: [`Budget::resize`]).
    pub fn pool(&self, database: &str, user: &str, pool_size: u32) -> Arc<Budget> {
        lock(&self.pools)
            .entry((database.to_string(), user.to_string()))
            .or_insert_with(|| Budget::new(Scale::Pool, pool_size as usize, Some(self.server.clone())))
            .clone()
    }

    /// Every pool budget, with its database and user.
    pub fn pools(&self) -> Vec<(String, String, Arc<Budget>)> {
        lock(&self.pools)
            .iter()
            .map(|((d, u), b)| (d.clone(), u.clone(), b.clone()))
            .collect()
    }

    /// Forgets the pool budgets `keep` says no (a reload unrouted them) once no slot of
    /// theirs is held.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        lock(&self.pools).retain(|(d, u), b| keep(d, u) || b.usage().used > 0);
    }
}

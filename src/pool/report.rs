//! What the pools report: SHOW POOLS' numbers per pool, SHOW CORES' per core's part, SHOW
//! SERVERS' idle connections.
//!
//! Part of `pool`; read by the console, the metrics and the HTTP status, on the cold path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{shards, PoolKey, PoolSet};

/// An idle server connection as SHOW SERVERS lists it: (pool, backend pid, server address,
/// opened, idle since, protocol minor version).
pub(crate) type IdleConnection = (PoolKey, i32, String, std::time::SystemTime, std::time::SystemTime, u16);

/// Point-in-time numbers of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The pool.
    pub key: PoolKey,
    /// Its size as configured (`pool_size`), the slots of its budget.
    pub pool_size: usize,
    /// Of those, held (or waited for) by pgvalve's own connections to the same database and
    /// user (the lock monitor's, auth_query look-ups): the pool's own size is the rest.
    pub own: usize,
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
    /// Connection attempts that failed.
    pub(crate) connect_failures: u64,
}

/// One core's part of a pool now (SHOW CORES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreStats {
    /// The pool.
    pub key: PoolKey,
    /// The core.
    pub core: usize,
    /// Its lease: the connections it may hold.
    pub lease: usize,
    /// Open server connections on this core.
    pub open: usize,
    /// Of those, idle.
    pub idle: usize,
    /// Lease moves of the pool so far.
    pub moves: u64,
}

impl PoolSet {
    /// Each core's part of every pool, sorted by pool and core: what SHOW CORES says.
    pub(crate) fn core_stats(&self) -> Vec<CoreStats> {
        let all: Vec<(PoolKey, Arc<shards::Shards>)> = {
            let p = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            p.iter().map(|(k, e)| (k.clone(), e.shards.clone())).collect()
        };
        let mut v: Vec<CoreStats> = all
            .iter()
            .flat_map(|(key, shards)| {
                let (leases, moves) = (shards.leases(), shards.moves());
                shards.pools().iter().enumerate().map(move |(core, p)| {
                    let s = p.status();
                    CoreStats {
                        key: key.clone(),
                        core,
                        lease: leases[core],
                        open: s.size,
                        idle: s.available,
                        moves,
                    }
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.key, a.core).cmp(&(&b.key, b.core)));
        v
    }

    /// Numbers for every pool, sorted by key.
    pub fn stats(&self) -> Vec<PoolStats> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<PoolStats> = pools
            .iter()
            .map(|(k, e)| {
                let (mut open, mut idle, mut waiting) = (0, 0, 0);
                for p in e.shards.pools() {
                    let s = p.status();
                    (open, idle, waiting) = (open + s.size, idle + s.available, waiting + s.waiting);
                }
                let budget = e.shards.core(0).manager().budget.usage();
                PoolStats {
                    key: k.clone(),
                    pool_size: budget.max,
                    own: budget.own,
                    open,
                    idle,
                    waiting,
                    created: e.created.load(Ordering::Relaxed),
                    recycle_rejections: e.rejected.load(Ordering::Relaxed),
                    connect_failures: e.failed.load(Ordering::Relaxed),
                }
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Idle server connections (see [`IdleConnection`]).
    pub(crate) fn idle_connections(&self) -> Vec<IdleConnection> {
        let pools = self.all();
        let ago = |i: std::time::Instant| std::time::SystemTime::now() - i.elapsed();
        let mut out = Vec::new();
        for (key, pool) in pools {
            pool.retain(|c, m| {
                out.push((
                    key.clone(),
                    c.pid,
                    c.addr.to_string(),
                    ago(m.created),
                    ago(c.idle_since),
                    c.protocol_minor,
                ));
                true
            });
        }
        out
    }
}

//! How one pool's connections are made: the shape a reload compares, and one core's part
//! (a deadpool of server connections holding slots of the pool's budget).
//!
//! Part of the pool, used by [`super::PoolSet`] when it opens a pool (one part per core,
//! see [`super::shards`]).

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{QueueMode, Timeouts};
use deadpool::Runtime;

use super::manager::{Pool, ServerManager};
use crate::config::{Config, Route};
use crate::server::budget::Budget;
use crate::server::ServerTarget;

/// What a pool's connections are made with: a reload that changes it retires the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) target: ServerTarget,
    pub(super) wait: Duration,
    check_delay: Duration,
    lifetime: Duration,
}

impl Shape {
    pub(super) fn of(config: &Config, route: &Route, auth: &crate::server::auth_query::AuthQuery) -> Self {
        let cfg = &config.pool;
        let looked_up = !config.users.contains_key(&route.user) && config.proxy.auth_user.is_some();
        Shape {
            target: ServerTarget::for_route(config, route, looked_up.then(|| auth.slot(&route.user))),
            wait: cfg.query_wait_timeout,
            check_delay: cfg.server_check_delay,
            lifetime: cfg.server_lifetime,
        }
    }
}

/// One core's part of a pool: a deadpool whose connections hold slots of `budget`.
pub(super) fn part(
    shape: &Shape,
    budget: &Arc<Budget>,
    share: usize,
    config: &Config,
    (created, rejected, failed): (&Arc<AtomicU64>, &Arc<AtomicU64>, &Arc<AtomicU64>),
    incoming: &Arc<super::shards::Incoming>,
    gate: Arc<str>,
) -> Pool {
    let manager = ServerManager {
        target: shape.target.clone(),
        budget: budget.clone(),
        slot_wait: shape.wait,
        check_delay: shape.check_delay,
        lifetime: shape.lifetime,
        recycle_rejections: rejected.clone(),
        created: created.clone(),
        failed: failed.clone(),
        backoff: Default::default(),
        login_retry: config.pool.server_login_retry,
        size: AtomicUsize::new(share),
        lease: AtomicUsize::new(share),
        incoming: incoming.clone(),
        gate_core: crate::admission::gate_core(&gate),
        gate,
    };
    Pool::builder(manager)
        .max_size(share)
        .queue_mode(QueueMode::Lifo)
        .timeouts(Timeouts {
            // checkout() bounds the wait itself, making a timer only when it waits.
            wait: None,
            // create() bounds itself: query_wait_timeout for a global slot, then
            // server_connect_timeout for connect and login.
            create: None,
            // recycle() only looks at the connection (no I/O).
            recycle: None,
        })
        .runtime(Runtime::Tokio1)
        .build()
        .expect("invariant: a runtime and a max size are set")
}

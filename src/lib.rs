//! pgvalve: a connection-limiting PostgreSQL proxy.
//!
//! # Layout (the flow of a client connection)
//!
//! ```text
//! listener ─▶ client (startup, auth) ─▶ admission ─▶ pool (per database+user) ─▶ server ─▶ PostgreSQL
//!                 │                                                                 ▲
//!                 └──────────────── relay (bytes both ways, headers only) ──────────┘
//! ```
//!
//! - [`listener`]: accepts sockets, takes an admission permit, spawns a session (on a
//!   [`session_threads`] event loop while every pool is in session mode).
//! - [`client`]: one session — first packet, authentication, parameters, relay.
//! - [`admission`]: client identities, per-identity caps and login rate (before auth), the
//!   fair queue for server connections, surge detection.
//! - [`pool`]: deadpool pools of server connections, global `max_server_connections`.
//! - [`server`]: one PostgreSQL connection: login, reset, cancel.
//! - [`protocol`]: header framing (hot path) and the messages the proxy says itself.
//!
//! Beside the flow: [`locks`] (the lock monitor), [`sessions`] (who uses which backend),
//! [`admin`] (the console: `psql -d pgvalve`, SHOW LIMITS ...), [`observe`] (Prometheus metrics) served by [`http`] with health checks,
//! [`config`] (load, validate), [`cancel`] (cancel-key routing),
//! [`shutdown`] (phases), [`proxy`] (the handle that owns it all), [`testkit`] (throwaway
//! PostgreSQL for tests and the demo), [`demo`], [`loadtest`] (the load-test harness).
//!
//! No global mutable state: everything a task needs is passed in as a handle.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// A hash map for the per-transaction paths (admission, pools, statements): foldhash,
/// seeded at random per map, in place of SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Polls `f` once: its output if it is ready now, else `Pending` (and `f` stays usable), so a
/// caller makes a timer or reads the clock only when it really waits.
pub(crate) async fn poll_once<F: std::future::Future>(mut f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
}

pub mod admin;
pub mod admission;
pub mod cancel;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod listener;
pub mod loadtest;
pub mod locks;
pub mod observe;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod session_threads;
pub mod sessions;
pub mod shutdown;
pub mod testkit;
pub mod tls;

pub use config::Config;
pub use proxy::ProxyHandle;

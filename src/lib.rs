//! pgvalve: a connection-limiting PostgreSQL proxy.
//!
//! # The flow of a client connection
//!
//! ```text
//! listener ─▶ client (startup, auth) ─▶ admission ─▶ pool (per database+user) ─▶ server ─▶ PostgreSQL
//!                 │                                                                 ▲
//!                 └──────────────── relay (bytes both ways, headers only) ──────────┘
//! ```
//!
//! # Layers: dependencies point one way, the way the data flows
//!
//! ```text
//! proxy                          the one composition root: builds every service, hands out handles
//!   │
//! listener · admin · http        beside the session: accept, the console, /metrics and /readyz,
//! · takeover                     the control socket a successor takes sockets and clients from
//! session_threads                the event loops the listener hands sessions to
//!   │
//! client                         the session: startup, auth, checkout, relay (takes client::Services)
//!   │
//! reload · locks                 reload publishes to pools and admission; the lock monitor reads
//!   │                            the session registry and tells admission
//! pool · cancel                  server connections per database+user; cancel-key routing
//!   │
//! admission · server · sessions  identities, caps, queues; one PostgreSQL connection (and
//! · dbgate                       auth_query); the session registry; holds on a server database
//!   │                            while a DROP/ALTER/CREATE DATABASE needs it to itself
//! tls · observe                  TLS stream glue; the per-proxy metrics recorder
//!   │
//! config                         every settings type: load, parse, validate (TLS loaded too)
//!   │
//! protocol · error · shutdown    the wire (framing, messages, tags); errors with side and
//!                                SQLSTATE; phases
//! ```
//!
//! A module imports only from the layers below it (`python3 ../shared/tools/modcycles.py src`
//! finds no cycle). Each task receives the narrow handles it uses, built by [`proxy`]: a
//! session gets [`client::Services`]; the lock monitor a [`locks::Watch`]; the HTTP endpoint
//! [`http::Sources`]; the console [`admin::AdminConsole`], plugged into the session as a
//! [`client::Console`] so the session never imports the console; reloads a
//! [`reload::Reloader`].
//!
//! - [`listener`]: accepts sockets, takes an admission permit, spawns a session (on a
//!   [`session_threads`] event loop while every pool is in session mode).
//! - [`client`]: one session — first packet, authentication, parameters, relay.
//! - [`admission`]: client identities, per-identity caps and login rate (before auth), the
//!   fair queue for server connections, surge detection.
//! - [`pool`]: deadpool pools of server connections, global `max_server_connections`.
//! - [`server`]: one PostgreSQL connection: login, reset, cancel; auth_query look-ups.
//! - [`protocol`]: header framing (hot path), the messages the proxy says itself, the wire
//!   vocabulary (named tags, the C-string reader).
//!
//! Beside the flow: [`locks`] (the lock monitor), [`sessions`] (who uses which backend),
//! [`dbgate`] (pgvalve's own connections kept away from a database a client drops, renames or
//! copies),
//! [`admin`] (the console: `psql -d pgvalve`, SHOW LIMITS ...), [`observe`] (the metrics
//! recorder) scraped by [`http`] with health checks, [`config`] (load, parse, validate),
//! [`cancel`] (cancel-key routing), [`reload`], [`takeover`] (upgrades that keep the clients),
//! [`shutdown`] (phases), [`proxy`] (the handle
//! that owns it all), [`testkit`] (throwaway PostgreSQL for tests and the demo), [`demo`],
//! [`loadtest`] (the load-test harness), [`import`] (a PgBouncer configuration as a pgvalve
//! one), [`check`] (whether a configuration's pools fit in a PostgreSQL's max_connections).
//!
//! No global mutable state: everything a task needs is passed in as a handle.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
// The docs describe the internals for the developers too (`cargo doc --document-private-items`),
// so public pages may name crate-private items.
#![allow(rustdoc::private_intra_doc_links)]

/// A hash map for the per-transaction paths (admission, pools, statements): foldhash,
/// seeded at random per map, in place of SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Polls `f` once: its output if it is ready now, else `Pending` (and `f` stays usable), so a
/// caller makes a timer or reads the clock only when it really waits.
pub(crate) async fn poll_once<F: std::future::Future>(mut f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
}

pub(crate) mod admin;
pub mod admission;
pub(crate) mod cancel;
pub mod check;
pub(crate) mod client;
pub mod cluster;
pub mod config;
pub(crate) mod dbgate;
pub mod demo;
pub(crate) mod error;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod http;
pub mod import;
pub(crate) mod lease;
pub(crate) mod listener;
pub mod loadtest;
pub mod locks;
pub(crate) mod notify;
pub mod observe;
pub(crate) mod pool;
pub mod protocol;
pub mod proxy;
pub(crate) mod reload;
pub(crate) mod server;
pub(crate) mod session_threads;
pub(crate) mod sessions;
pub mod shutdown;
pub(crate) mod takeover;
pub mod testkit;
pub(crate) mod tls;
pub mod top;

pub use config::Config;
pub use proxy::ProxyHandle;

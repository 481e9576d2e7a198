//! The HTTP endpoint (`[http] listen`): `/metrics` (Prometheus text), `/healthz` (the process
//! is up), `/readyz` (the listener accepts clients and PostgreSQL can be reached).
//!
//! Beside the client session; started by the proxy when configured, stopped with it. It reads
//! the services through [`Sources`], the handles the proxy gives it.

mod metrics;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::client::Services;
use crate::locks::LockMonitor;
use crate::observe::Events;
use crate::reload::Reloader;
use crate::shutdown::Phase;

/// What the endpoint reads: the sessions' services, the event metrics, the lock monitor and
/// the reload counters.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// The sessions' services (configuration, pools, admission, registry, phase).
    pub services: Arc<Services>,
    /// Event metrics.
    pub events: Events,
    /// What the lock monitor saw.
    pub locks: Arc<LockMonitor>,
    /// Reload counters.
    pub(crate) reloader: Arc<Reloader>,
}

async fn metrics(State(shared): State<Arc<Sources>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&shared),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when accepting clients and some pool holds a server connection, or else one of
/// the configured servers accepts a connection within a second.
async fn readyz(State(shared): State<Arc<Sources>>) -> (StatusCode, &'static str) {
    let shared = &shared.services;
    if shared.phase_bell.now() != Phase::Running {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if shared.pools.stats().iter().any(|p| p.open > 0) {
        return (StatusCode::OK, "ready\n");
    }
    for db in shared.config().databases.values() {
        let plain = crate::tls::ServerTls::default();
        let reach = crate::server::stream::ServerStream::connect(&db.host, db.port, &plain);
        if matches!(tokio::time::timeout(Duration::from_secs(1), reach).await, Ok(Ok(_))) {
            return (StatusCode::OK, "ready\n");
        }
    }
    (StatusCode::SERVICE_UNAVAILABLE, "PostgreSQL unreachable\n")
}

/// Serves until the proxy stops.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Sources>, mut phase: watch::Receiver<Phase>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared);
    let stopped = async move {
        while *phase.borrow_and_update() != Phase::Stopped {
            if phase.changed().await.is_err() {
                return;
            }
        }
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        tracing::warn!(error = %e, "HTTP endpoint failed");
    }
}

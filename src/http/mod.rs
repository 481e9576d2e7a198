//! The HTTP endpoint (`[http] listen`): `/metrics` (Prometheus text), `/healthz` (the process
//! is up), `/readyz` (the listener accepts clients and PostgreSQL can be reached), the status
//! page `/` and the same as JSON at `/status.json` (for loopback, or with `[http] auth_*`).
//!
//! Beside the client session; started by the proxy when configured, stopped with it. It reads
//! the services through [`Sources`], the handles the proxy gives it.

mod auth;
mod history;
mod latency;
mod metrics;
mod page;
mod status;

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
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
    /// The last 15 minutes per identity, for the status page (sampled while serving).
    pub(crate) history: Arc<history::History>,
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
    if shared.services.phase_bell.now() != Phase::Running {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    if reach(&shared).await.reachable {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "PostgreSQL unreachable\n")
    }
}

/// Whether PostgreSQL can be reached: some pool holds a server connection, or else one of
/// the configured servers accepts a connection within a second.
async fn reach(shared: &Sources) -> status::Reach {
    let shared = &shared.services;
    if shared.pools.stats().iter().any(|p| p.open > 0) {
        return status::Reach {
            reachable: true,
            detail: "connected",
        };
    }
    for db in shared.config().databases.values() {
        let plain = crate::tls::ServerTls::default();
        let reach = crate::server::stream::ServerStream::connect(&db.host, db.port, &plain);
        if matches!(tokio::time::timeout(Duration::from_secs(1), reach).await, Ok(Ok(_))) {
            return status::Reach {
                reachable: true,
                detail: "reachable",
            };
        }
    }
    status::Reach {
        reachable: false,
        detail: "unreachable",
    }
}

/// The status now, for a caller the `[http]` auth lets in (else the refusal to send).
async fn read_status(shared: &Sources, peer: SocketAddr, headers: &HeaderMap) -> Result<status::Status, Response> {
    if let Some(refused) = auth::refusal(&shared.services.config().http_auth, peer, headers) {
        return Err(refused);
    }
    Ok(status::Status::read(shared, reach(shared).await))
}

/// `body` as `content_type`, never cached.
fn fresh(content_type: &'static str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// The status page, as HTML.
async fn page(
    State(shared): State<Arc<Sources>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match read_status(&shared, peer, &headers).await {
        Ok(s) => fresh("text/html; charset=utf-8", page::render(&s)),
        Err(refused) => refused,
    }
}

/// The status page's data, as JSON.
async fn status_json(
    State(shared): State<Arc<Sources>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match read_status(&shared, peer, &headers).await {
        Ok(s) => fresh(
            "application/json",
            serde_json::to_string(&s).unwrap_or_else(|_| "{}".into()),
        ),
        Err(refused) => refused,
    }
}

/// Serves until the proxy stops.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Sources>, mut phase: watch::Receiver<Phase>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .with_state(shared.clone());
    // The status page's sparklines: sampled while the endpoint serves.
    let sampler = tokio::spawn(async move { shared.history.run(&shared.services.admission).await });
    let stopped = async move {
        while *phase.borrow_and_update() != Phase::Stopped {
            if phase.changed().await.is_err() {
                return;
            }
        }
    };
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        tracing::warn!(error = %e, "HTTP endpoint failed");
    }
    sampler.abort();
}

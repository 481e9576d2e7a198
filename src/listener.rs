//! The listener: accepts client sockets and spawns a session task for each.
//!
//! First step of the flow. Every accepted socket gets an admission permit (or none, when
//! `max_client_connections` is reached) which moves into its task, so the slot is returned
//! when the session ends however it ends. Accept errors (such as running out of file
//! descriptors) back off instead of spinning. Stops accepting when the phase leaves Running.
//! While every pool is in session mode, sessions run on the session threads
//! ([`crate::session_threads`]), each session on one of them; otherwise on the shared runtime.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::client;
use crate::client::Services;
use crate::session_threads::SessionThreads;
use crate::shutdown::Phase;

/// Accepts until shutdown; the socket closes when this returns.
/// Sessions go to the session threads, when there are any, while every pool is in session mode.
pub(crate) async fn run(
    listener: TcpListener,
    shared: Arc<Services>,
    tracker: TaskTracker,
    mut phase: watch::Receiver<Phase>,
    threads: Option<Arc<SessionThreads>>,
) {
    let mut backoff = Duration::from_millis(1);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(1);
                    let permit = shared.admission.admit_client();
                    match &threads {
                        Some(t) if shared.config().all_session_mode() => {
                            t.spawn(&tracker, shared.clone(), stream, peer, permit);
                        }
                        _ => {
                            tracker.spawn(client::serve(shared.clone(), stream, peer, permit, false));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off {:?}", backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
            r = phase.changed() => {
                if r.is_err() || *phase.borrow() != Phase::Running {
                    tracing::info!("listener closed");
                    return;
                }
            }
        }
    }
}

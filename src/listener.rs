//! The listener: accepts client sockets and spawns a session task for each.
//!
//! First step of the flow. Every accepted socket gets an admission permit (or none, when
//! `max_client_connections` is reached) which moves into its task, so the slot is returned
//! when the session ends however it ends. Accept errors (such as running out of file
//! descriptors) back off instead of spinning. Stops accepting when the phase leaves Running,
//! or when a takeover's successor accepts on the same socket (see `takeover`).
//! Sessions run on the per-core event loops ([`crate::session_threads`]), each session on one
//! of them in turn, when there are several cores; otherwise on the shared runtime.

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
/// Sessions go to the per-core event loops, when there are any.
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
                        Some(t) => t.spawn(&tracker, shared.clone(), stream, peer, permit),
                        None => {
                            tracker.spawn(client::serve(shared.clone(), stream, peer, permit, 0));
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
            // A takeover's successor accepts on the same socket now.
            () = shared.handoff.begun() => {
                tracing::info!("listener handed over to a successor");
                return;
            }
        }
    }
}

//! The new side of a takeover: connects to the running process's control socket, takes its
//! listening sockets, then takes in the clients it sends and grows its lent budget.
//!
//! Part of `takeover` (see there for the protocol). [`connect`] runs before the proxy is
//! built (the listeners and the lent budget go into it); [`receive`] runs as one of its tasks
//! until the predecessor has exited.

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixStream};
use tokio_util::task::TaskTracker;

use super::wire::{kind, Wire};
use super::{Hello, Plan};
use crate::client::{MovedState, Services};
use crate::server::budget::{Budget, Scale};
use crate::session_threads::SessionThreads;

/// A takeover under way, before the proxy is built.
#[derive(Debug)]
pub(crate) struct Successor {
    pub wire: Wire,
    /// The clients' listening socket.
    pub listener: TcpListener,
    /// The HTTP endpoint's, when the predecessor had one.
    pub http: Option<TcpListener>,
    /// The budget the predecessor lends (None: it lends none, no cap to keep).
    pub lent: Option<Arc<Budget>>,
}

/// Connects to the control socket at `path` and takes the listening sockets.
///
/// # Errors
/// No process listens there, it refused, or its answer was not what the protocol says.
pub(crate) async fn connect(path: &Path) -> std::io::Result<Successor> {
    let stream = UnixStream::connect(path).await?;
    let mut wire = Wire::new(stream);
    super::same_user(&wire)?;
    let hello = Hello {
        pid: std::process::id(),
    };
    wire.send(kind::HELLO, &serde_json::to_vec(&hello)?, &[]).await?;
    let m = match tokio::time::timeout(Duration::from_secs(10), wire.recv()).await {
        Ok(Ok(Some(m))) if m.kind == kind::LISTENERS => m,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::other("the running process did not answer in time")),
        _ => {
            return Err(std::io::Error::other(
                "the running process refused the takeover (see its log)",
            ))
        }
    };
    let plan: Plan = serde_json::from_slice(&m.body).map_err(std::io::Error::other)?;
    let mut fds = m.fds.into_iter();
    let listener = fds
        .next()
        .ok_or_else(|| std::io::Error::other("no listening socket received"))?;
    let listener = tcp_listener(StdListener::from(listener))?;
    let http = match (plan.http, fds.next()) {
        (true, Some(fd)) => Some(tcp_listener(StdListener::from(fd))?),
        _ => None,
    };
    Ok(Successor {
        wire,
        listener,
        http,
        lent: plan.lends.then(|| Budget::lent(Scale::Server)),
    })
}

fn tcp_listener(l: StdListener) -> std::io::Result<TcpListener> {
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// What the proxy's side of [`receive`] needs.
pub(crate) struct Intake {
    pub shared: Arc<Services>,
    pub tracker: TaskTracker,
    pub threads: Option<Arc<SessionThreads>>,
    /// Set once the predecessor has exited (a later takeover may start then).
    pub settled: Arc<AtomicBool>,
}

/// Cancel requests for the predecessor queued at most (more are dropped, as a miss).
const CANCELS_QUEUED: usize = 256;

/// Says READY (the proxy accepts on the listeners now), then takes in clients and lent
/// slots, and passes the predecessor the cancel requests whose keys are not this process's
/// (its clients' still), until the predecessor closes the connection; the lent budget is
/// unlimited then.
pub(crate) async fn receive(mut wire: Wire, lent: Option<Arc<Budget>>, intake: Intake) {
    if let Err(e) = wire.send(kind::READY, &[], &[]).await {
        tracing::warn!(error = %e, "takeover: the running process left before READY");
    }
    let (tx, mut cancels) = tokio::sync::mpsc::channel(CANCELS_QUEUED);
    intake.shared.cancels.set_predecessor(Some(tx));
    let mut moved = 0u64;
    loop {
        let m = tokio::select! {
            // Cancel-safe: a message is read whole before it is returned.
            m = wire.recv() => m,
            Some((pid, secret)) = cancels.recv() => {
                let mut body = i32::to_be_bytes(pid).to_vec();
                body.extend_from_slice(&secret);
                if let Err(e) = wire.send(kind::CANCEL, &body, &[]).await {
                    tracing::warn!(error = %e, "takeover: a cancel request could not be passed to the previous process");
                }
                continue;
            }
        };
        let m = match m {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "takeover: control connection failed");
                break;
            }
        };
        match m.kind {
            kind::LEND => {
                let n = m.body.try_into().map_or(0, u32::from_be_bytes);
                for _ in 0..n {
                    if let Some(b) = &lent {
                        b.grow();
                    }
                }
            }
            kind::SESSION => {
                moved += 1;
                take_in(&intake, m.body, m.fds);
            }
            other => tracing::warn!(kind = other, "takeover: unexpected message ignored"),
        }
    }
    intake.shared.cancels.set_predecessor(None);
    if let Some(b) = &lent {
        b.unlimit();
    }
    intake.settled.store(true, Ordering::Release);
    tracing::info!(moved, "takeover complete: the previous process has exited");
}

/// Serves one moved client.
fn take_in(intake: &Intake, body: Vec<u8>, fds: Vec<std::os::fd::OwnedFd>) {
    let state: MovedState = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "takeover: a moved client's state is unreadable; closed");
            return;
        }
    };
    let Some(fd) = fds.into_iter().next() else {
        return;
    };
    let std = std::net::TcpStream::from(fd);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let shared = intake.shared.clone();
    let permit = shared.admission.admit_client();
    match &intake.threads {
        Some(t) => t.spawn_moved(&intake.tracker, shared, std, state, permit),
        None => {
            intake
                .tracker
                .spawn(crate::client::resume(shared, std, state, permit, 0));
        }
    }
}

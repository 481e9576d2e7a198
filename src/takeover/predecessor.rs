//! The running side of a takeover: serves the control socket, hands over the listening
//! sockets, lends server connection slots, and sends the clients that move.
//!
//! Part of `takeover` (see there for the protocol). Runs as one of the proxy's tasks for its
//! whole life; after a handoff it ends once the proxy has stopped and every server
//! connection of this process is closed, so the successor's lent budget stays exact until
//! the end.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::wire::{kind, Wire};
use super::{Hello, Plan};
use crate::client::{Moved, Services};
use crate::server::budget::Budget;
use crate::shutdown::Phase;

/// How long each step of the handshake may take.
const STEP: Duration = Duration::from_secs(10);
/// How often slots are lent and the sessions left are counted.
const TICK: Duration = Duration::from_millis(2);

/// What the running side needs.
pub(crate) struct Predecessor {
    pub shared: Arc<Services>,
    /// The proxy's sessions.
    pub tracker: TaskTracker,
    /// Copies of the listening sockets: the clients', then the HTTP endpoint's if any.
    pub listeners: Vec<OwnedFd>,
    /// Set once handed over and no session is left (or `shutdown_timeout` has passed).
    pub handed: watch::Sender<bool>,
    pub phase: watch::Receiver<Phase>,
    /// False while this process still runs on slots lent by its own predecessor: no second
    /// takeover until then.
    pub settled: Arc<AtomicBool>,
}

/// Duplicates of the listening sockets (the clients', then the HTTP endpoint's), to hand
/// over; none when they cannot be duplicated (no takeover then).
pub(crate) fn copies(listener: &tokio::net::TcpListener, http: Option<&tokio::net::TcpListener>) -> Vec<OwnedFd> {
    let all: std::io::Result<Vec<OwnedFd>> = std::iter::once(listener)
        .chain(http)
        .map(|l| l.as_fd().try_clone_to_owned())
        .collect();
    all.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot duplicate the listening sockets; no takeover possible");
        Vec::new()
    })
}

/// Listens on the control socket at `path` and serves it as a task (None, logged, when it
/// cannot be bound: no takeover then).
pub(crate) fn start(path: &std::path::Path, p: Predecessor) -> Option<tokio::task::JoinHandle<()>> {
    if p.listeners.is_empty() {
        return None;
    }
    match super::bind(path) {
        Ok(control) => {
            let unlink = Unlink(path.to_path_buf(), p.shared.clone());
            Some(tokio::spawn(async move {
                let _unlink = unlink;
                run(control, p).await;
            }))
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot listen on the takeover control socket; no takeover possible");
            None
        }
    }
}

/// Removes the control socket's file when the task ends (the proxy stopped, or was dropped
/// with its runtime), unless a successor took over: the file is the successor's then.
struct Unlink(std::path::PathBuf, Arc<Services>);

impl Drop for Unlink {
    fn drop(&mut self) {
        if !self.1.handoff.is_begun() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Serves the control socket until a takeover completes (then the handoff to its end) or the
/// proxy drains.
pub(crate) async fn run(control: UnixListener, mut p: Predecessor) {
    let mut wire = loop {
        let accepted = tokio::select! {
            r = control.accept() => r,
            // Draining: no takeover, and the copies of the listening sockets close with `p`
            // (else the kernel would keep queueing connections nobody accepts).
            _ = p.phase.wait_for(|ph| *ph != Phase::Running) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let mut wire = Wire::new(stream);
        match handshake(&p, &mut wire).await {
            Ok(()) => break wire,
            Err(e) => tracing::warn!(error = %e, "takeover refused"),
        }
    };
    drop(control);
    hand_off(&mut p, &mut wire).await;
}

/// HELLO, the sockets, READY.
async fn handshake(p: &Predecessor, wire: &mut Wire) -> std::io::Result<()> {
    super::same_user(wire)?;
    let hello = recv(wire, kind::HELLO).await?;
    let hello: Hello = serde_json::from_slice(&hello).map_err(std::io::Error::other)?;
    if !p.settled.load(Ordering::Acquire) {
        return Err(std::io::Error::other("this process is itself still taking over"));
    }
    if *p.phase.borrow() != Phase::Running {
        return Err(std::io::Error::other("this process is shutting down"));
    }
    let lends = lends(&p.shared);
    let plan = Plan {
        http: p.listeners.len() > 1,
        lends,
    };
    let fds: Vec<BorrowedFd<'_>> = p.listeners.iter().map(|f| f.as_fd()).collect();
    wire.send(kind::LISTENERS, &serde_json::to_vec(&plan)?, &fds).await?;
    recv(wire, kind::READY).await?;
    tracing::info!(
        successor = hello.pid,
        "takeover: the successor accepts clients now; handing over"
    );
    Ok(())
}

/// Whether this process lends slots: `max_server_connections` is set and no `[cluster]`.
fn lends(shared: &Services) -> bool {
    shared.pools.cluster().is_none() && shared.pools.budgets().server().usage().max > 0
}

/// The body of the next message, which must be of `want` kind, within [`STEP`].
async fn recv(wire: &mut Wire, want: u8) -> std::io::Result<Vec<u8>> {
    match tokio::time::timeout(STEP, wire.recv()).await {
        Ok(Ok(Some(m))) if m.kind == want => Ok(m.body),
        Ok(Ok(Some(m))) => Err(std::io::Error::other(format!("unexpected message {}", m.kind))),
        Ok(Ok(None)) => Err(std::io::Error::other("the successor left")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("the successor did not answer in time")),
    }
}

/// After the handshake: sessions move, slots are lent, until this process has stopped and
/// holds no server connection.
async fn hand_off(p: &mut Predecessor, wire: &mut Wire) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    p.shared.handoff.begin(tx, &p.shared.phase_bell);
    // The successor has its own copies.
    p.listeners.clear();
    let server = p.shared.pools.budgets().server().clone();
    let lends = lends(&p.shared);
    let window = Instant::now() + p.shared.config().proxy.shutdown_timeout;
    let mut tick = tokio::time::interval(TICK);
    let mut broken = false;
    let mut moved = 0u64;
    loop {
        tokio::select! {
            // Cancel-safe: a message is read whole before it is returned.
            m = wire.recv(), if !broken => match m {
                Ok(Some(m)) if m.kind == kind::CANCEL => cancel(&p.shared, m.body),
                Ok(Some(m)) => tracing::warn!(kind = m.kind, "takeover: unexpected message ignored"),
                Ok(None) | Err(_) => broken = true,
            },
            Some(m) = rx.recv() => {
                let r = send_session(wire, m, broken).await;
                broken |= r.is_err();
                moved += 1;
            }
            _ = tick.tick() => {
                if lends && !broken && lend(&server, wire).await.is_err() {
                    broken = true;
                }
                if (p.tracker.is_empty() || Instant::now() >= window) && !*p.handed.borrow() {
                    tracing::info!(moved, left = p.tracker.len(), "takeover: handed over");
                    let _ = p.handed.send(true);
                }
                if *p.phase.borrow() == Phase::Stopped && server.usage().used == 0 {
                    return;
                }
            }
        }
    }
}

/// A cancel request the successor received for a key of this process's (one of the clients
/// still served here), or a forged one: looked up here only, never passed on.
fn cancel(shared: &Arc<Services>, body: Vec<u8>) {
    if body.len() < 8 {
        return;
    }
    let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let cancels = shared.cancels.clone();
    tokio::spawn(async move {
        cancels.cancel(pid, &body[4..]).await;
    });
}

/// Sends one session (a failure gives the socket back to it, to go on here).
async fn send_session(wire: &Wire, m: Moved, broken: bool) -> std::io::Result<()> {
    let Moved { fd, state, sent } = m;
    let r = match (broken, serde_json::to_vec(&state)) {
        (true, _) => Err(std::io::Error::other("the control connection failed")),
        (false, Ok(body)) => wire.send(kind::SESSION, &body, &[fd.as_fd()]).await,
        (false, Err(e)) => Err(std::io::Error::other(e)),
    };
    match r {
        Ok(()) => {
            let _ = sent.send(Ok(()));
            Ok(())
        }
        Err(e) => {
            if !broken {
                tracing::warn!(error = %e, "takeover: a client could not be moved; it stays here");
            }
            let _ = sent.send(Err(fd));
            Err(e)
        }
    }
}

/// Closes idle server connections while no session here waits for one, and lends the free
/// slots to the successor but one.
async fn lend(server: &Arc<Budget>, wire: &Wire) -> std::io::Result<()> {
    if server.waiting() == 0 {
        while server.close_idle() {}
    }
    // One slot beyond pgvalve's own connections (the lock monitor's) stays, so a session
    // still served here (logging in, or a TLS client's last request) gets a connection.
    let n = server.lend_free(server.usage().own + 1);
    if n > 0 {
        wire.send(kind::LEND, &(n as u32).to_be_bytes(), &[]).await?;
    }
    Ok(())
}

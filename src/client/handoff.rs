//! Moving transaction-mode clients to a takeover's successor, and taking them in there.
//!
//! Part of the client session; the control socket and the file descriptor passing are the
//! `takeover` module's (a layer up), which drains [`Handoff`]'s queue. Once a handoff has
//! begun ([`Handoff::begin`]), a transaction-mode session at its next idle moment (between
//! transactions, holding no server connection) that can move, a plaintext one that listens
//! to no channel, gives up its socket with its state ([`Moved`]): identity facts, startup
//! parameters, cancel key, tracked parameters, prepared statement names and definitions,
//! and the bytes it read but did not handle yet. A session that cannot move (TLS: the TLS
//! state stays in this process; LISTEN) ends there instead, with 57P01 as at shutdown.
//! The successor takes each one in with [`resume`]: a member of its identity again (no new
//! login), a seat, the same cancel key, and its next transaction served there.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

use super::conn::{ClientConn, ClientStream};
use super::params::Reported;
use super::relay::Mode;
use super::{Services, TxnSession};
use crate::admission::ClientPermit;
use crate::cancel::CancelKey;
use crate::protocol::startup::StartupParams;
use crate::shutdown::PhaseBell;

/// What a moved session carries besides its socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedState {
    /// The client's address (as identity rules saw it: the PROXY header's, if any).
    pub peer: SocketAddr,
    /// Protocol minor version.
    pub minor: u16,
    /// Startup parameters (user, database, application_name ...).
    pub params: Vec<(String, String)>,
    /// The cancel key the client was given.
    pub pid: i32,
    /// Its secret.
    pub secret: Vec<u8>,
    /// Tracked parameters the client set (SET search_path ...).
    pub reported: Vec<(String, String)>,
    /// Prepared statements: client name, definition.
    pub statements: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes the client sent that were not handled yet.
    pub pending: Vec<u8>,
}

/// A session on its way out: the socket, its state, and where to say whether it left (the
/// socket back when it could not be sent).
#[derive(Debug)]
pub struct Moved {
    /// The client socket.
    pub fd: OwnedFd,
    /// Its session.
    pub state: MovedState,
    /// Ok once sent; the socket back otherwise.
    pub sent: oneshot::Sender<Result<(), OwnedFd>>,
}

/// A proxy's handoff to a successor (see the module doc); idle until begun.
#[derive(Debug, Default)]
pub struct Handoff {
    begun: AtomicBool,
    bell: Notify,
    queue: Mutex<Option<mpsc::UnboundedSender<Moved>>>,
}

impl Handoff {
    /// Sessions move from now on, into `queue` (idle ones are woken through the phase
    /// `bell`, which each follows already); the listener stops accepting.
    pub(crate) fn begin(&self, queue: mpsc::UnboundedSender<Moved>, bell: &PhaseBell) {
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = Some(queue);
        self.begun.store(true, Ordering::SeqCst);
        self.bell.notify_waiters();
        bell.nudge();
    }

    /// Whether a handoff has begun.
    pub(crate) fn is_begun(&self) -> bool {
        self.begun.load(Ordering::SeqCst)
    }

    /// Resolves once a handoff has begun (the listener waits so; an idle session follows the
    /// phase bell instead, which costs it no shared lock per wait). Cancel-safe.
    pub(crate) async fn begun(&self) {
        loop {
            let rung = self.bell.notified();
            tokio::pin!(rung);
            rung.as_mut().enable();
            if self.is_begun() {
                return;
            }
            rung.await;
        }
    }

    fn queue(&self) -> Option<mpsc::UnboundedSender<Moved>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Whether an idle transaction-mode session can move (see the module doc).
pub(super) fn movable(client: &ClientConn, mode: &Mode, listening: bool) -> bool {
    matches!(client.stream, ClientStream::Tcp(_)) && !listening && mode.pinned.is_none() && client.wbuf.is_empty()
}

/// Sends an idle session to the successor: true when it left (the session ends here without
/// a word to the client), false when it could not (it goes on here).
pub(super) async fn hand_over(
    shared: &Services,
    client: &mut ClientConn,
    (key, p, mode): (&CancelKey, &StartupParams, &Mode),
    reported: &Reported,
) -> bool {
    let Some(queue) = shared.handoff.queue() else {
        return false;
    };
    let ClientStream::Tcp(tcp) = std::mem::replace(&mut client.stream, ClientStream::Closed) else {
        return false;
    };
    let std = match tcp.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot detach a client socket to move it; closed");
            return false;
        }
    };
    let state = MovedState {
        peer: client.peer,
        minor: p.minor,
        params: p.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        pid: key.pid,
        secret: key.secret.as_bytes().to_vec(),
        reported: reported.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        statements: mode.statements.as_ref().map(|s| s.export()).unwrap_or_default(),
        pending: client.rbuf.to_vec(),
    };
    let (sent, answer) = oneshot::channel();
    let fd = OwnedFd::from(std);
    let back = match queue.send(Moved { fd, state, sent }) {
        Ok(()) => match answer.await {
            Ok(Ok(())) => return true,
            Ok(Err(fd)) => fd,
            Err(_) => return true, // dropped with the socket: nothing to go on with
        },
        Err(mpsc::error::SendError(m)) => m.fd,
    };
    match TcpStream::from_std(std::net::TcpStream::from(back)) {
        Ok(s) => {
            client.stream = ClientStream::Tcp(s);
            false
        }
        Err(_) => true,
    }
}

/// Serves a client moved here from a takeover's predecessor, on core `core` (see the module
/// doc), its socket registered with this event loop first. A client whose database or user
/// is no longer routed, or routed in session mode, is told so and closed.
pub(crate) fn resume(
    shared: Arc<Services>,
    std: std::net::TcpStream,
    moved: MovedState,
    permit: Option<ClientPermit>,
    core: usize,
) -> impl std::future::Future<Output = ()> + Send {
    resume_arrived(Box::new(Arrived {
        shared,
        std,
        moved,
        permit,
        core,
    }))
}

/// A moved client before its session: boxed, so that the task serving it keeps a pointer
/// through every await, not the moved state (as `client::entry::Accepted`).
struct Arrived {
    shared: Arc<Services>,
    std: std::net::TcpStream,
    moved: MovedState,
    permit: Option<ClientPermit>,
    core: usize,
}

async fn resume_arrived(a: Box<Arrived>) {
    // Boxed: the setting up is freed once the session runs.
    let Some((shared, mut client, mut t, reported)) = Box::pin(settle(a)).await else {
        return;
    };
    super::serve_txn(&shared, &mut client, &mut t, reported).await;
}

/// The moved client's connection and session, ready for its next transaction (None: closed).
async fn settle(a: Box<Arrived>) -> Option<(Arc<Services>, ClientConn, Box<TxnSession>, Reported)> {
    let Arrived {
        shared,
        std,
        moved,
        permit,
        core,
    } = *a;
    let stream = super::entry::registered(std, moved.peer)?;
    let _ = stream.set_nodelay(true);
    let mut client = ClientConn::new(stream, moved.peer);
    client.stash = Some(shared.read_buffers.of(core));
    client.rbuf.extend_from_slice(&moved.pending);
    let p = StartupParams {
        minor: moved.minor,
        params: moved.params.into_iter().collect(),
    };
    let route = shared.config().route(p.database(), p.user());
    let route = match route {
        Some(r) if r.pool_mode == crate::config::PoolMode::Transaction => r,
        _ => {
            let e = super::SessionError::UnknownDatabase(p.database().to_string());
            super::ended(&mut client, &tracing::Span::none(), e).await;
            return None;
        }
    };
    let Some(key) = shared.cancels.adopt(moved.pid, &moved.secret) else {
        tracing::warn!(pid = moved.pid, "a moved client's cancel key is taken here; closed");
        return None;
    };
    let member = shared.admission.rejoin(&super::client_facts(&client, &p));
    let seat = super::seat(&shared, &client, &p, member, route, core);
    let mut mode = super::session_mode(&shared, &client, &seat, &p, &key);
    if let Some(st) = mode.statements.as_mut() {
        st.import(moved.statements);
    }
    let t = Box::new(TxnSession {
        key,
        params: p,
        seat,
        mode,
        _permit: permit,
    });
    let reported: Reported = moved.reported.into_iter().collect();
    Some((shared, client, t, reported))
}

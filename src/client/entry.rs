//! Where a client connection's session begins and ends: the task the listener (or a session
//! thread) spawns per accepted socket, the login, the transaction-mode session to its end,
//! and the last word to the client.
//!
//! Part of the client session (see the module docs of `client`); an idle transaction-mode
//! client's memory is mostly this task, so it keeps as little as it can between
//! transactions.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{params, proxied, session, txn, ClientConn, Services, SessionError, TxnSession};
use crate::admission::ClientPermit;

/// Serves one client connection to its end, on core `core`'s event loop (see the listener):
/// its server connections come from that core's part of its pool. A socket accepted on
/// another thread is registered with this event loop first (one that cannot be is closed).
pub(crate) fn serve(
    shared: Arc<Services>,
    socket: impl Into<Socket>,
    peer: SocketAddr,
    permit: Option<ClientPermit>,
    core: usize,
) -> impl std::future::Future<Output = ()> + Send {
    serve_accepted(Box::new(Accepted {
        shared,
        socket: socket.into(),
        peer,
        permit,
        core,
    }))
}

/// An accepted client connection, before its session: boxed, so the session's task keeps a
/// pointer to it through every await, not its fields (an async fn keeps room for its
/// arguments for as long as it runs, and an idle client's task is most of its memory).
struct Accepted {
    shared: Arc<Services>,
    socket: Socket,
    peer: SocketAddr,
    permit: Option<ClientPermit>,
    core: usize,
}

/// A client socket as accepted: on this event loop, or to be registered with it.
pub(crate) enum Socket {
    Here(TcpStream),
    Moved(std::net::TcpStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Self {
        Socket::Here(s)
    }
}

impl From<std::net::TcpStream> for Socket {
    fn from(s: std::net::TcpStream) -> Self {
        Socket::Moved(s)
    }
}

async fn serve_accepted(a: Box<Accepted>) {
    // The login (and a session-mode session) is boxed: it is freed once a transaction-mode
    // client is logged in, so an idle client's task holds only what it needs between
    // transactions.
    let Some((shared, mut client, mut t)) = Box::pin(log_in(a)).await else {
        return;
    };
    serve_txn(&shared, &mut client, &mut t, params::Reported::new()).await;
}

/// Logs the client in (and serves a session-mode session to its end): its connection and
/// session when it is a transaction-mode client ready for its first transaction, None when
/// the session is over.
async fn log_in(a: Box<Accepted>) -> Option<(Arc<Services>, ClientConn, Box<TxnSession>)> {
    let Accepted {
        shared,
        socket,
        peer,
        permit,
        core,
    } = *a;
    let mut stream = match socket {
        Socket::Here(s) => s,
        Socket::Moved(std) => registered(std, peer)?,
    };
    let _ = stream.set_nodelay(true);
    let peer = real_peer(&shared, &mut stream, peer).await?;
    let mut client = ClientConn::new(stream, peer);
    client.stash = Some(shared.read_buffers.of(core));
    let span = tracing::info_span!(
        "client",
        addr = %peer,
        user = tracing::field::Empty,
        db = tracing::field::Empty,
        identity = tracing::field::Empty
    );
    // Between transactions the session keeps no tracing span (a span costs memory per client
    // while it lives); an error at the end is logged in a span made again from the seat.
    match session(&shared, &mut client, permit, &span, core).await {
        Ok(Some(t)) => Some((shared, client, t)),
        Ok(None) => None,
        Err(e) => {
            ended(&mut client, &span, e).await;
            None
        }
    }
}

/// A client socket accepted on another thread (or by a takeover's predecessor), registered
/// with this event loop; None, logged, when it cannot be (the socket is closed).
pub(super) fn registered(std: std::net::TcpStream, peer: SocketAddr) -> Option<TcpStream> {
    match TcpStream::from_std(std) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, %peer, "cannot register a client socket with its event loop; closed");
            None
        }
    }
}

/// Serves a logged-in transaction-mode client (with the tracked parameters it `reported`
/// so far) to its end.
pub(super) async fn serve_txn(
    shared: &Arc<Services>,
    client: &mut ClientConn,
    t: &mut TxnSession,
    reported: params::Reported,
) {
    let Err(e) = txn::serve(shared, client, t, reported).await else {
        return;
    };
    Box::pin(ended_txn(client, t, e)).await;
}

/// Ends a transaction-mode session with `e`, logged in a span made again from its seat.
async fn ended_txn(client: &mut ClientConn, t: &TxnSession, e: SessionError) {
    let route = &t.seat.route;
    let span = tracing::info_span!(
        "client",
        addr = %client.peer,
        user = %route.user,
        db = %route.database,
        identity = %t.seat.member.identity()
    );
    ended(client, &span, e).await;
}

/// The client's address: the socket's, or behind a trusted load balancer the one its PROXY
/// header carries (None: the header was refused, logged, and the connection is to be closed).
async fn real_peer(shared: &Services, stream: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let timeout = {
        let c = shared.config();
        let trusted = &c.proxy.proxy_protocol_trusted;
        (!trusted.is_empty() && trusted.contains(peer.ip())).then_some(c.proxy.client_login_timeout)
    };
    let Some(timeout) = timeout else {
        return Some(peer);
    };
    match proxied::client_addr(stream, peer, timeout).await {
        Ok(addr) => Some(addr),
        Err(e) => {
            tracing::info_span!("client", addr = %peer).in_scope(|| e.log());
            None
        }
    }
}

/// Logs why a session ended and tells the client, if it is still there.
pub(super) async fn ended(client: &mut ClientConn, span: &tracing::Span, e: SessionError) {
    span.in_scope(|| e.log());
    if let Some(pg) = e.client_error() {
        client.send_error(&pg).await;
    }
}

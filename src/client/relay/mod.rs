//! The relay: bytes between a client and its server connection, in both directions at once.
//!
//! Last stage of a client session. One loop per session, no extra tasks: it reads whichever
//! side has data, walks message headers ([`MessageWalker`]) and writes what is ready to the
//! other side, so a large DataRow or COPY stream passes in pieces and neither direction can
//! block the other. Only headers are looked at, plus the one-byte body of ReadyForQuery, and
//! in transaction mode the text of Query and Parse (to pin sessions that change session
//! state). What it tracks decides whether the server connection can be reused afterwards.

use bytes::{Buf, BytesMut};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::conn::{ClientConn, ClientStream};
use super::prepared::{ClientStatements, OnServer, Outputs, Responses, ServerStatements};
use super::sql::session_state_change;
use super::SessionError;
use crate::error::{sqlstate, PgError};
use crate::pool::stats::Totals;
use crate::protocol::frame::{split_frame, MessageWalker, Seen, Walk};
use crate::server::stream::TryWrite;
use crate::server::{ServerConn, ServerStream};
use crate::shutdown::{Phase, PhaseWatch};
use crate::tls::Locked;

#[doc(hidden)]
pub mod exercise;
mod timeouts;
mod tracker;
mod txn;
mod write;

pub use timeouts::Timeouts;
use timeouts::{expired, Clocks};
use tracker::Tracker;
use txn::{client_frames, note_pin, server_messages};
use write::{consumed, drain, ensure_space, forward, move_ready, send, write_now};

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Free space ensured before each read.
const READ_RESERVE: usize = 16 * 1024;
/// Largest server message: PostgreSQL's own limit on a field is 1 GB.
const MAX_SERVER_MESSAGE: usize = (1 << 30) + (64 << 20);

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent Terminate or closed its socket.
    ClientDone,
    /// The server connection failed; the client was told.
    ServerGone,
    /// Shutdown; the client was told (57P01).
    Shutdown,
    /// Transaction mode: a transaction ended and nothing is outstanding; the server
    /// connection is idle and clean and can go back to the pool.
    Idle,
    /// idle_transaction_timeout or transaction_timeout ended the session; the client was told.
    TimedOut,
}

/// How the relay treats a session.
#[derive(Debug, Default)]
pub struct Mode {
    /// Transaction pooling: end with [`RelayEnd::Idle`] after each transaction (unless
    /// pinned), and look inside Query and Parse for statements that pin.
    pub transaction: bool,
    /// Why the session is tied to its server connection until it ends (transaction mode).
    pub pinned: Option<&'static str>,
    /// Who the client is, for the log line when it gets pinned.
    pub who: String,
    /// Counts pins.
    pub pins: std::sync::Arc<crate::sessions::Pins>,
    /// query_timeout, idle_transaction_timeout, transaction_timeout.
    pub timeouts: Timeouts,
    /// Where to send a cancel when a query runs past query_timeout.
    pub cancel: Option<crate::cancel::CancelTarget>,
    /// Transaction mode: make statements that change session state fail instead of pinning.
    pub reject: bool,
    /// Transaction mode: tracked parameters the server reported changed (ParameterStatus),
    /// collected for the session to re-apply on later server connections.
    pub reported: Vec<(String, String)>,
    /// Transaction mode with `max_prepared_statements` > 0: the client's statements, renamed
    /// for the server (named statements then do not pin).
    pub statements: Option<ClientStatements>,
    /// The session in the registry: told when a transaction ends (for the lock monitor), the
    /// source of cancel explanations, and of verdicts (the lock monitor's, KILL_CLIENT): one
    /// delivered ends the relay with its error, closing the server connection.
    pub session: Option<std::sync::Arc<crate::sessions::SessionInfo>>,
    /// The session's tally of transactions, queries and bytes for its pool's SHOW STATS.
    pub stats: Option<crate::pool::stats::Local>,
    /// Buffers kept from one transaction's relay to the next (see `Reuse`).
    pub reuse: Reuse,
}

/// What statement tracking allocates in every relay, kept between transactions while small:
/// the buffer renamed client messages are written to, and the queue of expected answers.
#[derive(Debug, Default)]
pub struct Reuse {
    scratch: BytesMut,
    responses: Responses,
}

/// Largest scratch buffer kept between transactions (an idle client holds it).
const REUSE_MAX: usize = 4096;

/// The lock monitor cancelled this session's query: replaces the first whole "query
/// canceled" ErrorResponse (57014) in `s_in` after the first `skip` bytes (the rest of a
/// message already forwarded) with the monitor's explanation. Runs only while one waits.
fn explain_cancel(s_in: &mut BytesMut, skip: usize, session: &crate::sessions::SessionInfo) {
    let mut pos = skip.min(s_in.len());
    while let Ok(Some((tag, total))) = crate::protocol::frame::peek_header(&s_in[pos..], MAX_SERVER_MESSAGE) {
        if s_in.len() - pos < total {
            return;
        }
        let frame = crate::protocol::frame::Frame {
            tag,
            bytes: BytesMut::from(&s_in[pos..pos + total]),
        };
        if tag == b'E'
            && crate::protocol::messages::parse_server_error(&frame).is_some_and(|e| e.code == sqlstate::QUERY_CANCELED)
        {
            if let Some(e) = session.take_cancel_note() {
                let tail = s_in.split_off(pos + total);
                s_in.truncate(pos);
                crate::protocol::messages::error_response(&e, s_in);
                s_in.unsplit(tail);
            }
            return;
        }
        pos += total;
    }
}

/// Relays between `client` and `server` with cancel requests pointed at `server` meanwhile
/// (see [`run`]); the cancel key points nowhere again on return.
pub async fn run_attached(
    client: &mut ClientConn,
    server: &mut ServerConn,
    key: &crate::cancel::CancelKey,
    phase: &mut PhaseWatch,
    max_client_message: usize,
    mode: &mut Mode,
) -> Result<RelayEnd, SessionError> {
    let target = crate::cancel::CancelTarget {
        addr: server.addr.clone(),
        pid: server.pid,
        secret: server.secret,
    };
    mode.cancel = Some(target.clone());
    key.set_target(Some(target)).await;
    let end = run(client, server, phase, max_client_message, mode).await;
    key.set_target(None).await;
    end
}

/// Relays until one side ends or shutdown says so. On return `server.status`, `server.rbuf`
/// and `server.broken` say whether the server connection may be reused.
///
/// Per round trip the loop waits twice (client readable, server readable): what is read is
/// written to the other side at once when the socket takes it, and only waits otherwise.
///
/// # Errors
/// [`SessionError`] for a client protocol violation (the caller tells the client).
pub async fn run(
    client: &mut ClientConn,
    server: &mut ServerConn,
    phase: &mut PhaseWatch,
    max_client_message: usize,
    mode: &mut Mode,
) -> Result<RelayEnd, SessionError> {
    let c_in = std::mem::take(&mut client.rbuf);
    let s_in = std::mem::take(&mut server.rbuf);
    let mut state = Relayed {
        timeout_error: None,
        prepared: std::mem::take(&mut server.prepared),
        status: server.status,
        server_broken: false,
        c_in,
        s_in,
        last_server_tag: 0,
        s_out: BytesMut::new(),
        recover: None,
    };
    let end = match &mut client.stream {
        ClientStream::Tcp(c) => {
            let halves = c.split();
            server_side(halves, &mut server.stream, &mut state, phase, max_client_message, mode).await
        }
        ClientStream::Tls(c) => {
            let lock = std::sync::Mutex::new(&mut **c);
            let halves = (Locked(&lock), Locked(&lock));
            server_side(halves, &mut server.stream, &mut state, phase, max_client_message, mode).await
        }
        ClientStream::Closed => Ok(RelayEnd::ClientDone),
    };
    server.status = state.status;
    server.prepared = std::mem::take(&mut state.prepared);
    server.broken |= state.server_broken;
    server.recover = state.recover.take();
    server.rbuf = state.s_in;
    client.rbuf = state.c_in;
    match end {
        Ok(RelayEnd::ServerGone) => {
            client.write_out(&state.s_out).await;
            if state.last_server_tag != b'E' {
                client
                    .send_error(&PgError::fatal(
                        sqlstate::CONNECTION_FAILURE,
                        "pgvalve: server closed the connection unexpectedly",
                    ))
                    .await;
            }
        }
        Ok(RelayEnd::TimedOut) => {
            client.write_out(&state.s_out).await;
            if let Some(e) = &state.timeout_error {
                client.send_error(e).await;
            }
        }
        Ok(RelayEnd::Shutdown) => {
            client.write_out(&state.s_out).await;
            client
                .send_error(
                    &PgError::fatal(
                        sqlstate::ADMIN_SHUTDOWN,
                        "terminating connection due to administrator command",
                    )
                    .with_detail("pgvalve is shutting down"),
                )
                .await;
        }
        _ => {}
    }
    end
}

/// The relay with the client's halves and the server stream split to match.
async fn server_side<CR, CW>(
    client: (CR, CW),
    server: &mut ServerStream,
    state: &mut Relayed,
    phase: &mut PhaseWatch,
    max_client_message: usize,
    mode: &mut Mode,
) -> Result<RelayEnd, SessionError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + TryWrite + Unpin,
{
    match server {
        ServerStream::Tcp(s) => relay(client, s.split(), state, phase, max_client_message, mode).await,
        ServerStream::Unix(s) => relay(client, s.split(), state, phase, max_client_message, mode).await,
        ServerStream::Tls(s) => {
            let lock = std::sync::Mutex::new(&mut **s);
            let halves = (Locked(&lock), Locked(&lock));
            relay(client, halves, state, phase, max_client_message, mode).await
        }
    }
}

/// What the relay hands back to [`run`].
struct Relayed {
    /// ReadyForQuery status, or `?` when the server connection's state is unknown.
    status: u8,
    /// The server connection failed.
    server_broken: bool,
    /// Unforwarded client bytes.
    c_in: BytesMut,
    /// Unforwarded server bytes.
    s_in: BytesMut,
    /// Server bytes read but not yet written to the client.
    s_out: BytesMut,
    /// Type of the last message from the server.
    last_server_tag: u8,
    /// The server connection's prepared statements (moved in and out).
    prepared: ServerStatements,
    /// What to tell the client when a timeout ended the session.
    timeout_error: Option<PgError>,
    /// How the server connection could be brought back to idle if the client is gone.
    recover: Option<crate::server::Recover>,
}

async fn relay<CR, CW, SR, SW>(
    (mut cr, mut cw): (CR, CW),
    (mut sr, mut sw): (SR, SW),
    out: &mut Relayed,
    phase: &mut PhaseWatch,
    max_client_message: usize,
    mode: &mut Mode,
) -> Result<RelayEnd, SessionError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + TryWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + TryWrite + Unpin,
{
    let mut c_in = std::mem::take(&mut out.c_in);
    let mut s_in = std::mem::take(&mut out.s_in);
    let mut t = Tracker::new(
        out.status,
        mode.transaction && mode.pinned.is_none(),
        mode.pinned,
        mode.statements.is_none(),
    );
    t.tally.server_assignments = 1;
    let mut responses = std::mem::take(&mut mode.reuse.responses);
    let mut scratch = std::mem::take(&mut mode.reuse.scratch);
    let mut prepared = std::mem::take(&mut out.prepared);
    let (mut c_out, mut s_out) = (BytesMut::new(), BytesMut::new());
    let mut cwalk = MessageWalker::new(max_client_message);
    let mut swalk = MessageWalker::new(MAX_SERVER_MESSAGE);
    let (mut c_new, mut s_new) = (!c_in.is_empty(), !s_in.is_empty());
    let mut now = phase.now();
    let mut clocks = Clocks::default();
    let mut armed: Option<Instant> = None;
    // A timer only when a timeout is configured (none by default).
    let mut timer = mode
        .timeouts
        .any()
        .then(|| Box::pin(tokio::time::sleep(Duration::from_secs(365 * 86400))));
    let listening = mode.session.is_some();
    let session = mode.session.clone();
    let mut verdict = std::pin::pin!(async move {
        match &session {
            Some(s) => s.verdict.wait().await,
            None => std::future::pending().await,
        }
    });

    let end: Result<RelayEnd, SessionError> = loop {
        let client_sent = c_new;
        if c_new {
            c_new = false;
            if let Some(st) = mode.statements.as_mut() {
                let mut outs = Outputs {
                    server: &mut scratch,
                    client: &mut s_out,
                    responses: &mut responses,
                    conn: &mut prepared,
                };
                if let Err(e) = client_frames(&mut c_in, max_client_message, &mut t, st, &mut outs, mode.reject) {
                    break Err(e);
                }
                note_pin(&t, mode);
                if send(&mut scratch, &mut c_out, &sw).is_err() {
                    out.server_broken = true;
                    break Ok(RelayEnd::ServerGone);
                }
                if write_now(&cw, &mut s_out).is_err() {
                    break Ok(RelayEnd::ClientDone);
                }
            } else {
                let n = match t.scan_client(&mut cwalk, &c_in) {
                    Ok(n) => n,
                    Err(e) => break Err(SessionError::Frame(e)),
                };
                note_pin(&t, mode);
                if forward(&mut c_in, n, &mut c_out, &sw).is_err() {
                    out.server_broken = true;
                    break Ok(RelayEnd::ServerGone);
                }
            }
        }
        // While a cancel explanation waits (one atomic load per server read), the monitor's
        // explanation replaces the server's "query canceled", and ErrorResponses are held back
        // until whole.
        let explain = s_new && mode.session.as_ref().is_some_and(|s| s.cancel_pending());
        if let Some(s) = mode.session.as_ref().filter(|_| explain) {
            explain_cancel(&mut s_in, swalk.pending(), s);
        }
        if s_new && mode.statements.is_some() {
            s_new = false;
            match server_messages(
                &mut s_in,
                &mut s_out,
                &mut swalk,
                &mut t,
                &mut responses,
                &mut prepared,
                &mut mode.reported,
            ) {
                Ok(()) => {}
                Err(e) => {
                    out.server_broken = true;
                    break Err(e);
                }
            }
            if write_now(&cw, &mut s_out).is_err() {
                break Ok(RelayEnd::ClientDone);
            }
        }
        if s_new {
            s_new = false;
            let reported = mode.transaction.then_some(&mut mode.reported);
            let n = match t.scan_server(&mut swalk, &s_in, reported, explain) {
                Ok(n) => n,
                Err(e) => {
                    out.server_broken = true;
                    break Err(SessionError::ServerProtocol(e));
                }
            };
            if forward(&mut s_in, n, &mut s_out, &cw).is_err() {
                break Ok(RelayEnd::ClientDone);
            }
        }
        if t.ends > 0 {
            if let Some(s) = &mode.session {
                s.transactions_ended(t.ends);
            }
            t.ends = 0;
            if let Some(l) = mode.stats.as_mut() {
                l.add(&t.tally, t.answered_at.unwrap_or_else(Instant::now));
                t.tally = Totals::default();
            }
        }
        if responses.ignored_syncs > 0 {
            t.pending = t.pending.saturating_sub(responses.ignored_syncs);
            responses.ignored_syncs = 0;
        }
        if t.terminate && c_out.is_empty() {
            break Ok(RelayEnd::ClientDone);
        }
        if mode.timeouts.any() {
            clocks.update(&t, client_sent);
            let due = clocks.deadline(&mode.timeouts);
            if due != armed {
                armed = due;
                if let (Some(d), Some(timer)) = (due, timer.as_mut()) {
                    timer.as_mut().reset(d.into());
                }
            }
        }
        let release_after_transaction = mode.transaction && t.pin.is_none();
        if now != Phase::Running || release_after_transaction {
            let at_rest = t.pending == 0
                && !t.unsynced
                && t.status == b'I'
                && s_out.is_empty()
                && s_in.is_empty()
                && c_in.is_empty()
                && c_out.is_empty()
                && swalk.at_boundary()
                && cwalk.at_boundary()
                // The server waits for COPY data (the Syncs it ignores meanwhile do not count).
                && !t.copy
                // TLS records still held in a stream (never over plain sockets).
                && !cw.backlog()
                && !sw.backlog();
            if now == Phase::Stopped || (now == Phase::Draining && at_rest) {
                break Ok(RelayEnd::Shutdown);
            }
            if release_after_transaction && at_rest {
                break Ok(RelayEnd::Idle);
            }
        }
        ensure_space(&mut c_in);
        ensure_space(&mut s_in);
        // TLS records written into a stream whose socket was full (never over plain sockets).
        let (client_backlog, server_backlog) = (s_out.is_empty() && cw.backlog(), c_out.is_empty() && sw.backlog());
        tokio::select! {
            // Shutdown first, so a session that streams without pause still sees it.
            biased;
            p = phase.changed(), if now != Phase::Stopped => now = p,
            () = async { if let Some(t) = timer.as_mut() { t.await } }, if armed.is_some() => {
                armed = None;
                if let Some(e) = expired(&mut clocks, mode) {
                    out.timeout_error = Some(e);
                    break Ok(RelayEnd::TimedOut);
                }
            },
            e = &mut verdict, if listening => {
                out.timeout_error = Some(e);
                break Ok(RelayEnd::TimedOut);
            },
            r = cr.read_buf(&mut c_in), if !t.terminate && c_out.len() < HIGH_WATER => match r {
                Ok(n) if n > 0 => {
                    c_new = true;
                    t.tally.received += n as u64;
                }
                _ => break Ok(RelayEnd::ClientDone),
            },
            r = sr.read_buf(&mut s_in), if s_out.len() < HIGH_WATER => match r {
                Ok(n) if n > 0 => {
                    s_new = true;
                    t.tally.sent += n as u64;
                }
                _ => { out.server_broken = true; break Ok(RelayEnd::ServerGone) }
            },
            r = drain(&mut sw, &c_out), if !c_out.is_empty() || server_backlog => match r {
                Ok(n) => consumed(&mut c_out, n),
                Err(()) => { out.server_broken = true; break Ok(RelayEnd::ServerGone) }
            },
            r = drain(&mut cw, &s_out), if !s_out.is_empty() || client_backlog => match r {
                Ok(n) => consumed(&mut s_out, n),
                Err(()) => break Ok(RelayEnd::ClientDone),
            },
        }
    };

    // Whole requests went to the server and whole answers came back: what is still due is
    // known, so a connection whose client left can be brought back to idle (transaction mode).
    // Its state is known outright ('?' otherwise) when nothing is due and nothing unforwarded.
    // (Renamed client messages not yet sent, after a protocol error, count as unsent.)
    let framed =
        !t.unsynced && !t.copy && swalk.at_boundary() && cwalk.at_boundary() && c_out.is_empty() && scratch.is_empty();
    let clean = framed && t.pending == 0 && s_out.is_empty() && s_in.is_empty();
    out.status = if clean { t.status } else { b'?' };
    out.recover = framed.then_some(crate::server::Recover {
        answers_due: t.pending,
        status: t.status,
    });
    if let Some(l) = mode.stats.as_mut() {
        l.pending.add(&t.tally);
    }
    out.prepared = prepared;
    if let Some(st) = &mode.statements {
        st.note_accepted(&mut responses);
    }
    if responses.is_idle() {
        mode.reuse.responses = responses;
    }
    if scratch.capacity() <= REUSE_MAX {
        scratch.clear();
        mode.reuse.scratch = scratch;
    }
    out.last_server_tag = t.last_server_tag;
    out.c_in = c_in;
    out.s_in = s_in;
    out.s_out = s_out;
    end
}

//! The relay: bytes between a client and its server connection, in both directions at once.
//!
//! Last stage of a client session. One loop per session, no extra tasks: it reads whichever
//! side has data, walks message headers ([`MessageWalker`](crate::protocol::frame::MessageWalker))
//! and writes what is ready to the other side, so a large DataRow or COPY stream passes in
//! pieces and neither direction can block the other. Only headers are looked at, plus the
//! one-byte body of ReadyForQuery, and the text of Query and Parse (its first word, for
//! statements that need a database to themselves; in transaction mode also to pin sessions
//! that change session state). What it tracks decides whether the server connection
//! can be reused afterwards.
//!
//! Here: what a session hands the relay ([`Mode`]) and gets back ([`RelayEnd`]), and what
//! the client is told at the end. The parts: `pump` (the loop: one path for every mode),
//! `statements` (the step that renames named prepared statements when they are tracked),
//! `session` (pins, transaction ends, stats, cancel explanations), `timeouts`, `tracker` (what
//! the headers say of the server connection), `txn` (what pins), `databases` (holds for
//! DROP DATABASE and the like), `write` (the writes).

use tokio::io::{AsyncRead, AsyncWrite};

use super::conn::{ClientConn, ClientStream};
use super::prepared::{ClientStatements, Responses};
use super::SessionError;
use crate::error::{sqlstate, PgError};
use crate::protocol::tags::backend;
use crate::server::stream::TryWrite;
use crate::server::{ServerConn, ServerStream};
use crate::shutdown::PhaseWatch;
use crate::tls::Locked;

mod databases;
#[doc(hidden)]
pub(crate) mod exercise;
mod pump;
mod session;
mod statements;
mod timeouts;
mod tracker;
mod txn;
mod write;

use pump::{End, Relay};
pub(crate) use timeouts::Timeouts;
pub(crate) use txn::first_message_pins;

/// Stop reading a side once this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Free space ensured before each read.
const READ_RESERVE: usize = 16 * 1024;
/// Largest server message: PostgreSQL's own limit on a field is 1 GB.
const MAX_SERVER_MESSAGE: usize = (1 << 30) + (64 << 20);

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayEnd {
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
pub(crate) struct Mode {
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
    /// Transaction mode: make statements that change session state fail instead of pinning.
    pub reject: bool,
    /// Transaction mode: tracked parameters the server reported changed (ParameterStatus),
    /// collected for the session to re-apply on later server connections.
    pub(crate) reported: Vec<(String, String)>,
    /// Transaction mode: `track_parameters` in upper case (None: only `search_path` is
    /// tracked by reading back, see `client::tracked`).
    pub(crate) track: Option<std::sync::Arc<[String]>>,
    /// Transaction mode: tracked parameters the last transaction may have changed (the
    /// session reads them back before the server connection goes back).
    pub(crate) readback: crate::client::tracked::Readback,
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
    /// The session's last statement text, bounded (kept from one relay to the next): what
    /// a deadlock report names as the losing statement.
    pub(crate) last_sql: Vec<u8>,
    /// The backend pid the client was given (BackendKeyData). In transaction mode a
    /// NotificationResponse its own NOTIFY caused carries this pid instead of the server's.
    pub given_pid: i32,
    /// The gate of the session's server: DROP DATABASE and the like raise a hold on the
    /// database they name before they are forwarded (see `databases`).
    pub gate: Option<std::sync::Arc<crate::dbgate::ServerGate>>,
    /// The client's prepared statements that are such statements (a Bind of one raises the
    /// hold); nearly always empty.
    pub(crate) db_statements: databases::Prepared,
    /// Transaction mode: told when the session pins, so admission counts its server
    /// connection as held for the rest of the session (headroom).
    pub pinning: Option<crate::admission::Pinning>,
    /// Transaction mode: a takeover's handoff, which a pinned session (it cannot move) leaves
    /// at its next moment at rest, with 57P01 (looked at only when the phase bell rings).
    pub(crate) handoff: Option<std::sync::Arc<crate::client::Handoff>>,
}

/// What statement tracking allocates in every relay, kept between transactions while small:
/// the buffer renamed client messages are written to, and the queue of expected answers.
#[derive(Debug, Default)]
pub(crate) struct Reuse {
    scratch: bytes::BytesMut,
    responses: Responses,
}

/// Largest scratch buffer kept between transactions (an idle client holds it).
const REUSE_MAX: usize = 4096;

/// Relays between `client` and `server` with cancel requests pointed at `server` meanwhile
/// (see [`run`]); the cancel key points nowhere again on return.
pub(crate) async fn run_attached(
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
        secret: server.secret.clone(),
    };
    key.set_target(Some(target.clone())).await;
    let end = run(client, server, phase, (max_client_message, &target), mode).await;
    key.set_target(None).await;
    end
}

/// Relays until one side ends or shutdown says so. On return `server.status`, `server.rbuf`
/// and `server.broken` say whether the server connection may be reused.
///
/// # Errors
/// [`SessionError`] for a client protocol violation (the caller tells the client).
pub(super) async fn run(
    client: &mut ClientConn,
    server: &mut ServerConn,
    phase: &mut PhaseWatch,
    (max_client_message, cancel): (usize, &crate::cancel::CancelTarget),
    mode: &mut Mode,
) -> Result<RelayEnd, SessionError> {
    if matches!(client.stream, ClientStream::Closed) {
        // Nothing to relay; no plan to bring the server connection back either.
        server.recover = None;
        return Ok(RelayEnd::ClientDone);
    }
    let mut relay = Relay::new(client, server, phase, (max_client_message, cancel), mode);
    let end = match &mut client.stream {
        ClientStream::Tcp(c) => server_side(c.split(), &mut server.stream, &mut relay).await,
        ClientStream::Tls(c) => {
            let lock = std::sync::Mutex::new(&mut **c);
            server_side((Locked(&lock), Locked(&lock)), &mut server.stream, &mut relay).await
        }
        ClientStream::Closed => Ok(RelayEnd::ClientDone), // (checked above)
    };
    relay.finish(client, server);
    // Unless it ended quietly, the client gets the server bytes still owed, then the reason.
    if let Ok(why @ (RelayEnd::ServerGone | RelayEnd::TimedOut | RelayEnd::Shutdown)) = end {
        client.write_out(relay.unsent()).await;
        if let Some(e) = last_words(why, relay.last_server_tag(), relay.take_error()) {
            client.send_error(&e).await;
        }
    }
    end
}

/// The relay with the client's halves and the server stream split to match.
async fn server_side<CR, CW>(client: (CR, CW), server: &mut ServerStream, relay: &mut Relay<'_>) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + TryWrite + Unpin,
{
    match server {
        ServerStream::Tcp(s) => relay.run(client, s.split()).await,
        ServerStream::Unix(s) => relay.run(client, s.split()).await,
        ServerStream::Tls(s) => {
            let lock = std::sync::Mutex::new(&mut **s);
            relay.run(client, (Locked(&lock), Locked(&lock))).await
        }
    }
}

/// The error that tells the client why the relay ended `end` (after the server's last
/// message, of type `last_server_tag`; `error`: what a timeout or a verdict ended it with).
/// None when the server's own error says it, and for the ends the client is not told of.
fn last_words(end: RelayEnd, last_server_tag: u8, error: Option<PgError>) -> Option<PgError> {
    match end {
        RelayEnd::ServerGone if last_server_tag != backend::ERROR_RESPONSE => Some(PgError::fatal(
            sqlstate::CONNECTION_FAILURE,
            "pgvalve: server closed the connection unexpectedly",
        )),
        RelayEnd::TimedOut => error,
        RelayEnd::Shutdown => Some(
            PgError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )
            .with_detail("pgvalve is shutting down"),
        ),
        RelayEnd::ServerGone | RelayEnd::ClientDone | RelayEnd::Idle => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_words_name_the_reason_unless_the_server_already_did() {
        let gone = last_words(RelayEnd::ServerGone, backend::DATA_ROW, None).expect("told");
        assert_eq!(gone.code, sqlstate::CONNECTION_FAILURE);
        assert!(last_words(RelayEnd::ServerGone, backend::ERROR_RESPONSE, None).is_none());
        let limit = PgError::fatal("25P04", "too long");
        assert_eq!(
            last_words(RelayEnd::TimedOut, 0, Some(limit))
                .map(|e| e.code)
                .as_deref(),
            Some("25P04")
        );
        let shutdown = last_words(RelayEnd::Shutdown, backend::READY_FOR_QUERY, None).expect("told");
        assert_eq!(shutdown.code, sqlstate::ADMIN_SHUTDOWN);
        assert!(last_words(RelayEnd::Idle, 0, Some(PgError::fatal("25P04", "x"))).is_none());
        assert!(last_words(RelayEnd::ClientDone, 0, None).is_none());
    }
}

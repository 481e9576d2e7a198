//! Transaction pooling: a client holds a server connection only while a transaction (or a
//! pipeline of requests) is in progress.
//!
//! Part of the client session, after login. Between transactions the client holds nothing;
//! its next message checks a server connection out of the pool (waiting up to
//! `query_wait_timeout`), re-applies the client's startup parameters if that connection
//! carries others, and relays until ReadyForQuery 'I' with every request answered. A session
//! that changes session state (see [`super::sql`]) is pinned to its server connection until it
//! disconnects; that connection is then reset before anyone else gets it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::conn::ClientConn;
use super::params::{params_key, prepare_server, Reported};
use super::relay::{self, Mode, RelayEnd};
use super::{Seat, SessionError};
use crate::cancel::CancelKey;
use crate::pool::PooledConn;
use crate::protocol::startup::StartupParams;
use crate::proxy::Shared;
use crate::shutdown::Phase;

/// What an idle client (holding no server connection) does next.
enum Next {
    /// Sent a request: it needs a server connection.
    Request,
    /// Sent Terminate.
    Terminate,
    /// The proxy is shutting down.
    Shutdown,
}

async fn next_request(
    client: &mut ClientConn,
    phase: &mut watch::Receiver<Phase>,
    seat: &Seat,
) -> Result<Next, SessionError> {
    loop {
        if let Some(&tag) = client.rbuf.first() {
            return Ok(if tag == b'X' { Next::Terminate } else { Next::Request });
        }
        if *phase.borrow_and_update() != Phase::Running {
            return Ok(Next::Shutdown);
        }
        tokio::select! {
            r = client.read_more() => r?,
            r = phase.changed() => if r.is_err() { return Ok(Next::Shutdown) },
            // KILL_CLIENT between two transactions.
            e = seat.registered.info.verdict.wait() => return Err(SessionError::Killed(e)),
        }
    }
}

/// Serves a logged-in client in transaction mode. `first` is the server connection used for
/// login; it goes back to the pool at once.
///
/// # Errors
/// [`SessionError`] to tell the client (no server connection in time, shutdown, a protocol
/// violation).
pub async fn serve(
    shared: &Arc<Shared>,
    client: &mut ClientConn,
    first: PooledConn,
    key: &CancelKey,
    p: &StartupParams,
    seat: &Seat,
    mut mode: Mode,
) -> Result<(), SessionError> {
    first.checkin();
    seat.checked_in();
    let max = shared.config().proxy.max_message_size.0;
    let reset = &shared.config().pool.server_reset_query.clone();
    let mut phase = shared.phase.clone();
    let mut reported = Reported::new();
    let mut params = params_key(p, &reported);
    loop {
        match next_request(client, &mut phase, seat).await? {
            Next::Request => {}
            Next::Terminate => return Ok(()),
            Next::Shutdown => return Err(SessionError::Shutdown),
        }
        // Re-preparing statements a server already accepted needs no server connection
        // (and must not wait for one: drivers prepare synchronously while other clients of
        // the same thread hold every server connection in a transaction).
        if let Some(st) = mode.statements.as_mut() {
            if st.answer_known_parses(&mut client.rbuf, &mut client.wbuf) {
                client.flush().await?;
                continue;
            }
        }
        // Timeouts as configured now: a reload applies from the next transaction on.
        mode.timeouts = relay::Timeouts::from_config(&shared.config());
        let mut server = seat.checkout(shared, client).await?;
        if let Err(e) = prepare_server(&mut server, p, &reported, params).await {
            seat.checked_in();
            server.checkin();
            return Err(e);
        }
        let end = relay::run_attached(client, &mut server, key, shared.phase.clone(), max, &mut mode).await;
        if !mode.reported.is_empty() {
            // The client SET a tracked parameter: this connection now carries the new value,
            // and every later one gets it too.
            reported.extend(mode.reported.drain(..));
            params = params_key(p, &reported);
            server.applied = params;
        }
        seat.checked_in();
        match end {
            Ok(RelayEnd::Idle) => server.checkin(),
            Ok(RelayEnd::ClientDone) => {
                // The client left inside a transaction or a query: cancel, roll back, and
                // reuse the connection if that brings it back to idle soon (else close it).
                if server.recover.is_some() && !server.is_clean() {
                    let recovered = server.recover(Duration::from_secs(2)).await;
                    tracing::debug!(recovered, "client left mid-transaction");
                }
                server.release(reset, Duration::from_secs(5)).await;
                return Ok(());
            }
            other => {
                // Client gone, server gone, shutdown, or the end of a pinned session: reset (or
                // close, when not clean) before anyone else gets the connection.
                server.release(reset, Duration::from_secs(5)).await;
                return other.map(|_| ());
            }
        }
    }
}

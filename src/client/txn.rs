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

use super::conn::ClientConn;
use super::params::{params_key, prepare_server, Reported};
use super::relay::{self, Mode, RelayEnd};
use super::Services;
use super::{Seat, SessionError, TxnSession};
use crate::admission::Hold;
use crate::cancel::CancelKey;
use crate::protocol::startup::StartupParams;
use crate::protocol::tags;
use crate::shutdown::{Phase, PhaseWatch};

/// What an idle client (holding no server connection) does next.
enum Next {
    /// Sent a request: it needs a server connection.
    Request,
    /// Sent Terminate.
    Terminate,
    /// The proxy is shutting down.
    Shutdown,
}

async fn next_request(client: &mut ClientConn, phase: &mut PhaseWatch, seat: &Seat) -> Result<Next, SessionError> {
    loop {
        if let Some(&tag) = client.rbuf.first() {
            return Ok(if tag == tags::frontend::TERMINATE {
                Next::Terminate
            } else {
                Next::Request
            });
        }
        if phase.now() != Phase::Running {
            return Ok(Next::Shutdown);
        }
        tokio::select! {
            r = client.wait_idle() => r?,
            _ = phase.changed() => {},
            // KILL_CLIENT between two transactions.
            e = seat.registered.info.verdict.wait() => return Err(SessionError::Killed(e)),
        }
    }
}

/// Serves a logged-in client in transaction mode (holding no server connection between
/// transactions: the one used for login is back in the pool already).
///
/// # Errors
/// [`SessionError`] to tell the client (no server connection in time, shutdown, a protocol
/// violation).
pub(crate) async fn serve(
    shared: &Arc<Services>,
    client: &mut ClientConn,
    t: &mut TxnSession,
) -> Result<(), SessionError> {
    let TxnSession {
        key,
        params: p,
        seat,
        mode,
        ..
    } = t;
    let (key, p, seat) = (&*key, &*p, &*seat);
    let reset = shared.config().pool.server_reset_query.clone();
    let cx = Ctx {
        shared,
        key,
        p,
        seat,
        reset: &reset,
        max: shared.config().proxy.max_message_size.0,
    };
    let mut phase = PhaseWatch::new(&shared.phase_bell);
    let reported = Reported::new();
    let params = params_key(p, &reported);
    let mut applied = Applied {
        params,
        reported,
        lease: shared.pools.params_lease(&seat.route, params),
    };
    let mut first = true;
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
        // A session that pins in its first statement (a SET at connect, say) asks for that
        // transaction's connection as a long hold: looked at once per session, before the
        // grant (later pins are told by the relay).
        let hold = if std::mem::take(&mut first)
            && !mode.reject
            && relay::first_message_pins(&client.rbuf, mode.statements.is_none())
        {
            Hold::Pin
        } else {
            Hold::Transaction
        };
        // Boxed: the transaction's future (checkout, relay) exists only while it runs, so an
        // idle client's task stays small.
        if !Box::pin(transaction(&cx, client, mode, hold, &mut applied, &mut phase)).await? {
            return Ok(());
        }
    }
}

/// What a session's transactions share.
struct Ctx<'a> {
    shared: &'a Arc<Services>,
    key: &'a CancelKey,
    p: &'a StartupParams,
    seat: &'a Seat,
    reset: &'a str,
    max: usize,
}

/// The client's parameters as they should be on its server connections.
struct Applied {
    reported: Reported,
    params: u64,
    /// Keeps idle connections carrying these parameters as they are while the session lives.
    lease: crate::pool::params::ParamsLease,
}

/// One transaction (or pipeline): a server connection, the relay until it is idle again, the
/// connection back. False when the session ends.
async fn transaction(
    cx: &Ctx<'_>,
    client: &mut ClientConn,
    mode: &mut Mode,
    hold: Hold,
    applied: &mut Applied,
    phase: &mut PhaseWatch,
) -> Result<bool, SessionError> {
    let (shared, seat) = (cx.shared, cx.seat);
    // Timeouts as configured now: a reload applies from the next transaction on.
    mode.timeouts = relay::Timeouts::from_config(&shared.config());
    let mut server = seat.checkout(shared, client, hold).await?;
    if let Err(e) = prepare_server(&mut server, cx.p, &applied.reported, applied.params).await {
        seat.checked_in();
        server.checkin();
        return Err(e);
    }
    let end = relay::run_attached(client, &mut server, cx.key, phase, cx.max, mode).await;
    if !mode.reported.is_empty() {
        // The client SET a tracked parameter: this connection now carries the new value,
        // and every later one gets it too.
        applied.reported.extend(mode.reported.drain(..));
        applied.params = params_key(cx.p, &applied.reported);
        applied.lease.set(applied.params);
        server.applied = applied.params;
    }
    seat.checked_in();
    match end {
        Ok(RelayEnd::Idle) => {
            server.checkin();
            Ok(true)
        }
        Ok(RelayEnd::ClientDone) => {
            // The client left inside a transaction or a query: cancel, roll back, and
            // reuse the connection if that brings it back to idle soon (else close it).
            if !server.is_clean() {
                let recovered = server.recover(Duration::from_secs(2)).await;
                tracing::debug!(recovered, "client left mid-transaction");
            }
            server.release(cx.reset, Duration::from_secs(5)).await;
            Ok(false)
        }
        other => {
            // Server gone, shutdown, a timeout, or the end of a pinned session: reset (or
            // close, when not clean) before anyone else gets the connection.
            server.release(cx.reset, Duration::from_secs(5)).await;
            other.map(|_| false)
        }
    }
}

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
use super::handoff::{self, Handoff};
use super::params::{params_key, prepare_server, server_settings, Reported, DIRTY};
use super::relay::{self, Mode, RelayEnd};
use super::Services;
use super::{listen, tracked};
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
    /// A notification came for the client (LISTEN), or its listener was dropped.
    Notify(Option<bytes::Bytes>),
    /// A handoff to a takeover's successor has begun (see [`Watch`]).
    Handoff,
}

/// What an idle session does about a handoff to a takeover's successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Nothing (none began, or moving failed: it stays here).
    Off,
    /// It can move: at once, with what it read and did not handle yet.
    Move,
    /// It cannot move: it ends once it has nothing left to handle.
    Close,
}

impl Watch {
    /// For a session that `stay`s here for good, or else can move (`movable`) or not.
    fn of(stay: bool, movable: bool) -> Self {
        match (stay, movable) {
            (true, _) => Watch::Off,
            (false, true) => Watch::Move,
            (false, false) => Watch::Close,
        }
    }
}

async fn next_request(
    client: &mut ClientConn,
    phase: &mut PhaseWatch,
    seat: &Seat,
    listener: &mut Option<Box<crate::notify::Listener>>,
    (handoff, watch): (&Handoff, Watch),
) -> Result<Next, SessionError> {
    loop {
        if watch != Watch::Off && handoff.is_begun() && (watch == Watch::Move || client.rbuf.is_empty()) {
            return Ok(Next::Handoff);
        }
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
            // A phase change, or a nudge: a takeover's handoff began (looked at above).
            _ = phase.changed() => {},
            // KILL_CLIENT between two transactions.
            e = seat.registered.info.verdict.wait() => return Err(SessionError::Killed(e)),
            m = next_notification(listener) => return Ok(Next::Notify(m)),
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
    reported: Reported,
) -> Result<(), SessionError> {
    let TxnSession {
        key,
        params: p,
        seat,
        mode,
        ..
    } = t;
    // The session's parts are reached through `cx` only: each reference is kept once in
    // this future, which every idle client's task holds.
    let cx = Ctx {
        shared,
        key: &*key,
        p: &*p,
        seat: &*seat,
    };
    let mut phase = PhaseWatch::new(&shared.phase_bell);
    let mut applied = Applied::new(shared, cx.seat, client, cx.p, reported);
    let mut first = true;
    // Boxed while it exists: most sessions never LISTEN, and the idle loop keeps this.
    let mut listener = None;
    let mut stay = false;
    loop {
        let watch = Watch::of(stay, handoff::movable(client, mode, listener.is_some()));
        match idle(client, &mut phase, cx.seat, &mut listener, (&shared.handoff, watch)).await? {
            Next::Terminate => return Ok(()),
            Next::Shutdown => return Err(SessionError::Shutdown),
            Next::Handoff if watch != Watch::Move => return Err(SessionError::Shutdown),
            // Moved away (the session ends here without a word), or here for good.
            Next::Handoff => {
                match handoff::hand_over(shared, client, (cx.key, cx.p, &*mode), &applied.reported).await {
                    true => return Ok(()),
                    false => stay = true,
                }
            }
            Next::Request | Next::Notify(_) => {}
        }
        // LISTEN/UNLISTEN alone, outside a transaction: answered here, on no server connection.
        if listen::answer(shared, cx.seat, mode.given_pid, client, &mut listener).await? {
            continue;
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
        let hold = hold_for(std::mem::take(&mut first), mode, client);
        // Boxed: the transaction's future (checkout, relay) exists only while it runs, so an
        // idle client's task stays small.
        if !Box::pin(transaction(
            &cx,
            client,
            mode,
            hold,
            &mut applied,
            &mut phase,
            &listener,
        ))
        .await?
        {
            return Ok(());
        }
    }
}

/// How the transaction's connection is held: a session that pins in its `first` statement
/// (a SET at connect, say) asks for it as a long hold, looked at once per session, before
/// the grant (later pins are told by the relay).
fn hold_for(first: bool, mode: &Mode, client: &ClientConn) -> Hold {
    let pins = || {
        relay::first_message_pins(
            &client.rbuf,
            mode.statements.is_none(),
            mode.track.as_deref().unwrap_or_default(),
        )
    };
    if first && !mode.reject && pins() {
        Hold::Pin
    } else {
        Hold::Transaction
    }
}

/// What a session's transactions share.
struct Ctx<'a> {
    shared: &'a Arc<Services>,
    key: &'a CancelKey,
    p: &'a StartupParams,
    seat: &'a Seat,
}

impl Ctx<'_> {
    /// `server_reset_query` as configured now (read when a connection is released, which
    /// is rare in transaction mode, so a session keeps no copy).
    fn reset_query(&self) -> String {
        self.shared.config().pool.server_reset_query.clone()
    }
}

/// The client's parameters as they should be on its server connections.
struct Applied {
    reported: Reported,
    params: u64,
    /// Keeps idle connections carrying these parameters as they are while the session lives.
    lease: crate::pool::params::ParamsLease,
    /// The identity's server_settings, under `config`.
    base: Vec<(String, String)>,
    /// The configuration `base` was read from.
    config: Arc<crate::config::Config>,
}

impl Applied {
    /// After a reload (`config` is not the one `base` came from): the identity's
    /// server_settings as configured now, applied from this transaction on. One pointer
    /// comparison per transaction otherwise.
    fn follow(&mut self, config: &Arc<crate::config::Config>, client: &ClientConn, p: &StartupParams) {
        if Arc::ptr_eq(config, &self.config) {
            return;
        }
        self.config = config.clone();
        let base = server_settings(config, &super::client_facts(client, p));
        if base != self.base {
            self.base = base;
            self.params = params_key(&self.base, p, &self.reported);
            self.lease.set(self.params);
        }
    }
}

impl Applied {
    /// The identity's server_settings, the startup parameters of `p`, and what the client
    /// `reported` it set so far (nothing, but for a client moved from another process).
    fn new(shared: &Services, seat: &Seat, client: &ClientConn, p: &StartupParams, reported: Reported) -> Self {
        let config = shared.config().clone();
        let base = server_settings(&config, &super::client_facts(client, p));
        let params = params_key(&base, p, &reported);
        Applied {
            params,
            reported,
            lease: shared.pools.params_lease(&seat.route, params),
            base,
            config,
        }
    }
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
    listener: &Option<Box<crate::notify::Listener>>,
) -> Result<bool, SessionError> {
    let (shared, seat) = (cx.shared, cx.seat);
    // Timeouts, the message size limit and server_settings as configured now: a reload
    // applies from the next transaction on.
    let max = {
        let config = shared.config();
        mode.timeouts = relay::Timeouts::from_config(&config);
        applied.follow(&config, client, cx.p);
        config.proxy.max_message_size.0
    };
    let mut server = seat.checkout(shared, client, hold).await?;
    if let Some(l) = listener {
        l.begin(server.pid).await;
    }
    if let Err(e) = prepare_server(&mut server, &applied.base, cx.p, &applied.reported, applied.params).await {
        seat.checked_in();
        server.checkin();
        return Err(e);
    }
    // Boxed: the relay's state exists only while a server connection is attached (at most
    // the pool's size at once, so its memory stays warm), and this transaction's future,
    // made for every transaction and held by every client waiting in the queue, stays small.
    let end = Box::pin(relay::run_attached(client, &mut server, cx.key, phase, max, mode)).await;
    if let Some(l) = listener {
        l.end(server.pid).await;
    }
    if let Err(e) = learn(cx, &mut server, mode, applied, matches!(end, Ok(RelayEnd::Idle))).await {
        seat.checked_in();
        server.release(&cx.reset_query(), Duration::from_secs(5)).await;
        return Err(e);
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
                // Boxed, as the read-back in `learn`: rare, and this future is made anew for
                // every transaction (within the allocator's fast sizes only while small).
                let recovered = Box::pin(server.recover(Duration::from_secs(2))).await;
                tracing::debug!(recovered, "client left mid-transaction");
            }
            server.release(&cx.reset_query(), Duration::from_secs(5)).await;
            Ok(false)
        }
        other => {
            // Server gone, shutdown, a timeout, or the end of a pinned session: reset (or
            // close, when not clean) before anyone else gets the connection.
            server.release(&cx.reset_query(), Duration::from_secs(5)).await;
            other.map(|_| false)
        }
    }
}

/// What the transaction changed of the client's tracked parameters: values the server
/// reported, and (when it ended `idle` with a tracked parameter maybe changed) the values read
/// back from it. This connection now carries them, and every later one gets them too.
///
/// # Errors
/// The read-back failed: the client's parameters are unknown (its session ends).
async fn learn(
    cx: &Ctx<'_>,
    server: &mut crate::pool::PooledConn,
    mode: &mut Mode,
    applied: &mut Applied,
    idle: bool,
) -> Result<(), SessionError> {
    let mut changed = !mode.reported.is_empty();
    applied.reported.extend(mode.reported.drain(..));
    let mut dirty = false;
    if let (true, Some(reset_all)) = (idle, mode.readback.take()) {
        let extra = mode.track.as_deref().unwrap_or_default();
        dirty = Box::pin(tracked::read_back(
            server,
            cx.p,
            extra,
            reset_all,
            &mut applied.reported,
        ))
        .await?;
        changed = true;
    }
    if changed {
        applied.params = params_key(&applied.base, cx.p, &applied.reported);
        applied.lease.set(applied.params);
        server.applied = if dirty { DIRTY } else { applied.params };
    }
    Ok(())
}

/// Between transactions: notifications written as they come, until the client's next
/// request, Terminate or shutdown.
async fn idle(
    client: &mut ClientConn,
    phase: &mut PhaseWatch,
    seat: &Seat,
    listener: &mut Option<Box<crate::notify::Listener>>,
    handoff: (&Handoff, Watch),
) -> Result<Next, SessionError> {
    let mut first = None;
    loop {
        listen::deliver(client, listener, first.take()).await?;
        match next_request(client, phase, seat, listener, handoff).await? {
            Next::Notify(m) => first = m,
            next => return Ok(next),
        }
    }
}

/// The next notification for a listening client, or None once its listener was dropped;
/// pending while it listens to nothing.
async fn next_notification(listener: &mut Option<Box<crate::notify::Listener>>) -> Option<bytes::Bytes> {
    match listener {
        // Boxed: every idle client's task keeps room for this future, listening or not.
        Some(l) => Box::pin(l.next()).await,
        None => std::future::pending().await,
    }
}

//! A client session: startup, authentication, a server connection, the relay.
//!
//! Second step of the flow: the listener spawns [`serve`] per accepted socket, with the
//! admission permit it got (or none, when `max_client_connections` is reached — the refusal
//! is sent after the startup packet, before any authentication work). The session then asks
//! the pool for a server connection, applies the client's parameters on it, and relays.

mod auth;
mod buffers;
mod conn;
mod console;
mod database_sql;
mod entry;
mod error;
mod handoff;
mod hba;
mod listen;
mod params;
mod prepared;
mod proxied;
mod relay;
mod services;
mod sql;
mod tracked;
mod txn;

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

#[doc(hidden)]
pub(crate) use auth::scram_exchange;
pub(crate) use buffers::ReadBuffers;
pub(crate) use conn::ClientConn;
pub(crate) use console::{is_console, role, Console, Role};
pub(crate) use entry::serve;
use entry::{ended, serve_txn};
pub(crate) use error::SessionError;
pub(crate) use handoff::{resume, Handoff, Moved, MovedState};
pub(crate) use params::parse_options;
pub(crate) use prepared::Registry as StatementRegistry;
#[doc(hidden)]
pub(crate) use relay::exercise;
pub(crate) use relay::Mode;
pub(crate) use services::Services;
#[doc(hidden)]
pub(crate) use sql::{
    might_change_session as sql_might_change_session, session_state_change as sql_session_state_change,
};

use crate::admission::{Acquired, ClientPermit, Hold, Member, Queued, Refusal, ServerGrant, Waited};
use crate::cancel::CancelKey;
use crate::config::{ClientTlsMode, PoolMode, Route};
use crate::pool::{CheckoutError, PooledConn};
use crate::protocol::messages;
use crate::protocol::startup::{InitialPacket, StartupParams};
use crate::protocol::tags;
use crate::server::ServerError;
use crate::shutdown::Phase;

enum Opening {
    Cancel,
    Startup(StartupParams),
}

/// What a client says about itself, for its identity.
fn client_facts<'a>(client: &ClientConn, p: &'a StartupParams) -> crate::admission::identity::ClientFacts<'a> {
    crate::admission::identity::ClientFacts {
        application_name: p.application_name().unwrap_or(""),
        source: client.peer.ip(),
        user: p.user(),
        database: p.database(),
    }
}

/// Where a logged-in client's server connections come from: its admission membership (its
/// identity) and its pool.
pub(crate) struct Seat {
    /// In the session registry while the session lives.
    registered: crate::sessions::Registered,
    member: Member,
    /// Shared by the sessions with the same route (see `PoolSet::shared_route`).
    route: Arc<Route>,
    /// The pool's name: `database "d" user "u"`.
    pool: Arc<str>,
    /// The core the session runs on (its pool's part there, see `pool::shards`).
    core: usize,
    /// The pool last checked out from, until a reload retires (closes) it.
    server_pool: std::sync::Mutex<Option<crate::pool::Pool>>,
    /// The pool's SHOW STATS counters (queue waits are added here).
    stats: Arc<crate::pool::stats::Counters>,
}

impl Seat {
    /// A server connection: a grant from the fair queue (with a NOTICE to the client once it
    /// has waited `queue_notice_after`), then a connection from the pool, held as `hold` says.
    pub(crate) async fn checkout(
        &self,
        shared: &Services,
        client: &mut ClientConn,
        hold: Hold,
    ) -> Result<PooledConn, SessionError> {
        shared.pauses.wait_resumed(&self.route.database).await;
        // The pool and its size as configured now (a reload may have changed them).
        let pool = self.server_pool(shared);
        let (pool_size, lease) = (pool.manager().size() as u32, pool.manager().lease() as u32);
        // Most grants come at once: then no timer is made.
        let grant = match shared
            .admission
            .request_in(&self.member, pool.manager().gate(), (lease, pool_size), hold)?
        {
            Acquired::Granted(g) => g,
            // Boxed: a transaction's future is made anew for each, and most grants come at once.
            Acquired::Queued(q) => Box::pin(self.queued(client, q, pool_size)).await?,
        };
        let server = match shared.pools.checkout(&pool, &self.route, Some(grant)).await {
            Ok(s) => s,
            Err(CheckoutError::Server(ServerError::NoSlot(max))) => {
                return Err(SessionError::Refused(Refusal::ServerSlots {
                    identity: self.member.identity().to_string(),
                    max,
                    waited: shared.config().pool.query_wait_timeout,
                }))
            }
            Err(e) => return Err(e.into()),
        };
        self.registered.info.set_backend(server.pid, server.handed_at);
        self.registered.info.set_backend_minor(server.protocol_minor);
        Ok(server)
    }

    /// Waits for a grant that did not come at once, with a NOTICE to the client once it has
    /// waited `queue_notice_after`, up to the queue timeout (both sent by admission's queue
    /// clock, so the wait arms no timer); the wait counts in the pool's SHOW STATS.
    async fn queued(
        &self,
        client: &mut ClientConn,
        mut q: Queued<'_>,
        pool_size: u32,
    ) -> Result<ServerGrant, SessionError> {
        let (grant, waited) = loop {
            match q.next().await? {
                Waited::Granted(g, waited) => break (g, waited),
                Waited::Notice => {
                    let (who, pool) = (self.member.identity(), &self.pool);
                    let msg = match q.held_back() {
                        Some((held, headroom)) => format!(
                            "pgvalve: client \"{who}\" is queued: it holds {held} of the {pool_size} server connections of {pool} for whole sessions, more than its share, and the last {headroom} are kept for other clients (headroom={headroom})"
                        ),
                        None => format!(
                            "pgvalve: client \"{who}\" is queued: all server connections of {pool} are in use (pool_size={pool_size})"
                        ),
                    };
                    messages::notice_response("00000", &msg, &mut client.wbuf);
                    client.flush().await?;
                }
            }
        };
        if waited >= Duration::from_millis(1) {
            self.stats.add(&crate::pool::stats::Totals {
                wait_us: waited.as_micros() as u64,
                ..Default::default()
            });
        }
        Ok(grant)
    }

    /// The session's pool: the one used last while it is open (a reload that changes its
    /// server or settings closes it), else the pool set's current one.
    fn server_pool(&self, shared: &Services) -> crate::pool::Pool {
        let mut cached = self.server_pool.lock().unwrap_or_else(|p| p.into_inner());
        match &*cached {
            Some(p) if !p.is_closed() => p.clone(),
            _ => {
                let p = shared.pools.pool(&self.route, self.core);
                *cached = Some(p.clone());
                p
            }
        }
    }

    /// The session gave its server connection back (its transaction is over, so a verdict
    /// that came too late for it is dropped).
    pub(crate) fn checked_in(&self) {
        self.registered.info.no_backend();
        self.registered.info.transaction_over();
    }
}

/// Reads the first packet(s): runs TLS (after SSLRequest, or at once when the client opens
/// with a TLS handshake) or answers 'N', answers GSSENC with 'N', forwards a cancel, or
/// returns the startup parameters.
async fn opening(shared: &Services, client: &mut ClientConn) -> Result<Opening, SessionError> {
    let (max, tls) = {
        let c = shared.config();
        (c.proxy.max_startup_packet_size, c.tls.client.clone())
    };
    let first = client.peek_first().await?;
    // "PROXY " or the v2 signature's "\r" where a length is due (no startup packet is that
    // long): a PROXY header from an address not trusted to send one.
    if matches!(first, Some(b'P' | b'\r')) {
        return Err(SessionError::ProxyHeader(
            client.peer,
            "the address is not in proxy_protocol_trusted".into(),
        ));
    }
    // A TLS record (0x16) where a length is due: PostgreSQL 17's direct TLS.
    if first == Some(0x16) {
        let acceptor = tls
            .acceptor
            .as_ref()
            .ok_or_else(|| SessionError::Tls("direct TLS connection but TLS is not configured".into()))?;
        client.start_tls(acceptor, true).await?;
    }
    for _ in 0..3 {
        match client.read_initial(max).await? {
            InitialPacket::SslRequest => match tls.acceptor.as_ref().filter(|_| !client.stream.is_tls()) {
                Some(acceptor) => {
                    if !client.rbuf.is_empty() {
                        return Err(SessionError::PlaintextAfterSslRequest);
                    }
                    client.send_byte(tags::encryption::SSL_ACCEPTED).await?;
                    client.start_tls(acceptor, false).await?;
                }
                None => client.send_byte(tags::encryption::REFUSED).await?,
            },
            InitialPacket::GssEncRequest => client.send_byte(tags::encryption::REFUSED).await?,
            InitialPacket::Cancel { pid, secret } => {
                shared.cancels.cancel_anywhere(pid, &secret).await;
                return Ok(Opening::Cancel);
            }
            InitialPacket::ForwardedCancel { pid, secret } => {
                shared.cancels.cancel(pid, &secret).await;
                return Ok(Opening::Cancel);
            }
            InitialPacket::Startup(_) if tls.mode == ClientTlsMode::Require && !client.stream.is_tls() => {
                return Err(SessionError::TlsRequired(client.peer.ip()));
            }
            InitialPacket::Startup(p) => return Ok(Opening::Startup(p)),
        }
    }
    Err(SessionError::Protocol("too many encryption requests".into()))
}

/// A client that passed login.
enum LoggedIn {
    /// An application client, admitted under its identity.
    Client(StartupParams, Member),
    /// A user of the admin console.
    Console(Role),
}

async fn login(shared: &Services, client: &mut ClientConn, permit_ok: bool) -> Result<Option<LoggedIn>, SessionError> {
    let p = match opening(shared, client).await? {
        Opening::Cancel => return Ok(None),
        Opening::Startup(p) => p,
    };
    if !permit_ok {
        let identity = crate::admission::identity::identify(&shared.config().identities, &client_facts(client, &p));
        return Err(SessionError::TooManyClients(
            shared.config().proxy.max_client_connections,
            identity,
        ));
    }
    if shared.phase_bell.now() != Phase::Running {
        return Err(SessionError::Shutdown);
    }
    if p.params.contains_key("replication") {
        return Err(SessionError::Unsupported(
            "pgvalve does not proxy replication connections".into(),
        ));
    }
    tracing::Span::current()
        .record("user", p.user())
        .record("db", p.database());
    if is_console(p.database()) {
        auth::authenticate(client, shared, p.user(), p.database()).await?;
        let role = role(&shared.config(), p.user()).ok_or_else(|| SessionError::NotConsoleUser(p.user().into()))?;
        return Ok(Some(LoggedIn::Console(role)));
    }
    // Before authentication: a client refused here costs no SCRAM work.
    let member = shared.admission.login(&client_facts(client, &p)).await;
    let member = member.inspect_err(|r| {
        tracing::Span::current().record("identity", r.identity());
    })?;
    tracing::Span::current().record("identity", &**member.identity());
    if p.needs_negotiation() {
        messages::negotiate_protocol_version(p.protocol_minor(), p.protocol_options(), &mut client.wbuf);
    }
    auth::authenticate(client, shared, p.user(), p.database()).await?;
    Ok(Some(LoggedIn::Client(p, member)))
}

/// What setup leads to.
enum Entry {
    /// An application session with its first server connection.
    Session(Box<Started>),
    /// The admin console.
    Console(Role),
}

/// A logged-in client with its first server connection.
struct Started {
    server: PooledConn,
    key: CancelKey,
    params: StartupParams,
    seat: Seat,
}

/// A transaction-mode client after login: what its transactions need, in one allocation.
pub(crate) struct TxnSession {
    key: CancelKey,
    params: StartupParams,
    seat: Seat,
    mode: Mode,
    /// Its place under max_client_connections.
    _permit: Option<ClientPermit>,
}

/// Login, then a session-mode session to its end, or a transaction-mode session ready for its
/// first transaction. Login and setup run inside the session's tracing span; the relay does
/// not enter it on every poll (it logs nothing on the hot path).
async fn session(
    shared: &Arc<Services>,
    client: &mut ClientConn,
    permit: Option<ClientPermit>,
    span: &tracing::Span,
    core: usize,
) -> Result<Option<Box<TxnSession>>, SessionError> {
    let Started {
        mut server,
        key,
        params,
        seat,
    } = match Box::pin(setup(shared, client, permit.is_some(), core).instrument(span.clone())).await? {
        None => return Ok(None),
        Some(Entry::Console(role)) => return shared.console.serve(shared, client, role).await.map(|()| None),
        Some(Entry::Session(s)) => *s,
    };
    let mut mode = session_mode(shared, client, &seat, &params, &key);
    if mode.transaction {
        // The server connection used for login goes back to the pool at once.
        server.checkin();
        seat.checked_in();
        return Ok(Some(Box::new(TxnSession {
            key,
            params,
            seat,
            mode,
            _permit: permit,
        })));
    }
    let max = shared.config().proxy.max_message_size.0;
    // Boxed: once per session, and the transaction-mode sessions' tasks stay small.
    let end = Box::pin(relay::run_attached(
        client,
        &mut server,
        &key,
        &mut crate::shutdown::PhaseWatch::new(&shared.phase_bell),
        max,
        &mut mode,
    ))
    .await;
    server
        .release(&shared.config().pool.server_reset_query, Duration::from_secs(5))
        .await;
    drop(permit);
    end.map(|_| None)
}

/// How the relay treats a logged-in client's session.
fn session_mode(
    shared: &Arc<Services>,
    client: &ClientConn,
    seat: &Seat,
    params: &StartupParams,
    key: &CancelKey,
) -> Mode {
    let route = &seat.route;
    Mode {
        transaction: route.pool_mode == PoolMode::Transaction,
        pinned: None,
        who: format!(
            "identity={:?} user={} application_name={:?} addr={}",
            seat.member.identity(),
            route.user,
            params.application_name().unwrap_or(""),
            client.peer
        ),
        pins: shared.pins.clone(),
        reported: Vec::new(),
        track: tracked::extra_names(&shared.config().pool.track_parameters),
        readback: Default::default(),
        reject: shared.config().pool.session_state == crate::config::SessionStatePolicy::Reject,
        timeouts: relay::Timeouts::from_config(&shared.config()),
        session: Some(seat.registered.info.clone()),
        stats: Some(
            crate::pool::stats::Local::new(seat.stats.clone()).with_latency(
                shared
                    .pools
                    .stats
                    .latency
                    .cell(seat.member.identity(), &crate::pool::PoolKey::of(route)),
            ),
        ),
        reuse: Default::default(),
        last_sql: Vec::new(),
        given_pid: key.pid,
        handoff: (route.pool_mode == PoolMode::Transaction).then(|| shared.handoff.clone()),
        pinning: (route.pool_mode == PoolMode::Transaction).then(|| {
            shared
                .admission
                .pinning(&seat.member, shared.pools.pool(route, seat.core).manager().gate())
        }),
        statements: (route.pool_mode == PoolMode::Transaction && shared.config().pool.max_prepared_statements > 0)
            .then(|| {
                prepared::ClientStatements::new(
                    shared.statements.clone(),
                    shared.config().pool.max_prepared_statements,
                    prepared::scope(&route.database, &route.user),
                )
            }),
        gate: Some(shared.gates.server(&route.host, route.port)),
        db_statements: Default::default(),
    }
}

/// A logged-in client's seat on core `core`, registered in the session registry.
fn seat(
    shared: &Services,
    client: &ClientConn,
    p: &StartupParams,
    mut member: Member,
    route: Route,
    core: usize,
) -> Seat {
    let core = core.min(shared.pools.cores() - 1);
    member.settle(core);
    let registered = shared.sessions.register(crate::sessions::SessionClient {
        identity: member.identity().clone(),
        user: route.user.clone(),
        database: route.database.clone(),
        application_name: p.application_name().unwrap_or("").to_string(),
        addr: client.peer,
        local: client.stream.local_addr().ok(),
    });
    let stats = shared.pools.stats.counters(&crate::pool::PoolKey::of(&route));
    let label = crate::pool::PoolKey::label(&route.database, &route.user);
    let route = shared.pools.shared_route(route);
    Seat {
        registered,
        core,
        pool: label.into(),
        member,
        route,
        server_pool: Default::default(),
        stats,
    }
}

/// Login, routing, a server connection with the client's parameters applied, and the
/// welcome (ParameterStatus, BackendKeyData, ReadyForQuery). None for a cancel request.
async fn setup(
    shared: &Arc<Services>,
    client: &mut ClientConn,
    permit_ok: bool,
    core: usize,
) -> Result<Option<Entry>, SessionError> {
    let timeout = shared.config().proxy.client_login_timeout;
    let login = tokio::time::timeout(timeout, login(shared, client, permit_ok));
    let (p, member) = match login.await.map_err(|_| SessionError::LoginTimeout(timeout))?? {
        None => return Ok(None),
        Some(LoggedIn::Console(role)) => {
            messages::auth_ok(&mut client.wbuf);
            return Ok(Some(Entry::Console(role)));
        }
        Some(LoggedIn::Client(p, member)) => (p, member),
    };
    let route = shared
        .config()
        .route(p.database(), p.user())
        .ok_or_else(|| SessionError::UnknownDatabase(p.database().to_string()))?;
    messages::auth_ok(&mut client.wbuf);
    client.flush().await?;

    let seat = seat(shared, client, &p, member, route, core);
    // In session mode the connection is the session's; in transaction mode it is the login's.
    let hold = match seat.route.pool_mode {
        PoolMode::Session => Hold::Session,
        PoolMode::Transaction => Hold::Transaction,
    };
    let mut server = seat.checkout(shared, client, hold).await?;
    // Session mode: the client's backend for its whole session, so it is told the real pid
    // (with pgvalve's own secret, which routes its cancels).
    let session_mode = seat.route.pool_mode == PoolMode::Session;
    // A 3.2 client gets a long secret, whatever protocol the server speaks.
    let key = shared
        .cancels
        .register(session_mode.then_some(server.pid), p.protocol_minor() >= 2);
    let base = params::server_settings(&shared.config(), &client_facts(client, &p));
    if let Err(e) = params::prepare_server(
        &mut server,
        &base,
        &p,
        &params::Reported::new(),
        params::params_key(&base, &p, &params::Reported::new()),
    )
    .await
    {
        server
            .release(&shared.config().pool.server_reset_query, Duration::from_secs(5))
            .await;
        return Err(e);
    }
    for (name, value) in &server.params {
        messages::parameter_status(name, value, &mut client.wbuf);
    }
    messages::backend_key_data(key.pid, key.secret.as_bytes(), &mut client.wbuf);
    messages::ready_for_query(tags::status::IDLE, &mut client.wbuf);
    client.flush().await?;
    tracing::debug!(backend_pid = server.pid, mode = %seat.route.pool_mode, "session started");
    Ok(Some(Entry::Session(Box::new(Started {
        server,
        key,
        params: p,
        seat,
    }))))
}

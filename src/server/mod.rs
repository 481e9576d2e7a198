//! One connection to PostgreSQL: connect, log in (asking for protocol 3.2, see [`version`]),
//! run the proxy's own simple queries (parameter application, reset) and forward cancel
//! requests with the server's own key, whatever its length.
//!
//! Last step of the flow: the pool creates these through its manager, a client session
//! relays bytes over `stream` while it holds one. Login uses postgres-protocol's
//! SCRAM-SHA-256 and MD5 client code; server messages are framed by header with a size
//! limit and parsed only as isolated frames.

use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use scram::Scram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) mod auth_query;
pub(crate) mod budget;
pub(crate) mod close;
mod error;
pub(crate) mod scram;
pub(crate) mod seat;
pub(crate) mod sizing;
pub(crate) mod statements;
pub(crate) mod stream;
pub(crate) mod version;
pub(crate) use error::ServerError;
pub(crate) use stream::{ServerAddr, ServerStream};

use crate::config::Secret;
use crate::protocol::frame::{split_frame, Frame};
use crate::protocol::messages::parse_server_error;
use crate::protocol::tags;

/// Largest message the proxy reads whole from a server (during login and its own queries).
pub(crate) const MAX_SERVER_CONTROL_MESSAGE: usize = 1 << 20;

/// Where and as whom to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTarget {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database on the server.
    pub dbname: String,
    /// Role.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<Secret>,
    /// Time allowed for connect plus login.
    pub connect_timeout: Duration,
    /// TLS to the server (`server_tls_mode`).
    pub tls: crate::tls::ServerTls,
    /// For users found by auth_query: the SCRAM keys learned from the client's login, used
    /// when no password is configured.
    pub keys: Option<std::sync::Arc<scram::KeySlot>>,
}

impl ServerTarget {
    /// How to reach `route`'s server as its user under `config`; `keys` for a user found by
    /// auth_query (its configured password, if any, comes first).
    pub(crate) fn for_route(
        config: &crate::config::Config,
        route: &crate::config::Route,
        keys: Option<std::sync::Arc<scram::KeySlot>>,
    ) -> Self {
        ServerTarget {
            host: route.host.clone(),
            port: route.port,
            dbname: route.server_dbname.clone(),
            user: route.user.clone(),
            password: config.users.get(&route.user).and_then(|u| u.server_password.clone()),
            connect_timeout: config.pool.server_connect_timeout,
            tls: config.tls.server.clone(),
            keys,
        }
    }
}

/// An open, logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    /// The socket.
    pub stream: ServerStream,
    /// Bytes read from the server and not yet consumed.
    pub(crate) rbuf: BytesMut,
    /// Backend process id (BackendKeyData).
    pub pid: i32,
    /// Backend cancel key (BackendKeyData): 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub secret: Bytes,
    /// The protocol minor version spoken with this server: 2 (PostgreSQL 18) or 0.
    pub protocol_minor: u16,
    /// The server's address, for cancel requests.
    pub addr: ServerAddr,
    /// ParameterStatus values as the server last reported them.
    pub params: Vec<(String, String)>,
    /// Last ReadyForQuery status: `I`, `T` or `E`.
    pub status: u8,
    /// Set when the connection's state is unknown; it is then never reused.
    pub broken: bool,
    /// When it last went back to the pool.
    pub(crate) idle_since: Instant,
    /// When the relay saw it answer everything (ReadyForQuery, nothing due): the time it went
    /// idle, taken at check-in instead of a clock reading of its own.
    pub(crate) answered_at: Option<Instant>,
    /// When it was last handed out (checked at checkout, or opened): the time a client got
    /// it (SHOW CLIENTS), without a clock reading of its own.
    pub(crate) handed_at: Instant,
    /// Its slot of its pool's budget (and so of `max_server_connections`), given back when the
    /// connection is dropped.
    pub slot: Option<budget::Slot>,
    /// Which client parameters are applied (a hash; 0 = none, as after a reset).
    pub applied: u64,
    /// Proxy-named prepared statements on this connection (transaction mode).
    pub prepared: statements::ServerStatements,
    /// Set by the relay when the protocol state is known: what is still due from the server.
    pub(crate) recover: Option<Recover>,
    /// Server failures its pool had seen when it was last checked (a new one makes the pool
    /// probe it before reuse, see `pool::manager`).
    pub(crate) failures_seen: u64,
}

/// A connection's slot is given back once PostgreSQL has closed the connection (see
/// [`close`]), so the backend is gone from pg_stat_activity before another takes the slot.
impl Drop for ServerConn {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            close::release_when_closed(&self.stream, slot);
        }
    }
}

/// What a server connection still owes after its client left, when that is known: every
/// request went whole and every answer so far came back whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Recover {
    /// ReadyForQuery messages still due (requests in flight).
    pub(crate) answers_due: u32,
    /// The last ReadyForQuery status.
    pub status: u8,
}

/// Connects and logs in asking for protocol 3.2 (the server may offer 3.0 instead; see
/// [`version::connect_negotiating`]), bounded by `target.connect_timeout`.
///
/// # Errors
/// [`ServerError`]: connect failure, timeout, or PostgreSQL's refusal.
pub(crate) async fn connect(target: &ServerTarget) -> Result<ServerConn, ServerError> {
    let addr = format!("{}:{}", target.host, target.port);
    tokio::time::timeout(target.connect_timeout, version::connect_negotiating(target, &addr))
        .await
        .map_err(|_| ServerError::ConnectTimeout {
            addr,
            timeout: target.connect_timeout,
        })?
}

/// Opens the socket (TLS as configured) and sends the StartupMessage for protocol 3.`minor`;
/// [`ServerConn::login`] follows.
async fn open(target: &ServerTarget, addr: &str, minor: u16) -> Result<ServerConn, ServerError> {
    let (stream, peer) = ServerStream::connect(&target.host, target.port, &target.tls)
        .await
        .map_err(|source| ServerError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let mut conn = ServerConn {
        stream,
        rbuf: BytesMut::with_capacity(8192),
        pid: 0,
        secret: Bytes::new(),
        protocol_minor: minor,
        addr: peer,
        params: Vec::new(),
        status: tags::status::IDLE,
        broken: false,
        idle_since: Instant::now(),
        answered_at: None,
        handed_at: Instant::now(),
        slot: None,
        applied: 0,
        prepared: Default::default(),
        recover: None,
        failures_seen: 0,
    };
    let mut w = BytesMut::new();
    let params = [("user", target.user.as_str()), ("database", target.dbname.as_str())];
    version::startup_message(minor, &params, &mut w)?;
    conn.send(&w).await?;
    Ok(conn)
}

fn parse(frame: &Frame) -> Result<backend::Message, ServerError> {
    let mut b = frame.bytes.clone();
    match backend::Message::parse(&mut b) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(ServerError::Protocol("truncated message".into())),
        Err(e) => Err(ServerError::Decode(e)),
    }
}

/// Decodes a login message and reads the fields login reads (for the fuzz targets).
#[doc(hidden)]
pub(crate) fn parse_login_message(frame: &Frame) -> Result<(), ServerError> {
    let bad = ServerError::Decode;
    match frame.tag {
        tags::backend::NEGOTIATE_PROTOCOL_VERSION => return version::negotiated_minor(frame.body(), 2).map(drop),
        tags::backend::BACKEND_KEY_DATA => return version::backend_key(frame.body()).map(drop),
        _ => {}
    }
    match parse(frame)? {
        backend::Message::AuthenticationMd5Password(b) => drop(b.salt()),
        backend::Message::AuthenticationSasl(b) => {
            let mut mechs = b.mechanisms();
            while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs).map_err(bad)? {
                let _ = m == sasl::SCRAM_SHA_256;
            }
        }
        backend::Message::AuthenticationSaslContinue(b) => {
            let mut s = sasl::ScramSha256::new(b"pw", sasl::ChannelBinding::unsupported());
            s.update(b.data()).map_err(bad)?;
        }
        backend::Message::ParameterStatus(p) => drop((p.name().map_err(bad)?, p.value().map_err(bad)?)),
        backend::Message::ReadyForQuery(r) => drop(r.status()),
        _ => {}
    }
    Ok(())
}

impl ServerConn {
    /// Reads one whole message (bounded by [`MAX_SERVER_CONTROL_MESSAGE`]).
    ///
    /// # Cancel safety
    /// Cancel safe: partial data stays in `rbuf`.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, ServerError> {
        loop {
            if let Some(f) = split_frame(&mut self.rbuf, MAX_SERVER_CONTROL_MESSAGE)? {
                return Ok(f);
            }
            self.rbuf.reserve(8192);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                self.broken = true;
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection").into());
            }
        }
    }

    async fn send(&mut self, w: &[u8]) -> Result<(), ServerError> {
        let r = match self.stream.write_all(w).await {
            Ok(()) => self.stream.flush().await,
            Err(e) => Err(e),
        };
        r.map_err(|e| {
            self.broken = true;
            e.into()
        })
    }

    async fn login(&mut self, target: &ServerTarget) -> Result<(), ServerError> {
        let mut scram: Option<Scram> = None;
        let password = || {
            target
                .password
                .as_ref()
                .map(|p| p.0.as_bytes())
                .ok_or_else(|| ServerError::NoPassword(target.user.clone()))
        };
        loop {
            let frame = self.read_frame().await?;
            if self.read_version_or_key(&frame)? {
                continue;
            }
            let mut w = BytesMut::new();
            match parse(&frame)? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => frontend::password_message(password()?, &mut w)?,
                backend::Message::AuthenticationMd5Password(b) => {
                    let hash = md5_hash(target.user.as_bytes(), password()?, b.salt());
                    frontend::password_message(hash.as_bytes(), &mut w)?;
                }
                backend::Message::AuthenticationSasl(b) => {
                    let s = self.start_scram(&b, target, password)?;
                    frontend::sasl_initial_response(s.mechanism(), s.message(), &mut w)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(b) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ServerError::Protocol("unexpected SASLContinue".into()))?;
                    s.update(b.data()).map_err(ServerError::Decode)?;
                    frontend::sasl_response(s.message(), &mut w)?;
                }
                backend::Message::AuthenticationSaslFinal(b) => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| ServerError::Protocol("unexpected SASLFinal".into()))?;
                    s.finish(b.data()).map_err(ServerError::Signature)?;
                }
                backend::Message::AuthenticationGss | backend::Message::AuthenticationSspi => {
                    return Err(ServerError::UnsupportedAuth("GSSAPI/SSPI"))
                }
                backend::Message::AuthenticationKerberosV5 | backend::Message::AuthenticationScmCredential => {
                    return Err(ServerError::UnsupportedAuth("Kerberos/SCM"))
                }
                backend::Message::ParameterStatus(p) => self.set_param(
                    p.name().map_err(ServerError::Decode)?,
                    p.value().map_err(ServerError::Decode)?,
                ),
                backend::Message::ErrorResponse(_) => return Err(self.error_of(&frame)),
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(r) => {
                    self.status = r.status();
                    return Ok(());
                }
                _ => {
                    return Err(ServerError::Protocol(format!(
                        "unexpected message '{}' during login",
                        char::from(frame.tag)
                    )))
                }
            }
            if !w.is_empty() {
                self.send(&w).await?;
            }
        }
    }

    /// Brings a connection whose client left mid-transaction or mid-query back to idle: cancels
    /// what still runs, reads the answers due, rolls back. True when it is idle and clean
    /// within `timeout`; otherwise the caller closes it. Only when the relay left [`Recover`].
    pub(crate) async fn recover(&mut self, timeout: Duration) -> bool {
        let Some(r) = self.recover.take().filter(|_| !self.broken) else {
            return false;
        };
        let work = async {
            if r.answers_due > 0 {
                send_cancel(&self.addr, self.pid, &self.secret).await.ok()?;
                for _ in 0..r.answers_due {
                    loop {
                        let f = self.read_frame().await.ok()?;
                        match f.tag {
                            tags::backend::READY_FOR_QUERY => {
                                self.status = f.body().first().copied()?;
                                break;
                            }
                            // COPY started after all: the server waits for data; give up.
                            tags::backend::COPY_IN_RESPONSE | tags::backend::COPY_BOTH_RESPONSE => return None,
                            _ => {}
                        }
                    }
                }
            } else {
                self.status = r.status;
            }
            if matches!(self.status, tags::status::IN_TRANSACTION | tags::status::FAILED) {
                self.simple_query("ROLLBACK").await.ok()?;
            }
            self.is_clean().then_some(())
        };
        let ok = matches!(tokio::time::timeout(timeout, work).await, Ok(Some(())));
        if !ok {
            self.broken = true;
        }
        ok
    }

    /// The SCRAM exchange for AuthenticationSASL: with the configured password (channel
    /// binding over TLS when the server offers it), else with an auth_query user's keys.
    fn start_scram<'p>(
        &self,
        b: &backend::AuthenticationSaslBody,
        target: &ServerTarget,
        password: impl Fn() -> Result<&'p [u8], ServerError>,
    ) -> Result<Scram, ServerError> {
        let mut mechs = b.mechanisms();
        let (mut ok, mut plus) = (false, false);
        while let Ok(Some(m)) = fallible_iterator::FallibleIterator::next(&mut mechs) {
            ok |= m == sasl::SCRAM_SHA_256;
            plus |= m == sasl::SCRAM_SHA_256_PLUS;
        }
        if !ok && !plus {
            return Err(ServerError::UnsupportedAuth("SASL (without SCRAM-SHA-256)"));
        }
        if target.password.is_none() {
            if let Some(keys) = target.keys.as_ref().and_then(|k| k.get()).filter(|_| ok) {
                return Ok(Scram::Keys(scram::KeyScram::new(keys)));
            }
        }
        // Over TLS, channel binding when the server offers it ("y" when it does not).
        let (mechanism, binding) = match self.stream.channel_binding() {
            Some(hash) if plus => (
                sasl::SCRAM_SHA_256_PLUS,
                sasl::ChannelBinding::tls_server_end_point(hash),
            ),
            Some(_) => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
            None => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
        };
        Ok(Scram::Password(sasl::ScramSha256::new(password()?, binding), mechanism))
    }

    /// Reads NegotiateProtocolVersion and BackendKeyData during login (true when `frame`
    /// was one of them).
    fn read_version_or_key(&mut self, frame: &Frame) -> Result<bool, ServerError> {
        match frame.tag {
            tags::backend::NEGOTIATE_PROTOCOL_VERSION => {
                self.protocol_minor = version::negotiated_minor(frame.body(), self.protocol_minor)?;
            }
            tags::backend::BACKEND_KEY_DATA => (self.pid, self.secret) = version::backend_key(frame.body())?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn error_of(&self, frame: &Frame) -> ServerError {
        parse_server_error(frame)
            .map(ServerError::Postgres)
            .unwrap_or_else(|| ServerError::Protocol("malformed ErrorResponse".into()))
    }

    fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(n, _)| n == name) {
            Some(p) => p.1 = value.to_string(),
            None => self.params.push((name.to_string(), value.to_string())),
        }
    }

    /// Runs a simple query the proxy itself needs (reset, parameter application), ignoring its
    /// rows and tracking ParameterStatus. Returns PostgreSQL's error, if any, after the
    /// connection is back at ReadyForQuery.
    ///
    /// # Errors
    /// [`ServerError::Postgres`] when the query failed (the connection is still usable);
    /// anything else leaves the connection `broken`.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), ServerError> {
        let mut w = BytesMut::new();
        frontend::query(sql, &mut w)?;
        self.send(&w).await?;
        self.until_ready(None).await
    }

    /// Sends a simple Query and returns at once: the caller reads the answers (the listening
    /// connection of `notify`, which must see the notifications among them).
    ///
    /// # Errors
    /// The connection failed (it is then `broken`).
    pub(crate) async fn send_query(&mut self, sql: &str) -> Result<(), ServerError> {
        let mut w = BytesMut::new();
        frontend::query(sql, &mut w)?;
        self.send(&w).await
    }

    /// Runs `sql` with text parameters (extended protocol, unnamed statement) and returns its
    /// rows as text. For the proxy's own lookups (auth_query), never on a client's behalf.
    ///
    /// # Errors
    /// As [`ServerConn::simple_query`].
    pub(crate) async fn query_rows(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let mut w = BytesMut::new();
        frontend::parse("", sql, std::iter::empty(), &mut w)?;
        let bind = frontend::bind(
            "",
            "",
            std::iter::empty(),
            params.iter(),
            |p, buf| {
                buf.extend_from_slice(p.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            std::iter::empty(),
            &mut w,
        );
        bind.map_err(|_| ServerError::Protocol("cannot encode a parameter".into()))?;
        frontend::execute("", 0, &mut w)?;
        frontend::sync(&mut w);
        self.send(&w).await?;
        let mut rows = Vec::new();
        self.until_ready(Some(&mut rows)).await?;
        Ok(rows)
    }

    /// Reads until ReadyForQuery, tracking ParameterStatus and collecting DataRows into
    /// `rows` when given; the first ErrorResponse is returned after ReadyForQuery.
    async fn until_ready(&mut self, mut rows: Option<&mut Vec<Vec<Option<String>>>>) -> Result<(), ServerError> {
        let mut failure = None;
        loop {
            let frame = match self.read_frame().await {
                Ok(f) => f,
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            };
            match frame.tag {
                tags::backend::ERROR_RESPONSE => failure = Some(self.error_of(&frame)),
                tags::backend::PARAMETER_STATUS => {
                    if let Ok(backend::Message::ParameterStatus(p)) = parse(&frame) {
                        if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                            self.set_param(n, v);
                        }
                    }
                }
                tags::backend::DATA_ROW => {
                    if let (Some(rows), Ok(backend::Message::DataRow(d))) = (rows.as_mut(), parse(&frame)) {
                        let mut row = Vec::new();
                        let mut ranges = d.ranges();
                        while let Ok(Some(r)) = fallible_iterator::FallibleIterator::next(&mut ranges) {
                            row.push(r.map(|r| String::from_utf8_lossy(&d.buffer()[r]).into_owned()));
                        }
                        rows.push(row);
                    }
                }
                tags::backend::READY_FOR_QUERY => {
                    self.status = frame.body().first().copied().unwrap_or(b'?');
                    return failure.map_or(Ok(()), Err);
                }
                tags::backend::COPY_IN_RESPONSE
                | tags::backend::COPY_OUT_RESPONSE
                | tags::backend::COPY_BOTH_RESPONSE => {
                    self.broken = true;
                    return Err(ServerError::Protocol("COPY in a proxy query".into()));
                }
                _ => {}
            }
        }
    }

    /// Says goodbye (Terminate), best effort, before the connection is dropped.
    pub async fn terminate(&mut self) {
        let mut w = BytesMut::new();
        frontend::terminate(&mut w);
        let _ = self.send(&w).await;
    }

    /// True when the connection can serve another client: idle, nothing unread, not broken.
    pub(crate) fn is_clean(&self) -> bool {
        !self.broken && self.status == tags::status::IDLE && self.rbuf.is_empty()
    }
}

/// Sends a CancelRequest for backend `pid` with its whole `secret` (4 bytes from a 3.0
/// server, up to 256 from a 3.2 one) to `addr` and waits until the server has closed the
/// cancel connection (so the signal has been sent when this returns).
///
/// # Errors
/// The I/O error, or a timeout after 5 s.
pub(crate) async fn send_cancel(addr: &ServerAddr, pid: i32, secret: &[u8]) -> io::Result<()> {
    let work = async {
        let mut s = ServerStream::connect_addr(addr).await?;
        let mut w = BytesMut::new();
        version::cancel_request(pid, secret, &mut w);
        s.write_all(&w).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "cancel request timed out"))?
}

/// Quotes a string as an SQL literal (standard_conforming_strings on; `E''` when needed).
pub(crate) fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(quote_literal("x"), "'x'");
    }
}

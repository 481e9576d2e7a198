//! Why a client session ended early: whose fault, and what the client is told.
//!
//! Part of the client session ([`super`]): every step of the session returns
//! [`SessionError`], and the session's end logs it by its side and sends
//! [`SessionError::client_error`]. Errors of the steps it wraps (startup packet, framing,
//! admission, pool, server) answer for themselves; this only decides for its own variants.

use std::io;
use std::time::Duration;

use crate::admission::Refusal;
use crate::error::{sqlstate, PgError, Side, Sided};
use crate::pool::CheckoutError;
use crate::protocol::frame::FrameError;
use crate::protocol::startup::StartupError;
use crate::server::ServerError;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client closed or broke its connection.
    #[error("client connection lost: {0}")]
    ClientGone(#[source] io::Error),
    /// A bad first packet.
    #[error("{0}")]
    Startup(StartupError),
    /// A bad message header.
    #[error("{0}")]
    Frame(FrameError),
    /// Any other protocol violation by the client.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server broke the protocol (a bad message header while relaying).
    #[error("server protocol violation: {0}")]
    ServerProtocol(#[source] FrameError),
    /// Wrong password (or unknown user).
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    /// Unknown user under trust.
    #[error("role \"{0}\" does not exist")]
    UnknownRole(String),
    /// The client wants an auth method we do not do.
    #[error("{0}")]
    UnsupportedAuth(String),
    /// No such database.
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    /// `max_client_connections` reached.
    #[error("too many client connections")]
    TooManyClients(u32, String),
    /// Startup plus authentication took too long.
    #[error("client did not finish login within {0:?} (client_login_timeout)")]
    LoginTimeout(Duration),
    /// No server connection.
    #[error("{0}")]
    Checkout(#[from] CheckoutError),
    /// Refused by admission (a per-identity limit).
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// The server refused the client's parameters, or failed.
    #[error("{0}")]
    Server(#[from] ServerError),
    /// The proxy is shutting down.
    #[error("pgvalve is shutting down")]
    Shutdown,
    /// A feature the proxy does not offer.
    #[error("{0}")]
    Unsupported(String),
    /// A user not in admin_users/stats_users asked for the console.
    #[error("pgvalve: user \"{0}\" may not use the admin console (not in admin_users or stats_users)")]
    NotConsoleUser(String),
    /// Ended from outside (KILL_CLIENT) between two transactions.
    #[error("{}", .0.message)]
    Killed(PgError),
    /// A direct TLS client that cannot be served (no TLS configured, no ALPN "postgresql").
    #[error("{0}")]
    Tls(String),
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] io::Error),
    /// Plaintext with client_tls_mode = require.
    #[error("pgvalve: TLS is required (client_tls_mode = require): connection from {0} without encryption refused")]
    TlsRequired(std::net::IpAddr),
    /// Bytes after SSLRequest, before the handshake (they could be an attacker's).
    #[error("received unencrypted data after SSL request")]
    PlaintextAfterSslRequest,
    /// A PROXY protocol header that is refused: from an address not in
    /// `proxy_protocol_trusted`, missing from one that is, or malformed. The connection is
    /// closed without a reply (whoever sent it does not speak PostgreSQL yet).
    #[error("pgvalve: PROXY protocol header refused from {0}: {1}")]
    ProxyHeader(std::net::SocketAddr, String),
    /// Refused by hba_file (no line matches, a `reject` line, a certificate that does not
    /// name the user): PostgreSQL's 28000 with its message.
    #[error("{0}")]
    Hba(String),
}

/// A wrapped error answers for itself; the session's own variants are the client's, but for
/// what the server breaks and the proxy's own limits (the client cap, shutdown, KILL_CLIENT).
/// The SQLSTATE of a client that is gone (or whose TLS handshake broke, so nothing can be
/// sent) is PostgreSQL's for the same case: connection_failure, protocol_violation.
impl Sided for SessionError {
    fn side(&self) -> Side {
        use SessionError::*;
        match self {
            Startup(e) => e.side(),
            Frame(e) => e.side(),
            Checkout(e) => e.side(),
            Refused(e) => e.side(),
            Server(e) => e.side(),
            ClientGone(_)
            | Protocol(_)
            | AuthFailed(_)
            | UnknownRole(_)
            | UnsupportedAuth(_)
            | UnknownDatabase(_)
            | LoginTimeout(_)
            | Unsupported(_)
            | NotConsoleUser(_)
            | Tls(_)
            | TlsHandshake(_)
            | TlsRequired(_)
            | PlaintextAfterSslRequest
            | ProxyHeader(..)
            | Hba(_) => Side::Client,
            ServerProtocol(_) => Side::Server,
            TooManyClients(..) | Shutdown | Killed(_) => Side::Proxy,
        }
    }

    fn sqlstate(&self) -> &str {
        use SessionError::*;
        match self {
            Startup(e) => e.sqlstate(),
            Frame(e) => e.sqlstate(),
            Checkout(e) => e.sqlstate(),
            Refused(e) => e.sqlstate(),
            Server(e) => e.sqlstate(),
            Killed(e) => &e.code,
            ClientGone(_) | ServerProtocol(_) => sqlstate::CONNECTION_FAILURE,
            Protocol(_) | LoginTimeout(_) | Tls(_) | TlsHandshake(_) | PlaintextAfterSslRequest | ProxyHeader(..) => {
                sqlstate::PROTOCOL_VIOLATION
            }
            AuthFailed(_) => sqlstate::INVALID_PASSWORD,
            UnknownRole(_) | UnsupportedAuth(_) | TlsRequired(_) | Hba(_) => sqlstate::INVALID_AUTHORIZATION,
            UnknownDatabase(_) => sqlstate::INVALID_CATALOG_NAME,
            TooManyClients(..) => sqlstate::TOO_MANY_CONNECTIONS,
            Shutdown => sqlstate::ADMIN_SHUTDOWN,
            Unsupported(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            NotConsoleUser(_) => sqlstate::INSUFFICIENT_PRIVILEGE,
        }
    }
}

impl SessionError {
    /// What the client is told (None when it is gone), with the code of [`Sided::sqlstate`].
    pub(crate) fn client_error(&self) -> Option<PgError> {
        use SessionError::*;
        let fatal = |msg: String| PgError::fatal(self.sqlstate(), msg);
        Some(match self {
            ClientGone(_) | Tls(_) | TlsHandshake(_) | ProxyHeader(..) => return None,
            Checkout(e) => e.client_error(),
            Refused(r) => r.client_error(),
            Server(e) => e.client_error(),
            Killed(e) => e.clone(),
            TlsRequired(_) => {
                fatal(self.to_string()).with_hint("Connect with sslmode=require (or verify-ca / verify-full).")
            }
            TooManyClients(max, identity) => fatal(format!(
                "pgvalve: too many client connections (max_client_connections={max}); client \"{identity}\" refused"
            ))
            .with_hint("Retry later, close idle connections, or raise max_client_connections."),
            ServerProtocol(_) | LoginTimeout(_) => fatal(format!("pgvalve: {self}")),
            Startup(_)
            | Frame(_)
            | Protocol(_)
            | PlaintextAfterSslRequest
            | AuthFailed(_)
            | UnknownRole(_)
            | UnsupportedAuth(_)
            | Hba(_)
            | UnknownDatabase(_)
            | Shutdown
            | Unsupported(_)
            | NotConsoleUser(_) => fatal(self.to_string()),
        })
    }

    /// Logs why the session ended, at the level its side calls for.
    pub(super) fn log(&self) {
        match self.side() {
            Side::Client if matches!(self, SessionError::ClientGone(_)) => {
                tracing::debug!(error = %self, "session ended")
            }
            Side::Client => tracing::info!(error = %self, "client refused"),
            Side::Server => tracing::warn!(error = %self, "server failure"),
            Side::Config => tracing::warn!(error = %self, "configuration error"),
            Side::Proxy => tracing::info!(error = %self, "client refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Severity;

    fn gone() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer")
    }

    /// Every variant: side, SQLSTATE, and what the client is sent (None: nothing).
    #[allow(clippy::too_many_lines)] // a test: one row per variant
    #[test]
    fn session_errors_know_their_side_and_code() {
        use SessionError::*;
        let killed = PgError::fatal("57P01", "pgvalve: terminating connection: KILL_CLIENT");
        let refusal = Refusal::QueueFull {
            identity: "app".into(),
            waiting: 2,
            max: 2,
        };
        let cases: Vec<(SessionError, Side, &str, bool)> = vec![
            (ClientGone(gone()), Side::Client, "08006", false),
            (
                Startup(StartupError::BadLength { len: 4, max: 10000 }),
                Side::Client,
                "08P01",
                true,
            ),
            (
                Startup(StartupError::UnsupportedProtocol { major: 2, minor: 0 }),
                Side::Client,
                "0A000",
                true,
            ),
            (Frame(FrameError::BadLength(3)), Side::Client, "08P01", true),
            (Protocol("expected SASLResponse".into()), Side::Client, "08P01", true),
            (ServerProtocol(FrameError::BadLength(3)), Side::Server, "08006", true),
            (AuthFailed("app".into()), Side::Client, "28P01", true),
            (UnknownRole("app".into()), Side::Client, "28000", true),
            (
                UnsupportedAuth("client selected an invalid SASL mechanism".into()),
                Side::Client,
                "28000",
                true,
            ),
            (UnknownDatabase("nope".into()), Side::Client, "3D000", true),
            (TooManyClients(100, "app".into()), Side::Proxy, "53300", true),
            (LoginTimeout(Duration::from_secs(60)), Side::Client, "08P01", true),
            (Checkout(CheckoutError::Closed), Side::Proxy, "57P01", true),
            (Checkout(ServerError::Io(gone()).into()), Side::Server, "08006", true),
            (Refused(refusal), Side::Proxy, "53300", true),
            (
                Server(ServerError::Postgres(PgError::error("22023", "invalid value"))),
                Side::Server,
                "22023",
                true,
            ),
            (
                Server(ServerError::NoPassword("app".into())),
                Side::Config,
                "08006",
                true,
            ),
            (Shutdown, Side::Proxy, "57P01", true),
            (
                Unsupported("pgvalve does not proxy replication connections".into()),
                Side::Client,
                "0A000",
                true,
            ),
            (NotConsoleUser("app".into()), Side::Client, "42501", true),
            (Killed(killed), Side::Proxy, "57P01", true),
            (
                Tls("direct TLS connection but TLS is not configured".into()),
                Side::Client,
                "08P01",
                false,
            ),
            (TlsHandshake(gone()), Side::Client, "08P01", false),
            (TlsRequired([10, 0, 0, 1].into()), Side::Client, "28000", true),
            (PlaintextAfterSslRequest, Side::Client, "08P01", true),
            (
                ProxyHeader(([10, 0, 0, 1], 5000).into(), "not trusted".into()),
                Side::Client,
                "08P01",
                false,
            ),
            (
                Hba("pg_hba.conf rejects connection".into()),
                Side::Client,
                "28000",
                true,
            ),
        ];
        for (e, side, code, told) in cases {
            assert_eq!((e.side(), e.sqlstate()), (side, code), "{e}");
            match e.client_error() {
                Some(pg) => {
                    assert!(told, "{e}: nothing should be sent");
                    assert_eq!((pg.severity, pg.code.as_str()), (Severity::Fatal, code), "{e}");
                }
                None => assert!(!told, "{e}: an error should be sent"),
            }
        }
    }

    #[test]
    fn typed_causes_read_as_before() {
        let e = SessionError::ServerProtocol(FrameError::BadLength(2));
        assert_eq!(e.to_string(), "server protocol violation: invalid message length 2");
        let e = SessionError::TlsHandshake(gone());
        assert_eq!(e.to_string(), "TLS handshake failed: reset by peer");
        assert!(std::error::Error::source(&e).is_some());
    }
}

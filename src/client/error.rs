//! Why a client session ended early: whose fault, and what the client is told.
//!
//! Part of the client session ([`super`]): every step of the session returns
//! [`SessionError`], and the session's end logs it by its side and sends
//! [`SessionError::client_error`].

use std::io;
use std::time::Duration;

use crate::admission::Refusal;
use crate::error::{sqlstate, PgError, Side};
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
}

impl SessionError {
    /// Whose fault it is.
    pub fn side(&self) -> Side {
        use SessionError::*;
        match self {
            ClientGone(_)
            | Startup(_)
            | Frame(_)
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
            | PlaintextAfterSslRequest => Side::Client,
            ServerProtocol(_) | Server(_) | Checkout(CheckoutError::Server(_)) => Side::Server,
            TooManyClients(..) | Checkout(_) | Refused(_) | Shutdown | Killed(_) => Side::Proxy,
        }
    }

    /// What the client is told (None when it is gone).
    pub fn client_error(&self) -> Option<PgError> {
        use SessionError::*;
        let fatal = |code, msg: String| Some(PgError::fatal(code, msg));
        match self {
            ClientGone(_) | Tls(_) | TlsHandshake(_) => None,
            TlsRequired(_) => Some(
                PgError::fatal(sqlstate::INVALID_AUTHORIZATION, self.to_string())
                    .with_hint("Connect with sslmode=require (or verify-ca / verify-full)."),
            ),
            PlaintextAfterSslRequest => fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
            Startup(StartupError::UnsupportedProtocol { .. }) => {
                fatal(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string())
            }
            Startup(_) | Frame(_) | Protocol(_) => fatal(sqlstate::PROTOCOL_VIOLATION, self.to_string()),
            ServerProtocol(_) => fatal(sqlstate::CONNECTION_FAILURE, format!("pgvalve: {self}")),
            AuthFailed(_) => fatal(sqlstate::INVALID_PASSWORD, self.to_string()),
            UnknownRole(_) | UnsupportedAuth(_) => fatal(sqlstate::INVALID_AUTHORIZATION, self.to_string()),
            UnknownDatabase(_) => fatal(sqlstate::INVALID_CATALOG_NAME, self.to_string()),
            TooManyClients(max, identity) => Some(
                PgError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!("pgvalve: too many client connections (max_client_connections={max}); client \"{identity}\" refused"),
                )
                .with_hint("Retry later, close idle connections, or raise max_client_connections."),
            ),
            LoginTimeout(_) => fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgvalve: {self}")),
            Checkout(e) => Some(e.client_error()),
            Refused(r) => Some(r.client_error()),
            Server(e) => Some(e.client_error()),
            Shutdown => fatal(sqlstate::ADMIN_SHUTDOWN, "pgvalve is shutting down".into()),
            Unsupported(_) => fatal(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string()),
            NotConsoleUser(_) => fatal(sqlstate::INSUFFICIENT_PRIVILEGE, self.to_string()),
            Killed(e) => Some(e.clone()),
        }
    }

    /// Logs why the session ended, at the level its side calls for.
    pub(super) fn log(&self) {
        match self.side() {
            Side::Client if matches!(self, SessionError::ClientGone(_)) => {
                tracing::debug!(error = %self, "session ended")
            }
            Side::Client => tracing::info!(error = %self, "client refused"),
            Side::Server => tracing::warn!(error = %self, "server failure"),
            Side::Proxy => tracing::info!(error = %self, "client refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_causes_read_as_before() {
        let e = SessionError::ServerProtocol(FrameError::BadLength(2));
        assert_eq!(e.to_string(), "server protocol violation: invalid message length 2");
        let e = SessionError::TlsHandshake(io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer"));
        assert_eq!(e.to_string(), "TLS handshake failed: reset by peer");
        assert!(std::error::Error::source(&e).is_some());
    }
}

//! What can go wrong talking to PostgreSQL, whose fault it is and what the client is told.
//!
//! Part of the server connection ([`super`]); the pool hands these on to the client session
//! (inside `CheckoutError`), which sends [`ServerError::client_error`].

use std::io;
use std::time::Duration;

use crate::error::{sqlstate, PgError, Severity, Side, Sided};
use crate::protocol::frame::FrameError;

/// What can go wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TCP connect failed.
    #[error("cannot connect to server {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Connect plus login took longer than server_connect_timeout.
    #[error("timed out connecting to server {addr} after {timeout:?} (server_connect_timeout)")]
    ConnectTimeout {
        /// host:port.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
    /// An established connection failed.
    #[error("server connection lost: {0}")]
    Io(#[from] io::Error),
    /// The server sent a message header that cannot be accepted.
    #[error("server sent an invalid message: {0}")]
    Frame(#[from] FrameError),
    /// A server message that does not decode, or a SCRAM message that does not parse.
    #[error("server sent an invalid message: {0}")]
    Decode(#[source] io::Error),
    /// The server's SCRAM signature (SASLFinal) did not verify.
    #[error("server sent an invalid message: server signature: {0}")]
    Signature(#[source] io::Error),
    /// The server sent a message that is not valid where it came.
    #[error("server sent an invalid message: {0}")]
    Protocol(String),
    /// PostgreSQL refused with an ErrorResponse (login refused, bad parameter...).
    #[error("{0}")]
    Postgres(PgError),
    /// The server asked for an authentication method the proxy cannot do.
    #[error("server requested {0} authentication, which pgvalve does not support")]
    UnsupportedAuth(&'static str),
    /// The server asked for a password and none is configured.
    #[error("server requested a password for user \"{0}\" but none is configured (server_password)")]
    NoPassword(String),
    /// The server could not be reached lately; the pool waits before trying again.
    #[error("server {addr} is unreachable ({last}); pgvalve tries again in {} (server_login_retry)", humantime::format_duration(Duration::from_millis(retry_in.as_millis() as u64)))]
    Unreachable {
        /// host:port.
        addr: String,
        /// The last attempt's error, as it read (the error itself went to the client that
        /// made that attempt).
        last: String,
        /// Until the next attempt.
        retry_in: Duration,
    },
    /// The global cap on server connections is reached and nothing idle could be closed.
    #[error("no server connection slot free (max_server_connections={0})")]
    NoSlot(u32),
    /// Every slot of the pool's budget stayed in use (its connections and pgvalve's own).
    #[error("no server connection slot free in the pool (pool_size={0})")]
    PoolFull(u32),
    /// Every slot this instance holds of its cluster's budget stayed in use.
    #[error("no server connection slot free in the cluster's budget ({0} held by this instance now)")]
    ClusterFull(u32),
}

impl From<super::budget::Refused> for ServerError {
    fn from(r: super::budget::Refused) -> Self {
        use super::budget::{Refused, Scale};
        match r {
            Refused::Full {
                scale: Scale::Server,
                max,
            }
            | Refused::Last {
                scale: Scale::Server,
                max,
            } => ServerError::NoSlot(max),
            Refused::Full {
                scale: Scale::Pool,
                max,
            }
            | Refused::Last {
                scale: Scale::Pool,
                max,
            } => ServerError::PoolFull(max),
            Refused::Full {
                scale: Scale::Cluster,
                max,
            }
            | Refused::Last {
                scale: Scale::Cluster,
                max,
            } => ServerError::ClusterFull(max),
        }
    }
}

impl ServerError {
    /// The server could not be reached at all (or is starting up / shutting down): worth
    /// waiting before trying again, unlike a refused login.
    pub(crate) fn unreachable(&self) -> bool {
        match self {
            ServerError::Connect { .. } | ServerError::ConnectTimeout { .. } | ServerError::Io(_) => true,
            ServerError::Postgres(e) => e.code.starts_with("57P"),
            _ => false,
        }
    }

    /// The error the client is told.
    pub(crate) fn client_error(&self) -> PgError {
        let code = self.sqlstate();
        match self {
            ServerError::Postgres(e) => PgError { severity: Severity::Fatal, ..e.clone() },
            ServerError::Unreachable { .. } => PgError::fatal(code, format!("pgvalve: {self}"))
                .with_hint("Check that PostgreSQL is up and reachable from pgvalve; clients fail at once until it answers again."),
            ServerError::NoSlot(_) => PgError::fatal(code, format!("pgvalve: {self}"))
                .with_hint("Raise max_server_connections or lower pool sizes; idle server connections of other pools are closed first."),
            ServerError::PoolFull(_) => PgError::fatal(code, format!("pgvalve: {self}"))
                .with_hint("Raise pool_size (and PostgreSQL's max_connections), or shorten the sessions that hold server connections."),
            _ => PgError::fatal(code, format!("pgvalve: {self}")),
        }
    }
}

/// PostgreSQL's own refusals keep its SQLSTATE; every other failure to get or keep a
/// working connection is connection_failure, but for the proxy's own cap (too_many_connections)
/// and a password the configuration lacks.
impl Sided for ServerError {
    fn side(&self) -> Side {
        use ServerError::*;
        match self {
            Connect { .. }
            | ConnectTimeout { .. }
            | Io(_)
            | Frame(_)
            | Decode(_)
            | Signature(_)
            | Protocol(_)
            | Postgres(_)
            | UnsupportedAuth(_)
            | Unreachable { .. } => Side::Server,
            NoPassword(_) => Side::Config,
            NoSlot(_) | PoolFull(_) | ClusterFull(_) => Side::Proxy,
        }
    }

    fn sqlstate(&self) -> &str {
        use ServerError::*;
        match self {
            Postgres(e) => &e.code,
            NoSlot(_) | PoolFull(_) | ClusterFull(_) => sqlstate::TOO_MANY_CONNECTIONS,
            // Every other failure to get or keep a working connection.
            _ => sqlstate::CONNECTION_FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "os says no")
    }

    #[test]
    fn server_errors_know_their_side_and_code() {
        let addr = || "db:5432".to_string();
        let cases = [
            (
                ServerError::Connect {
                    addr: addr(),
                    source: os(io::ErrorKind::ConnectionRefused),
                },
                Side::Server,
                "08006",
            ),
            (
                ServerError::ConnectTimeout {
                    addr: addr(),
                    timeout: Duration::from_secs(5),
                },
                Side::Server,
                "08006",
            ),
            (ServerError::Io(os(io::ErrorKind::UnexpectedEof)), Side::Server, "08006"),
            (FrameError::BadLength(2).into(), Side::Server, "08006"),
            (
                ServerError::Decode(os(io::ErrorKind::InvalidData)),
                Side::Server,
                "08006",
            ),
            (
                ServerError::Signature(os(io::ErrorKind::InvalidData)),
                Side::Server,
                "08006",
            ),
            (ServerError::Protocol("truncated message".into()), Side::Server, "08006"),
            (
                ServerError::Postgres(PgError::error("3D000", "database \"x\" does not exist")),
                Side::Server,
                "3D000",
            ),
            (
                ServerError::Postgres(PgError::fatal("57P01", "terminating connection")),
                Side::Server,
                "57P01",
            ),
            (ServerError::UnsupportedAuth("GSSAPI/SSPI"), Side::Server, "08006"),
            (ServerError::NoPassword("app".into()), Side::Config, "08006"),
            (
                ServerError::Unreachable {
                    addr: addr(),
                    last: "refused".into(),
                    retry_in: Duration::from_secs(1),
                },
                Side::Server,
                "08006",
            ),
            (ServerError::NoSlot(10), Side::Proxy, "53300"),
            (ServerError::PoolFull(3), Side::Proxy, "53300"),
        ];
        for (e, side, code) in cases {
            assert_eq!((e.side(), e.sqlstate()), (side, code), "{e}");
            let told = e.client_error();
            assert_eq!((told.severity, told.code.as_str()), (Severity::Fatal, code), "{e}");
        }
    }

    #[test]
    fn typed_causes_read_as_before() {
        let frame = ServerError::from(FrameError::BadLength(2));
        assert_eq!(
            frame.to_string(),
            "server sent an invalid message: invalid message length 2"
        );
        assert!(std::error::Error::source(&frame).is_some());
        let sig = ServerError::Signature(io::Error::new(io::ErrorKind::InvalidData, "invalid server signature"));
        assert_eq!(
            sig.to_string(),
            "server sent an invalid message: server signature: invalid server signature"
        );
        assert!(!frame.unreachable() && !sig.unreachable());
    }
}

//! Refusals: every way admission says no, each an ErrorResponse with SQLSTATE 53300
//! (too_many_connections), a message naming the limit and the identity, and a HINT.
//!
//! Part of admission; the client session sends [`Refusal::client_error`] and closes. The
//! README lists every message.

use std::time::Duration;

use crate::error::{sqlstate, PgError, Side, Sided};

/// Why a client was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The identity has `max_client_connections` clients connected.
    #[error("pgvalve: client \"{identity}\" has {clients} client connections (max_client_connections={max})")]
    ClientCap {
        /// Identity.
        identity: String,
        /// Connected now.
        clients: u32,
        /// Its cap.
        max: u32,
    },
    /// Logins above `max_connect_rate` that would have had to wait too long for a token.
    #[error("pgvalve: client \"{identity}\" is connecting faster than {rate} per second (max_connect_rate={rate}, connect_burst={burst}){}", if *.damped { " while surging (surge_damping)" } else { "" })]
    ConnectRate {
        /// Identity.
        identity: String,
        /// The rate in force.
        rate: f64,
        /// The burst in force.
        burst: u32,
        /// True when the rate was lowered by surge damping.
        damped: bool,
    },
    /// `max_queue` clients of the identity are already waiting.
    #[error("pgvalve: client \"{identity}\" already has {waiting} clients waiting for a server connection (max_queue={max})")]
    QueueFull {
        /// Identity.
        identity: String,
        /// Waiting now.
        waiting: u32,
        /// Its bound.
        max: u32,
    },
    /// Waited `queue_timeout` while the identity held its `max_server_connections`.
    #[error("pgvalve: client \"{identity}\" has {held} server connections (max_server_connections={max}); waited {} ({key})", fmt(*.waited))]
    ServerCap {
        /// Identity.
        identity: String,
        /// Held now.
        held: u32,
        /// Its cap.
        max: u32,
        /// How long the client waited.
        waited: Duration,
        /// The setting that bounded the wait (queue_timeout or query_wait_timeout).
        key: &'static str,
    },
    /// Waited `queue_timeout` while the identity held all this instance may of its
    /// cluster-wide `cluster_max_server_connections` (the other instances hold the rest).
    #[error("pgvalve: client \"{identity}\" has {held} server connections here, its part of cluster_max_server_connections={max} across the cluster; waited {} ({key})", fmt(*.waited))]
    ClusterCap {
        /// Identity.
        identity: String,
        /// Held on this instance now.
        held: u32,
        /// The cluster-wide cap.
        max: u32,
        /// How long the client waited.
        waited: Duration,
        /// The setting that bounded the wait (queue_timeout or query_wait_timeout).
        key: &'static str,
    },
    /// Waited `queue_timeout` while the identity had `max_lock_holders` sessions holding
    /// dangerous locks.
    #[error("pgvalve: client \"{identity}\" has {holders} sessions holding dangerous locks (max_lock_holders={max}); waited {} ({key})", fmt(*.waited))]
    LockHolders {
        /// Identity.
        identity: String,
        /// Holders now.
        holders: u32,
        /// Its cap.
        max: u32,
        /// How long the client waited.
        waited: Duration,
        /// The setting that bounded the wait.
        key: &'static str,
    },
    /// Waited for a slot of the proxy-wide `max_server_connections` (all open, none idle).
    #[error("pgvalve: client \"{identity}\" waited {} for a server connection slot: all {max} are open and busy (max_server_connections={max})", fmt(*.waited))]
    ServerSlots {
        /// Identity.
        identity: String,
        /// The proxy-wide cap.
        max: u32,
        /// How long the client waited (query_wait_timeout).
        waited: Duration,
    },
    /// Waited `queue_timeout` while the identity held more than its share of the pool for
    /// whole sessions and only its `headroom` was free.
    #[error("pgvalve: client \"{identity}\" waited {} for a server connection ({key}): it holds {held} of the {pool_size} of {pool} for whole sessions, more than its share, and the last {headroom} are kept for other clients (headroom={headroom})", fmt(*.waited))]
    Headroom {
        /// Identity.
        identity: String,
        /// The pool, as `database "d" user "u"`.
        pool: String,
        /// Its size.
        pool_size: u32,
        /// Held by this identity.
        held: u32,
        /// The identity's headroom in this pool, in connections.
        headroom: u32,
        /// How long the client waited.
        waited: Duration,
        /// The setting that bounded the wait (queue_timeout or query_wait_timeout).
        key: &'static str,
    },
    /// Waited `queue_timeout` while the pool was full.
    #[error("pgvalve: client \"{identity}\" waited {} for a server connection ({key}): all {pool_size} of {pool} are in use (pool_size={pool_size}), {held} of them by \"{identity}\"", fmt(*.waited))]
    QueueTimeout {
        /// Identity.
        identity: String,
        /// The pool, as `database "d" user "u"`.
        pool: String,
        /// Its size.
        pool_size: u32,
        /// Held by this identity.
        held: u32,
        /// How long the client waited.
        waited: Duration,
        /// The setting that bounded the wait (queue_timeout or query_wait_timeout).
        key: &'static str,
    },
}

fn fmt(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

impl Refusal {
    /// The reason label (metrics, SHOW LIMITS).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ClientCap { .. } => "client_cap",
            Refusal::ConnectRate { .. } => "connect_rate",
            Refusal::QueueFull { .. } => "queue_full",
            Refusal::ServerCap { .. } => "server_cap",
            Refusal::ClusterCap { .. } => "cluster_cap",
            Refusal::QueueTimeout { .. } => "queue_timeout",
            Refusal::Headroom { .. } => "headroom",
            Refusal::LockHolders { .. } => "lock_holders",
            Refusal::ServerSlots { .. } => "server_slots",
        }
    }

    /// The identity refused.
    pub fn identity(&self) -> &str {
        match self {
            Refusal::ClientCap { identity, .. }
            | Refusal::ConnectRate { identity, .. }
            | Refusal::QueueFull { identity, .. }
            | Refusal::ServerCap { identity, .. }
            | Refusal::ClusterCap { identity, .. }
            | Refusal::QueueTimeout { identity, .. }
            | Refusal::Headroom { identity, .. }
            | Refusal::LockHolders { identity, .. }
            | Refusal::ServerSlots { identity, .. } => identity,
        }
    }

    /// What the client is told: FATAL 53300 with a hint.
    pub(crate) fn client_error(&self) -> PgError {
        let hint = match self {
            Refusal::ClientCap { .. } => {
                "Close idle connections of this application (or lower its connection pool size), or raise max_client_connections for this identity in pgvalve's config."
            }
            Refusal::ConnectRate { .. } => {
                "Reconnect with backoff, keep connections open (a connection pool in the application), or raise max_connect_rate / connect_burst for this identity."
            }
            Refusal::QueueFull { .. } => {
                "Too many requests of this application are waiting: retry with backoff, or raise max_queue for this identity."
            }
            Refusal::ServerCap { .. } => {
                "This application holds all the server connections it may: shorten its transactions, or raise max_server_connections for this identity."
            }
            Refusal::ClusterCap { .. } => {
                "This application holds all the server connections it may across the pgvalve cluster (SHOW CLUSTER shows the instances): shorten its transactions, or raise cluster_max_server_connections for this identity."
            }
            Refusal::ServerSlots { .. } => {
                "Raise max_server_connections (and PostgreSQL's max_connections) or lower pool sizes; idle server connections of other pools are closed first."
            }
            Refusal::LockHolders { .. } => {
                "Sessions of this application hold strong locks: end those transactions (SHOW LOCKS names them), or raise max_lock_holders for this identity."
            }
            Refusal::QueueTimeout { .. } => {
                "Retry later, shorten the transactions that hold server connections, or raise pool_size (and PostgreSQL's max_connections)."
            }
            Refusal::Headroom { .. } => {
                "This application keeps its server connections for whole sessions: close idle sessions (or use transaction pooling), raise pool_size, or lower headroom for this identity (headroom = 0: off)."
            }
        };
        PgError::fatal(self.sqlstate(), self.to_string()).with_hint(hint)
    }
}

/// Every refusal is a limit of the proxy, told as too_many_connections.
impl Sided for Refusal {
    fn side(&self) -> Side {
        Side::Proxy
    }

    fn sqlstate(&self) -> &str {
        sqlstate::TOO_MANY_CONNECTIONS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_the_proxys_53300() {
        let (identity, waited, key) = ("app".to_string(), Duration::from_secs(1), "queue_timeout");
        let all = [
            Refusal::ClientCap {
                identity: identity.clone(),
                clients: 3,
                max: 3,
            },
            Refusal::ConnectRate {
                identity: identity.clone(),
                rate: 1.0,
                burst: 1,
                damped: false,
            },
            Refusal::QueueFull {
                identity: identity.clone(),
                waiting: 2,
                max: 2,
            },
            Refusal::ServerCap {
                identity: identity.clone(),
                held: 1,
                max: 1,
                waited,
                key,
            },
            Refusal::ClusterCap {
                identity: identity.clone(),
                held: 2,
                max: 5,
                waited,
                key,
            },
            Refusal::LockHolders {
                identity: identity.clone(),
                holders: 1,
                max: 1,
                waited,
                key,
            },
            Refusal::ServerSlots {
                identity: identity.clone(),
                max: 4,
                waited,
            },
            Refusal::Headroom {
                identity: identity.clone(),
                pool: "database \"d\" user \"u\"".into(),
                pool_size: 40,
                held: 36,
                headroom: 4,
                waited,
                key,
            },
            Refusal::QueueTimeout {
                identity,
                pool: "database \"d\" user \"u\"".into(),
                pool_size: 2,
                held: 0,
                waited,
                key,
            },
        ];
        for r in all {
            assert_eq!((r.side(), r.sqlstate()), (Side::Proxy, "53300"), "{r}");
            assert_eq!(r.client_error().code, "53300", "{r}");
        }
    }
}

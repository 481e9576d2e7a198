//! The lock monitor's connections, one per database it watches, each inside the caps.
//!
//! Part of the lock monitor. A connection holds, for as long as it is open, a slot of the
//! budget of its database's pool of the monitor's user (`pool_size`) and so one of
//! `max_server_connections` (see `server::budget`): it is pgvalve's own connection, counted
//! like the pool's. The slot is a lasting claim:
//! - it is taken when the monitor starts (its first poll runs at once, before the clients'
//!   load) and kept until the connection is lost, so a saturated pool cannot take it away;
//! - when it has to be taken while the budget is full (a database first used under load, a
//!   reconnect after PostgreSQL restarted while clients hold every slot), the claim goes before
//!   every pool: the pool's share shrinks by one, an idle connection is closed at once if
//!   there is one, else the next connection that comes back to the pool (at the end of a
//!   transaction in transaction mode, of a session in session mode) is closed and its slot
//!   goes to the monitor. The claim waits across polls without holding the monitor up;
//! - it never takes a budget's last slot: with `pool_size = 1` (or `max_server_connections`
//!   too small for one connection per database beside the clients) that database is not
//!   watched, with one WARN saying why.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_util::task::AbortOnDropHandle;

use super::Target;
use crate::config::ServerTls;
use crate::server::budget::{Budget, Hold, Refused};
use crate::server::ServerStream;

/// Time allowed to connect and log in.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Slot(#[from] Refused),
    #[error(transparent)]
    Connect(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("timed out after {CONNECT_TIMEOUT:?}")]
    Timeout,
    #[error("its cluster slot is no longer leased to this instance")]
    SeatLost,
}

enum Seat {
    Open(tokio_postgres::Client),
    /// Waiting for a slot, then connecting.
    Opening(AbortOnDropHandle<Result<tokio_postgres::Client, Failed>>),
}

/// The monitor's connections by database.
#[derive(Default)]
pub(super) struct Conns {
    seats: HashMap<Target, Seat>,
    /// Targets not watched because a lasting slot would be the budget's last (warned once).
    refused: HashSet<Target>,
}

impl Conns {
    /// Closes connections (and withdraws waiting claims) to targets no longer watched.
    pub(super) fn keep(&mut self, targets: &[(Target, Arc<Budget>)]) {
        let live: HashSet<&Target> = targets.iter().map(|(t, _)| t).collect();
        self.seats.retain(|t, _| live.contains(t));
        self.refused.retain(|t| live.contains(t));
    }

    /// The open connection to `t`, if it is open; otherwise starts opening it with a slot of
    /// `budget` and waits up to `wait` (the poll's timeout, also its statement timeout) for
    /// that the first time (later polls only look).
    pub(super) async fn ready(
        &mut self,
        t: &Target,
        budget: &Arc<Budget>,
        wait: Duration,
    ) -> Option<&tokio_postgres::Client> {
        let fresh = !self.seats.contains_key(t);
        if fresh && !self.room(t, budget) {
            return None;
        }
        let seat = self.seats.entry(t.clone()).or_insert_with(|| {
            let (t, budget) = (t.clone(), budget.clone());
            Seat::Opening(AbortOnDropHandle::new(tokio::spawn(async move {
                open(&t, &budget, wait).await
            })))
        });
        if let Seat::Opening(h) = seat {
            let opened = if fresh {
                tokio::time::timeout(wait, &mut *h).await.ok()?
            } else if h.is_finished() {
                h.await
            } else {
                return None;
            };
            match opened {
                Ok(Ok(client)) => *seat = Seat::Open(client),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, db = %t.dbname, "lock monitor cannot connect; retrying next poll");
                    self.seats.remove(t);
                    return None;
                }
                Err(_) => {
                    self.seats.remove(t);
                    return None;
                }
            }
        }
        self.client(t)
    }

    /// Whether a lasting slot may be claimed for `t` (warns once when not).
    fn room(&mut self, t: &Target, budget: &Arc<Budget>) -> bool {
        match budget.lasting_room() {
            Ok(()) => {
                self.refused.remove(t);
                true
            }
            Err(r) => {
                if self.refused.insert(t.clone()) {
                    tracing::warn!(
                        db = %t.dbname,
                        user = %t.user,
                        "lock monitor: not watching this database: its connection would take the last slot ({r}); raise that setting or set [locks] user to a user with a pool of its own"
                    );
                }
                false
            }
        }
    }

    /// Every open connection.
    pub(super) fn open(&self) -> impl Iterator<Item = &tokio_postgres::Client> {
        self.seats.values().filter_map(|s| match s {
            Seat::Open(c) => Some(c),
            _ => None,
        })
    }

    /// The open connection to `t`.
    pub(super) fn client(&self, t: &Target) -> Option<&tokio_postgres::Client> {
        match self.seats.get(t) {
            Some(Seat::Open(c)) => Some(c),
            _ => None,
        }
    }

    /// The connection to `t` failed: it is opened again (with a new slot) next poll.
    pub(super) fn lost(&mut self, t: &Target) {
        self.seats.remove(t);
    }

    /// Closes the connections (and withdraws the claims) of the targets `gone` says.
    pub(super) fn drop_where(&mut self, gone: impl Fn(&Target) -> bool) {
        self.seats.retain(|t, _| !gone(t));
    }
}

/// Claims a lasting slot of `budget` (as long as it takes), then connects (without TLS, as
/// before: `server_tls_mode` applies to the pools); the slot lives as long as the connection,
/// and until PostgreSQL has closed it (see `server::close`).
async fn open(t: &Target, budget: &Arc<Budget>, timeout: Duration) -> Result<tokio_postgres::Client, Failed> {
    let slot = budget.claim(Hold::Lasting, None).await?;
    let mut cfg = tokio_postgres::Config::from_str("postgres://")?;
    cfg.dbname(&t.dbname)
        .user(&t.user)
        .application_name("pgvalve lock monitor")
        .options(format!("-c statement_timeout={}", timeout.as_millis()));
    if let Some(p) = &t.password {
        cfg.password(p);
    }
    let connect = async {
        let (stream, _) = ServerStream::connect(&t.host, t.port, &ServerTls::default()).await?;
        let dup = stream.dup()?;
        let (client, conn) = cfg.connect_raw(stream, NoTls).await?;
        Ok::<_, Failed>((client, conn, dup))
    };
    let (client, conn, dup) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| Failed::Timeout)??;
    let seat = slot.seat().map(|s| (s.class, s.index, s.holder));
    tokio::spawn(async move {
        let _ = conn.await;
        crate::server::close::release_after(dup, slot).await;
    });
    // In a cluster: the connection takes its slot's marker before it is used.
    if let Some((class, index, holder)) = seat {
        use crate::server::seat::{CHECK_SQL, MARK_SQL};
        let marked: bool = client
            .query_one(MARK_SQL, &[&class, &index])
            .await
            .map(|r| r.get::<_, String>(0) == "true")?;
        let ok = client
            .query_one(CHECK_SQL, &[&i64::from(class), &i64::from(index), &holder])
            .await
            .map(|r| r.get::<_, String>(0) == "true")?;
        if !(marked && ok) {
            return Err(Failed::SeatLost);
        }
    }
    Ok(client)
}

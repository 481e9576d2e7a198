//! Seats: the numbered slots of a cluster's budget, and how a server connection proves, in
//! PostgreSQL, that it sits on one.
//!
//! Part of the server side, under the pools. A leased [`super::budget::Budget`] (an instance's
//! lease of its cluster) gives each slot taken a [`Seat`]: a slot number that this instance's
//! coordination connection holds the lease lock of. Right after logging in, the connection
//! takes the seat's marker lock itself ([`verify`]), so the slot stays taken in PostgreSQL's
//! eyes for as long as the connection lives, whatever happens to the coordination connection.
//! The protocol and its proof are in docs/cluster.md.

use std::sync::Arc;

use super::{ServerConn, ServerError};

/// Error for a connection whose seat was lost (see [`verify`]).
pub(crate) fn lost() -> ServerError {
    ServerError::Protocol("its cluster slot is no longer leased to this instance (coordination connection lost)".into())
}

/// Lock object id of slot `n`'s lease (held by the coordination connection that leases it);
/// slot `n`'s marker (held by the connection that sits on it) is `n` itself.
pub const LEASE_BASE: i64 = 1_000_000;

/// What assigns seats to the slots of a leased budget.
pub trait Seats: Send + Sync {
    /// A leased slot number no connection sits on (None: none; the caller is refused).
    fn assign(&self) -> Option<Seat>;
    /// Slot `index` is free again (its connection is gone).
    fn unassign(&self, index: i32);
}

/// One leased slot a connection sits on; handed back when dropped.
pub struct Seat {
    /// The cluster's advisory lock class.
    pub class: i32,
    /// The slot number.
    pub index: i32,
    /// Backend pid of the coordination connection holding the slot's lease.
    pub holder: i32,
    /// Where it goes back.
    pub owner: Arc<dyn Seats>,
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat")
            .field("index", &self.index)
            .field("holder", &self.holder)
            .finish()
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.owner.unassign(self.index);
    }
}

/// Takes the seat's marker lock (shared, never waiting).
pub const MARK_SQL: &str = "SELECT pg_try_advisory_lock_shared($1::int4, $2::int4)::text";

/// Then checks, in one snapshot of pg_locks (all databases), that the lease is still held by
/// the coordination connection that assigned the seat and that no other backend sits on it.
pub const CHECK_SQL: &str = "SELECT (EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
     AND classid::int8 = $1::int8 AND objid::int8 = $2::int8 + 1000000 AND pid = $3::int4 AND granted) \
     AND NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
     AND classid::int8 = $1::int8 AND objid::int8 = $2::int8 AND pid <> pg_backend_pid()))::text";

/// Takes the marker of the seat of `conn`'s slot on `conn` and checks the lease (see
/// [`CHECK_SQL`]); nothing to do for a slot without a seat (no cluster). False: the seat is
/// lost (its lease went with a lost coordination connection); the caller drops the
/// connection, which never served anyone.
///
/// # Errors
/// The queries failed.
pub(crate) async fn verify(conn: &mut ServerConn) -> Result<bool, ServerError> {
    let Some((class, index, holder)) = conn
        .slot
        .as_ref()
        .and_then(|s| s.seat())
        .map(|s| (s.class.to_string(), s.index.to_string(), s.holder.to_string()))
    else {
        return Ok(true);
    };
    let marked = conn.query_rows(MARK_SQL, &[class.as_str(), index.as_str()]).await?;
    let checked = conn
        .query_rows(CHECK_SQL, &[class.as_str(), index.as_str(), holder.as_str()])
        .await?;
    let sits = yes(&marked) && yes(&checked);
    if !sits {
        tracing::debug!(seat = %index, "cluster seat lost while the connection logged in; closed unused");
    }
    Ok(sits)
}

/// The one text cell is "true".
fn yes(rows: &[Vec<Option<String>>]) -> bool {
    rows.first().and_then(|r| r.first()).and_then(|c| c.as_deref()) == Some("true")
}

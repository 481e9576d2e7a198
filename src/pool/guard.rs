//! The checkout guard: a server connection lent to one client session.
//!
//! Part of the pool. Returning a connection is explicit ([`PooledConn::release`] resets it with
//! `server_reset_query` first); a guard dropped any other way — an error, a panic, a cancelled
//! task — closes the connection instead, so a server connection in an unknown state is never
//! handed to another client. A backend left mid-query also gets a cancel request. A
//! connection whose server failed takes the pool's idle connections with it. A connection
//! whose slot one of pgvalve's own connections waits for (see `server::budget`) is closed
//! instead of going back.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use deadpool::managed::Object;

use super::manager::ServerManager;
use crate::admission::ServerGrant;
use crate::protocol::tags;
use crate::server::{send_cancel, ServerConn};

/// A server connection checked out of a pool, with the admission grant it was taken under.
/// Fields drop in order: the connection is back in the pool (or closed) before the grant is
/// given back, so the next client granted never finds the pool full.
#[derive(Debug)]
pub struct PooledConn {
    obj: Option<Object<ServerManager>>,
    _grant: Option<ServerGrant>,
}

impl PooledConn {
    pub(crate) fn new(obj: Object<ServerManager>, grant: Option<ServerGrant>) -> Self {
        Self {
            obj: Some(obj),
            _grant: grant,
        }
    }

    /// Returns the connection to its pool after running `reset_query` (bounded by `timeout`),
    /// or closes it if it is not idle and clean or the reset fails.
    pub async fn release(self, reset_query: &str, timeout: Duration) {
        // Boxed: once per session, and kept out of the session's future.
        Box::pin(self.release_now(reset_query, timeout)).await
    }

    async fn release_now(mut self, reset_query: &str, timeout: Duration) {
        let Some(mut obj) = self.obj.take() else {
            return;
        };
        if wanted(&obj) {
            return discard(obj);
        }
        if obj.is_clean() && !reset_query.is_empty() {
            let reset = tokio::time::timeout(timeout, obj.simple_query(reset_query)).await;
            if !matches!(reset, Ok(Ok(()))) {
                tracing::warn!(
                    pid = obj.pid,
                    "server reset query failed; closing the server connection"
                );
                obj.broken = true;
            }
        }
        if obj.is_clean() {
            obj.applied = 0;
            if !reset_query.is_empty() {
                // DISCARD ALL (the usual reset) deallocates prepared statements.
                obj.prepared.clear();
            }
            obj.idle_since = Instant::now();
            obj.answered_at = None;
            give_back(obj);
        } else {
            discard(obj);
        }
    }

    /// Transaction mode: returns the connection between two transactions of one client,
    /// without a reset (the client's parameters stay applied, see `ServerConn::applied`), or
    /// closes it if it is not idle and clean.
    pub(crate) fn checkin(mut self) {
        let Some(mut obj) = self.obj.take() else {
            return;
        };
        if obj.is_clean() && !wanted(&obj) {
            obj.idle_since = obj.answered_at.take().unwrap_or_else(Instant::now);
            give_back(obj);
        } else {
            discard(obj);
        }
    }
}

/// Back to its pool, or to another core's part when its own holds more than its lease (the
/// lease shrank under busy connections, see `pool::shards`): deadpool would close it;
/// handed over, the part that took the lease reuses it instead of logging a new one in.
fn give_back(obj: Object<ServerManager>) {
    match Object::pool(&obj) {
        Some(pool) if over_lease(&pool) => {
            let conn = Object::take(obj);
            pool.manager().incoming.put(conn);
        }
        _ => drop(obj),
    }
}

/// Whether `pool` is a part of a pool split over cores holding more than its lease.
fn over_lease(pool: &super::manager::Pool) -> bool {
    let m = pool.manager();
    if m.lease() >= m.size() {
        return false;
    }
    let s = pool.status();
    s.size > s.max_size
}

/// A claim waits for this connection's slot: it closes rather than going back.
fn wanted(obj: &Object<ServerManager>) -> bool {
    obj.slot.as_ref().is_some_and(|s| s.wanted())
}

fn discard(obj: Object<ServerManager>) {
    if obj.broken {
        // The server failed under this connection: when PostgreSQL restarts or crashes, every
        // backend goes at once, so the pool's idle connections are closed too rather than
        // handed to the next clients one failure at a time.
        if let Some(pool) = Object::pool(&obj) {
            // The other cores' parts probe theirs before reusing them (see pool::manager).
            pool.manager().incoming.server_failed();
            let closed = pool.retain(|_, _| false).removed.len();
            if closed > 0 {
                tracing::info!(
                    closed,
                    "server connection failed; closed the pool's idle connections too"
                );
            }
        }
    }
    let conn = Object::take(obj);
    if conn.status != tags::status::IDLE || !conn.rbuf.is_empty() {
        // The backend may be busy in a query: cancel it so its transaction ends now rather
        // than when it next writes to the closed socket.
        let (addr, pid, secret) = (conn.addr.clone(), conn.pid, conn.secret.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = send_cancel(&addr, pid, &secret).await;
            });
        }
    }
    tracing::debug!(pid = conn.pid, "server connection closed");
    drop(conn);
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(obj) = self.obj.take() {
            discard(obj);
        }
    }
}

impl Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.obj.as_ref().expect("invariant: present until release/discard")
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.obj.as_mut().expect("invariant: present until release/discard")
    }
}

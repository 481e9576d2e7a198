//! A place in the fair queue for a server connection, waited on by the caller.
//!
//! Part of admission. [`super::Admission::request`] grants at once or queues; a queued
//! client waits on [`Queued::granted`] under a timer of its own (the session uses one timer
//! for both the queued NOTICE and the queue timeout) and calls [`Queued::give_up`] when the
//! timeout passes. Dropping a `Queued` leaves the queue, or gives back a grant that arrived
//! meanwhile (cancel safety).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Admission, Refusal, ServerGrant};

/// What [`Admission::request`] decided.
#[derive(Debug)]
pub enum Acquired<'a> {
    /// A grant, now.
    Granted(ServerGrant),
    /// Queued: wait on it.
    Queued(Queued<'a>),
}

/// A client waiting in the fair queue.
#[derive(Debug)]
pub struct Queued<'a> {
    pub(super) admission: &'a Admission,
    pub(super) pool: &'a Arc<str>,
    pub(super) identity: &'a Arc<str>,
    pub(super) ticket: u64,
    pub(super) rx: oneshot::Receiver<()>,
    pub(super) pool_size: u32,
    pub(super) timeout: Duration,
    pub(super) since: Instant,
    /// Still in the queue (or holding an unclaimed grant): cleaned up on drop.
    pub(super) armed: bool,
}

impl Queued<'_> {
    /// When it was queued.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// How long it may wait (the identity's `queue_timeout`, else `query_wait_timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits for the grant; with it, how long the wait was. Cancel safe: after a cancelled
    /// call the client is still queued.
    ///
    /// # Errors
    /// [`Refusal::QueueTimeout`] or [`Refusal::ServerCap`] only if the queue entry vanished
    /// without a grant, which the scheduler never does.
    pub async fn granted(&mut self) -> Result<(ServerGrant, Duration), Refusal> {
        let woke = (&mut self.rx).await.is_ok();
        self.admission.finish_wait(self, woke)
    }

    /// Leaves the queue after waiting too long: the refusal to tell the client, or the grant
    /// if it arrived just now.
    ///
    /// # Errors
    /// [`Refusal::QueueTimeout`], or [`Refusal::ServerCap`] when the identity's own cap held
    /// it back.
    pub fn give_up(mut self) -> Result<(ServerGrant, Duration), Refusal> {
        // A grant that arrived has taken the client out of the queue: leaving it then fails,
        // and the grant is kept.
        self.admission.finish_wait(&mut self, false)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.admission.state();
            if !st.sched.cancel(self.pool, self.identity, self.ticket) {
                // Granted just before the drop: give it straight back.
                st.sched.release(self.pool, self.identity);
            }
        }
    }
}

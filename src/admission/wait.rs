//! A place in the fair queue for a server connection, waited on by the caller.
//!
//! Part of admission. [`super::Admission::request`] grants at once or queues; a queued
//! client waits on [`Queued::next`], which ends with the grant, with the word that its
//! NOTICE is due (then it waits again), or with its timeout. The waiter needs no timer: the
//! queue clock ([`super::Admission::queue_clock`]) sends both in time. Dropping a `Queued`
//! leaves the queue, or gives back a grant that arrived meanwhile (cancel safety).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::cores::Core;
use super::queue::Signal;
use super::{count, shown, Admission, Hold, Refusal, ServerGrant};

/// What [`Admission::request`] decided.
#[derive(Debug)]
pub enum Acquired<'a> {
    /// A grant, now.
    Granted(ServerGrant),
    /// Queued: wait on it.
    Queued(Queued<'a>),
}

/// What a wait in the queue came to (see [`Queued::next`]).
#[derive(Debug)]
pub enum Waited {
    /// The grant, and how long the client waited for it.
    Granted(ServerGrant, Duration),
    /// The client has waited its `queue_notice_after` and is still queued: tell it, and wait
    /// again.
    Notice,
}

/// A client waiting in the fair queue.
#[derive(Debug)]
pub struct Queued<'a> {
    pub(super) admission: &'a Admission,
    /// The core whose scheduler holds the gate.
    pub(super) core: &'a Arc<Core>,
    pub(super) pool: &'a Arc<str>,
    pub(super) identity: &'a Arc<str>,
    pub(super) ticket: u64,
    pub(super) rx: oneshot::Receiver<Signal>,
    pub(super) pool_size: u32,
    /// How long the grant will be held.
    pub(super) hold: Hold,
    pub(super) timeout: Duration,
    pub(super) since: Instant,
    /// Still in the queue (or holding an unclaimed grant): cleaned up on drop.
    pub(super) armed: bool,
}

impl Queued<'_> {
    /// How long it may wait (the identity's `queue_timeout`, else `query_wait_timeout`).
    #[cfg(test)]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Waits for what comes next: the grant, or the NOTICE being due. Cancel safe: after a
    /// cancelled call the client is still queued.
    ///
    /// # Errors
    /// [`Refusal::QueueTimeout`], [`Refusal::ServerCap`] when the identity's own cap held it
    /// back, or [`Refusal::Headroom`] when the headroom did, once the client has waited its
    /// timeout.
    pub async fn next(&mut self) -> Result<Waited, Refusal> {
        match (&mut self.rx).await {
            Ok(Signal::Granted) => {
                let (g, waited) = self.finish();
                Ok(Waited::Granted(g, waited))
            }
            Ok(Signal::Notice(rx)) => {
                self.rx = rx;
                Ok(Waited::Notice)
            }
            // Err: the queue dropped the entry without a word, which it never does; no grant
            // came with it either way.
            Ok(Signal::TimedOut) | Err(_) => Err(self.timed_out()),
        }
    }

    /// When it is the headroom that keeps the client waiting (connections are free, but its
    /// identity holds more than its share of the pool for whole sessions): (connections the
    /// identity holds in the pool, the headroom in connections). For the queued NOTICE.
    pub fn held_back(&self) -> Option<(u32, u32)> {
        self.core.lock().sched.held_back(self.pool, self.identity, self.hold)
    }

    /// It was granted: the grant, with how long it waited.
    fn finish(&mut self) -> (ServerGrant, Duration) {
        self.armed = false;
        let (id, waited) = (self.identity, self.since.elapsed());
        let mut st = self.core.lock();
        st.count_grant(id, true);
        let events = &self.admission.inner.events;
        let h = match st.waits.get(&super::names::Same(id)) {
            Some(h) => h.clone(),
            None => st
                .waits
                .entry(id.clone())
                .or_insert_with(|| events.queue_wait(id))
                .clone(),
        };
        drop(st);
        h.record(waited.as_secs_f64());
        let grant = ServerGrant {
            core: self.core.clone(),
            pool: self.pool.clone(),
            identity: id.clone(),
            hold: self.hold,
        };
        (grant, waited)
    }

    /// It waited its timeout (the queue clock took it out): the refusal, which names what
    /// kept it waiting.
    fn timed_out(&mut self) -> Refusal {
        self.armed = false;
        let (pool, id, waited) = (self.pool, self.identity, self.timeout);
        let (held_back, gate_held, grants) = {
            let st = self.core.lock();
            let s = &st.sched;
            (s.held_back(pool, id, self.hold), s.gate_held(pool, id), s.grants(id))
        };
        let held = self.admission.totals(id).servers;
        let mut st = self.admission.state();
        let limits = st.ids.get(&**id).map(|i| i.limits.clone());
        let (max, key, cluster) = limits.map_or((0, "query_wait_timeout", 0), |l| {
            (l.max_servers, l.queue_timeout_key, l.cluster_max_servers)
        });
        let (identity, pool_size) = (id.to_string(), self.pool_size);
        let r = if max > 0 && held >= max {
            Refusal::ServerCap {
                identity,
                held,
                max,
                waited,
                key,
            }
        } else if cluster > 0 && held >= grants {
            Refusal::ClusterCap {
                identity,
                held,
                max: cluster,
                waited,
                key,
            }
        } else if let Some((held, headroom)) = held_back {
            let pool = shown(pool).to_string();
            Refusal::Headroom {
                identity,
                pool,
                pool_size,
                held,
                headroom,
                waited,
                key,
            }
        } else {
            let pool = shown(pool).to_string();
            Refusal::QueueTimeout {
                identity,
                pool,
                pool_size,
                held: gate_held,
                waited,
                key,
            }
        };
        count(&mut st, id, |c| *c.refused.entry(r.reason()).or_default() += 1);
        r
    }
}

/// Whether a grant is waiting in `rx` (following NOTICEs not yet read).
fn holds_grant(rx: &mut oneshot::Receiver<Signal>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(Signal::Granted) => return true,
            Ok(Signal::Notice(next)) => *rx = next,
            Ok(Signal::TimedOut) | Err(_) => return false,
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.core.lock();
            // Not in the queue any more: granted (give it straight back) or timed out. Both
            // are decided under this lock, so the signal is in the channel already.
            if !st.sched.cancel(self.pool, self.identity, self.ticket) && holds_grant(&mut self.rx) {
                st.sched.release(self.pool, self.identity, self.hold);
            }
        }
    }
}

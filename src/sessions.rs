//! The registry of client sessions: who each client is and which backend it is using now.
//!
//! Beside the flow: a session registers after login and leaves when it ends (RAII); it
//! records its server connection's backend pid on checkout and clears it on checkin (two
//! atomic stores on the hot path, no lock). The lock monitor maps backend pids to sessions
//! through [`Sessions::by_backend`] and can hand a session a [`Verdict`] that ends its
//! transaction with an explanatory error. Between polls the relay tells the registry when a
//! session's transaction ends (ReadyForQuery 'I'), so the monitor releases that session's
//! locks at once instead of at the next poll. When PostgreSQL tells a session it lost a
//! deadlock (40P01), the relay reports it here with the sessions that used the other
//! backends of the cycle at that moment; the lock monitor takes the reports off the relay's
//! path (see [`DeadlockReport`]). The relay also keeps a sample of each session's last
//! statement (its first transaction, then one in [`SAMPLE_EVERY`]): the lock monitor reads
//! the routes behind a surge from it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};

use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};
use tokio::sync::Notify;

use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::error::PgError;

/// An order from outside (the lock monitor) to end a session's transaction now: the relay
/// closes the server connection (PostgreSQL rolls back) and tells the client `error`.
/// Waiting costs the relay no lock: a flag and an atomic waker.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    delivered: AtomicBool,
    /// Boxed: rare, and every session carries the slot.
    error: Mutex<Option<Box<PgError>>>,
    waker: AtomicWaker,
}

impl Verdict {
    /// Delivers `error` to the session (the first verdict wins).
    pub(crate) fn deliver(&self, error: PgError) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(Box::new(error));
            self.delivered.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// Drops a verdict not acted on (the transaction it was for has ended).
    pub(crate) fn clear(&self) {
        if self.delivered.swap(false, Ordering::AcqRel) {
            self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// Waits for a verdict (cancel-safe; a verdict delivered earlier is seen at once).
    pub(crate) async fn wait(&self) -> PgError {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            // Read before the swap: polled with every wake of the session, it is almost
            // never set (a read-modify-write costs more than a read).
            if self.delivered.load(Ordering::Acquire) && self.delivered.swap(false, Ordering::AcqRel) {
                if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Poll::Ready(*e);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// One client session.
#[derive(Debug)]
pub struct SessionInfo {
    /// Proxy-wide session id.
    pub id: u64,
    /// Who the client is.
    pub client: SessionClient,
    /// When it logged in.
    pub connected: SystemTime,
    /// The same moment on the monotonic clock: times the session keeps are counted from it.
    born: Instant,
    backend: AtomicI32,
    /// When the current backend was assigned, in µs after `born`, plus one (0: none).
    backend_since: AtomicU64,
    /// The protocol minor version pgvalve speaks with the current backend (SHOW SERVERS).
    backend_minor: AtomicU8,
    /// Orders for this session.
    pub(crate) verdict: Verdict,
    /// KILL_CLIENT: the verdict stays until the session has ended.
    killed: AtomicBool,
    /// Transactions (and single statements outside one) that ended: ReadyForQuery 'I' seen.
    ends: AtomicU64,
    /// The monitor recorded this session holding a dangerous lock: the next end of its
    /// transaction wakes the monitor.
    holds_locks: AtomicBool,
    /// Wakes the lock monitor (shared by all sessions of a proxy).
    released: Arc<Notify>,
    /// Set while the monitor has cancelled this session's query: the explanation that
    /// replaces PostgreSQL's "canceling statement due to user request".
    cancel_pending: AtomicBool,
    /// Boxed: rare, and every session carries the slot.
    cancel_note: Mutex<Option<Box<PgError>>>,
    /// The registry, for deadlock reports (which name the other sessions of the cycle).
    registry: Weak<Sessions>,
    /// A recent statement of the session, sampled by the relay (surges name routes from it).
    sample: Mutex<Option<Box<str>>>,
}

/// The relay samples a session's statement at its first transaction end, then once in this
/// many.
pub const SAMPLE_EVERY: u64 = 16;

/// A deadlock PostgreSQL told a session it lost (40P01), as the relay saw it: the backends
/// of the cycle, each with the session that used it at that moment (None: external).
#[derive(Debug, Clone)]
pub struct DeadlockReport {
    /// When the relay saw the error.
    pub at: SystemTime,
    /// The losing session's backend.
    pub loser_pid: i32,
    /// The losing session.
    pub loser: Option<Arc<SessionInfo>>,
    /// The losing session's statement as the relay last saw it (bounded).
    pub statement: String,
    /// The DETAIL's processes (empty when it had another shape).
    pub waits: Vec<crate::protocol::deadlock::Wait>,
    /// Every backend of the cycle with its session then.
    pub parties: Vec<(i32, Option<Arc<SessionInfo>>)>,
}

impl SessionInfo {
    /// PostgreSQL told this session, on backend `pid`, that it lost a deadlock with `detail`;
    /// `statement` is its last statement. Cold path: the relay calls it on 40P01 only. The
    /// report names the sessions using the cycle's backends now and waits for the monitor.
    pub(crate) fn deadlock(&self, pid: i32, detail: &str, statement: String) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let waits = crate::protocol::deadlock::parse_detail(detail);
        let mut pids = crate::protocol::deadlock::pids(&waits);
        if !pids.contains(&pid) {
            pids.insert(0, pid);
        }
        let by_backend = registry.by_backend();
        let loser = registry
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.id)
            .cloned();
        let parties = pids
            .into_iter()
            .map(|p| {
                let s = if p == pid {
                    loser.clone()
                } else {
                    by_backend.get(&p).cloned()
                };
                (p, s)
            })
            .collect();
        let report = DeadlockReport {
            at: SystemTime::now(),
            loser_pid: pid,
            loser,
            statement,
            waits,
            parties,
        };
        let mut q = registry.deadlocks.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() < MAX_PENDING_DEADLOCKS {
            q.push(report);
        }
        drop(q);
        registry.deadlock_seen.notify_one();
    }

    /// Records the backend serving the session now, handed to it `at` (a time the caller
    /// has: a clock reading per transaction costs more than it tells).
    pub(crate) fn set_backend(&self, pid: i32, at: Instant) {
        self.backend.store(pid, Ordering::Relaxed);
        let us = at.saturating_duration_since(self.born).as_micros() as u64;
        self.backend_since.store(us.saturating_add(1), Ordering::Relaxed);
    }

    /// The session has no backend now.
    pub(crate) fn no_backend(&self) {
        self.backend.store(0, Ordering::Relaxed);
    }

    /// Records the protocol minor version spoken with the current backend (2: 3.2).
    pub(crate) fn set_backend_minor(&self, minor: u16) {
        self.backend_minor.store(minor.min(255) as u8, Ordering::Relaxed);
    }

    /// The protocol minor version spoken with the current backend.
    pub(crate) fn backend_minor(&self) -> u16 {
        u16::from(self.backend_minor.load(Ordering::Relaxed))
    }

    /// When the current backend was assigned.
    pub(crate) fn backend_since(&self) -> Option<SystemTime> {
        match self.backend_since.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.connected + std::time::Duration::from_micros(us - 1)),
        }
    }

    /// Ends the session (KILL_CLIENT): it closes with `e`, in a transaction or between two.
    pub fn kill(&self, e: PgError) {
        self.killed.store(true, Ordering::Release);
        self.verdict.deliver(e);
    }

    /// Whether KILL_CLIENT was ordered.
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// The session gave its server connection back: a verdict meant for that transaction is
    /// dropped (not a kill).
    pub(crate) fn transaction_over(&self) {
        if !self.killed() {
            self.verdict.clear();
        }
    }

    /// The backend serving the session now, if any.
    pub fn backend(&self) -> Option<i32> {
        Some(self.backend.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    /// The relay saw `n` ReadyForQuery 'I': every transaction-level lock the session held is
    /// gone. Wakes the monitor when it recorded the session holding one; drops a cancel
    /// explanation that was not needed. True when the relay should keep a sample of the
    /// session's last statement now (its first transaction, then one in [`SAMPLE_EVERY`]).
    pub(crate) fn transactions_ended(&self, n: u64) -> bool {
        let before = self.ends.fetch_add(n, Ordering::SeqCst);
        if self.holds_locks.load(Ordering::SeqCst) && self.holds_locks.swap(false, Ordering::SeqCst) {
            self.released.notify_one();
        }
        if self.cancel_pending.load(Ordering::Relaxed) {
            self.take_cancel_note();
        }
        before == 0 || before / SAMPLE_EVERY != (before + n) / SAMPLE_EVERY
    }

    /// Keeps `sql` as the session's sampled statement (bounded by the relay).
    #[cold]
    pub(crate) fn sample_statement(&self, sql: &[u8]) {
        let s: Box<str> = String::from_utf8_lossy(sql).into();
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    /// The last statement sampled from the session (see [`Self::transactions_ended`]).
    pub fn sampled_statement(&self) -> Option<String> {
        self.sample
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            .map(str::to_string)
    }

    /// How many transactions the session has ended so far.
    pub fn ends(&self) -> u64 {
        self.ends.load(Ordering::SeqCst)
    }

    /// The monitor saw the session hold a dangerous lock in a poll taken when [`Self::ends`]
    /// was `before`. False when that transaction has ended since (the lock is gone); true when
    /// the relay will wake the monitor at its end.
    pub(crate) fn mark_holding(&self, before: u64) -> bool {
        self.holds_locks.store(true, Ordering::SeqCst);
        if self.ends() != before {
            self.holds_locks.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The monitor cancels the session's query: `e` replaces PostgreSQL's cancel error.
    pub(crate) fn explain_cancel(&self, e: PgError) {
        *self.cancel_note.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(e));
        self.cancel_pending.store(true, Ordering::Release);
    }

    /// A cancel explanation is waiting (one atomic load; the relay checks it per server read).
    pub(crate) fn cancel_pending(&self) -> bool {
        self.cancel_pending.load(Ordering::Acquire)
    }

    /// Takes the cancel explanation.
    pub(crate) fn take_cancel_note(&self) -> Option<PgError> {
        self.cancel_pending.store(false, Ordering::Release);
        self.cancel_note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|e| *e)
    }
}

/// Who a session's client is, as it registers.
#[derive(Debug, Clone)]
pub struct SessionClient {
    /// Client identity.
    pub identity: Arc<str>,
    /// User.
    pub user: String,
    /// Database.
    pub database: String,
    /// application_name.
    pub application_name: String,
    /// Client address.
    pub addr: SocketAddr,
    /// The proxy's address the client connected to.
    pub(crate) local: Option<SocketAddr>,
}

/// Sessions pinned to their server connection in transaction mode, by reason (a pin is
/// rare: a lock is fine).
#[derive(Debug, Default)]
pub struct Pins(Mutex<HashMap<&'static str, u64>>);

impl Pins {
    /// Counts one pin.
    pub fn add(&self, reason: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// Pins so far, by reason.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort();
        v
    }

    /// Pins so far.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

/// Deadlock reports kept for the monitor at most (more are dropped: it is not taking them).
const MAX_PENDING_DEADLOCKS: usize = 1024;

/// All sessions of one proxy.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    released: Arc<Notify>,
    /// Deadlock reports not yet taken by the monitor.
    deadlocks: Mutex<Vec<DeadlockReport>>,
    deadlock_seen: Notify,
}

/// Keeps a session registered; it leaves the registry when dropped.
#[derive(Debug)]
pub(crate) struct Registered {
    sessions: Arc<Sessions>,
    /// The session.
    pub info: Arc<SessionInfo>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.sessions
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.info.id);
    }
}

impl Sessions {
    /// Registers a session.
    pub(crate) fn register(self: &Arc<Self>, client: SessionClient) -> Registered {
        let info = Arc::new(SessionInfo {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            client,
            connected: SystemTime::now(),
            born: Instant::now(),
            backend: AtomicI32::new(0),
            backend_since: AtomicU64::new(0),
            backend_minor: AtomicU8::new(0),
            verdict: Verdict::default(),
            killed: AtomicBool::new(false),
            ends: AtomicU64::new(0),
            holds_locks: AtomicBool::new(false),
            released: self.released.clone(),
            cancel_pending: AtomicBool::new(false),
            cancel_note: Mutex::new(None),
            registry: Arc::downgrade(self),
            sample: Mutex::new(None),
        });
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(info.id, info.clone());
        Registered {
            sessions: self.clone(),
            info,
        }
    }

    /// Every session, by id.
    pub fn all(&self) -> Vec<Arc<SessionInfo>> {
        let mut v: Vec<_> = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Resolves when a session the monitor recorded holding a dangerous lock ends its
    /// transaction (or at once when that happened since the last call).
    pub async fn released(&self) {
        self.released.notified().await;
    }

    /// Resolves when a deadlock was reported (or at once when one was since the last call).
    pub async fn deadlock_seen(&self) {
        self.deadlock_seen.notified().await;
    }

    /// Takes the deadlock reports not yet taken.
    pub fn take_deadlocks(&self) -> Vec<DeadlockReport> {
        std::mem::take(&mut *self.deadlocks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every session's [`SessionInfo::ends`] now, by session id.
    pub fn ends(&self) -> HashMap<u64, u64> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| (s.id, s.ends()))
            .collect()
    }

    /// Sessions that hold a server connection now, by backend pid.
    pub(crate) fn by_backend(&self) -> HashMap<i32, Arc<SessionInfo>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|s| s.backend().map(|pid| (pid, s.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registry_and_verdicts() {
        let sessions = Arc::new(Sessions::default());
        let new = SessionClient {
            identity: Arc::from("web"),
            user: "app".into(),
            database: "app".into(),
            application_name: "web-1".into(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            local: None,
        };
        let a = sessions.register(new.clone());
        let b = sessions.register(new);
        a.info
            .set_backend(4242, Instant::now() + std::time::Duration::from_secs(60));
        assert_eq!(sessions.by_backend().get(&4242).map(|s| s.id), Some(a.info.id));
        let since = a
            .info
            .backend_since()
            .unwrap()
            .duration_since(a.info.connected)
            .unwrap();
        assert!((59..=61).contains(&since.as_secs()), "{since:?} after login");
        assert_eq!(sessions.all().len(), 2);
        drop(b);
        assert_eq!(sessions.all().len(), 1);
        a.info.verdict.deliver(PgError::fatal("57P01", "first"));
        a.info.verdict.deliver(PgError::fatal("57P01", "second"));
        assert_eq!(a.info.verdict.wait().await.message, "first");

        // A recorded holder wakes the monitor when its transaction ends; a stale record does not stick.
        assert!(a.info.mark_holding(0));
        a.info.transactions_ended(1);
        tokio::time::timeout(std::time::Duration::from_secs(1), sessions.released())
            .await
            .expect("woken");
        assert!(!a.info.mark_holding(0), "that transaction has ended");
        assert_eq!(sessions.ends()[&a.info.id], 1);
        a.info.explain_cancel(PgError::error("57014", "why"));
        assert!(a.info.cancel_pending());
        a.info.transactions_ended(1);
        assert!(!a.info.cancel_pending() && a.info.take_cancel_note().is_none());
    }
}

//! The registry of client sessions: who each client is and which backend it is using now.
//!
//! Beside the flow: a session registers after login and leaves when it ends (RAII); it
//! records its server connection's backend pid on checkout and clears it on checkin (two
//! atomic stores on the hot path, no lock). The lock monitor maps backend pids to sessions
//! through [`Sessions::by_backend`] and can hand a session a [`Verdict`] that ends its
//! transaction with an explanatory error. Between polls the relay tells the registry when a
//! session's transaction ends (ReadyForQuery 'I'), so the monitor releases that session's
//! locks at once instead of at the next poll.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use std::sync::{Arc, Mutex};
use std::time::SystemTime;
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
            if self.delivered.swap(false, Ordering::AcqRel) {
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
    backend: AtomicI32,
    /// When the current backend was assigned (unix ms; 0: none).
    backend_since: AtomicU64,
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
}

impl SessionInfo {
    /// Records the backend serving the session now (0: none).
    pub(crate) fn set_backend(&self, pid: i32) {
        self.backend.store(pid, Ordering::Relaxed);
        if pid != 0 {
            let ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            self.backend_since.store(ms, Ordering::Relaxed);
        }
    }

    /// When the current backend was assigned.
    pub(crate) fn backend_since(&self) -> Option<SystemTime> {
        match self.backend_since.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
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
    /// explanation that was not needed.
    pub(crate) fn transactions_ended(&self, n: u64) {
        self.ends.fetch_add(n, Ordering::SeqCst);
        if self.holds_locks.load(Ordering::SeqCst) && self.holds_locks.swap(false, Ordering::SeqCst) {
            self.released.notify_one();
        }
        if self.cancel_pending.load(Ordering::Relaxed) {
            self.take_cancel_note();
        }
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
    pub(crate) fn by_reason(&self) -> Vec<(&'static str, u64)> {
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

/// All sessions of one proxy.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    released: Arc<Notify>,
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
            backend: AtomicI32::new(0),
            backend_since: AtomicU64::new(0),
            verdict: Verdict::default(),
            killed: AtomicBool::new(false),
            ends: AtomicU64::new(0),
            holds_locks: AtomicBool::new(false),
            released: self.released.clone(),
            cancel_pending: AtomicBool::new(false),
            cancel_note: Mutex::new(None),
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
        a.info.set_backend(4242);
        assert_eq!(sessions.by_backend().get(&4242).map(|s| s.id), Some(a.info.id));
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

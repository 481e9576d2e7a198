//! The registry of client sessions: who each client is and which backend it is using now.
//!
//! Beside the flow: a session registers after login and leaves when it ends (RAII); it
//! records its server connection's backend pid on checkout and clears it on checkin (two
//! atomic stores on the hot path, no lock). The lock monitor maps backend pids to sessions
//! through [`Sessions::by_backend`] and can hand a session a [`Verdict`] that ends its
//! transaction with an explanatory error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::error::PgError;

/// An order from outside (the lock monitor) to end a session's transaction now: the relay
/// closes the server connection (PostgreSQL rolls back) and tells the client `error`.
/// Waiting costs the relay no lock: a flag and an atomic waker.
#[derive(Debug, Default)]
pub struct Verdict {
    delivered: AtomicBool,
    error: Mutex<Option<PgError>>,
    waker: AtomicWaker,
}

impl Verdict {
    /// Delivers `error` to the session (the first verdict wins).
    pub fn deliver(&self, error: PgError) {
        let mut e = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_none() {
            *e = Some(error);
            self.delivered.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// Drops a verdict not acted on (the transaction it was for has ended).
    pub fn clear(&self) {
        if self.delivered.swap(false, Ordering::AcqRel) {
            self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// Waits for a verdict (cancel-safe; a verdict delivered earlier is seen at once).
    pub async fn wait(&self) -> PgError {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.delivered.swap(false, Ordering::AcqRel) {
                if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Poll::Ready(e);
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
    /// Orders for this session.
    pub verdict: Verdict,
    /// The session's relay waits for verdicts (its identity had an acting lock policy when it
    /// logged in); otherwise the monitor signals its backend directly.
    pub listening: AtomicBool,
}

impl SessionInfo {
    /// Records the backend serving the session now (0: none).
    pub fn set_backend(&self, pid: i32) {
        self.backend.store(pid, Ordering::Relaxed);
    }

    /// The backend serving the session now, if any.
    pub fn backend(&self) -> Option<i32> {
        Some(self.backend.load(Ordering::Relaxed)).filter(|&p| p != 0)
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
    pub local: Option<SocketAddr>,
}

/// All sessions of one proxy.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Arc<SessionInfo>>>,
}

/// Keeps a session registered; it leaves the registry when dropped.
#[derive(Debug)]
pub struct Registered {
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
    pub fn register(self: &Arc<Self>, client: SessionClient) -> Registered {
        let info = Arc::new(SessionInfo {
            id: self.next.fetch_add(1, Ordering::Relaxed) + 1,
            client,
            connected: SystemTime::now(),
            backend: AtomicI32::new(0),
            verdict: Verdict::default(),
            listening: AtomicBool::new(false),
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

    /// Sessions that hold a server connection now, by backend pid.
    pub fn by_backend(&self) -> HashMap<i32, Arc<SessionInfo>> {
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
    }
}

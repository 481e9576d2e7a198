//! Cancel routing: the BackendKeyData keys pgvalve gives clients, mapped to whichever backend
//! serves each client right now.
//!
//! The secret is always pgvalve's own (a client never learns a backend's secret). The pid is
//! the real backend's in session mode, where one backend serves the client for its whole
//! session, so `pg_backend_pid()`, pg_stat_activity and NotificationResponse agree with it. In
//! transaction mode it is pgvalve's own, chosen above Linux's largest process id
//! ([`SYNTHETIC_PIDS`]), so it never names another client's backend. Keys are looked up by
//! pid *and* secret: two backends of different servers may share a pid.
//!
//! Beside the flow: a client session registers its key at login and points it at a server
//! connection while it holds one; the listener hands CancelRequests here. Clearing the target
//! waits for a cancel being forwarded, so a late cancel can never reach the next client of
//! that server connection ("Canceling Requests in Progress" in the protocol docs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ring::rand::{SecureRandom, SystemRandom};

use crate::server::{send_cancel, ServerAddr};

/// The backend a cancel should reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CancelTarget {
    /// Server address.
    pub addr: ServerAddr,
    /// Backend pid.
    pub pid: i32,
    /// Backend key.
    pub secret: i32,
}

type Slot = Arc<tokio::sync::Mutex<Option<CancelTarget>>>;

/// Where transaction-mode pids start: above `PID_MAX_LIMIT` (2^22), the largest process id
/// Linux hands out, so a pid pgvalve makes up is never a real backend's.
pub(crate) const SYNTHETIC_PIDS: u32 = 1 << 22;

/// Keys of all live sessions of one proxy, by (pid, secret).
#[derive(Debug)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<(i32, i32), Slot>>,
    next_pid: AtomicU32,
    rng: SystemRandom,
}

impl Default for CancelRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelRegistry {
    /// An empty registry.
    pub(crate) fn new() -> Self {
        let rng = SystemRandom::new();
        let mut seed = [0u8; 2];
        let _ = rng.fill(&mut seed);
        Self {
            sessions: Mutex::new(HashMap::new()),
            next_pid: AtomicU32::new(u32::from(u16::from_be_bytes(seed))),
            rng,
        }
    }

    /// Issues a key for a new session with the real backend's `pid` (session mode) or one of
    /// pgvalve's own (None); the key is forgotten when the handle drops.
    pub(crate) fn register(self: &Arc<Self>, pid: Option<i32>) -> CancelKey {
        let slot: Slot = Arc::default();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let (pid, secret) = loop {
            let mut b = [0u8; 4];
            let _ = self.rng.fill(&mut b);
            let secret = i32::from_be_bytes(b);
            let pid = pid.unwrap_or_else(|| self.synthetic_pid());
            if !sessions.contains_key(&(pid, secret)) {
                break (pid, secret);
            }
        };
        sessions.insert((pid, secret), slot.clone());
        CancelKey {
            pid,
            secret,
            slot,
            registry: self.clone(),
        }
    }

    /// The next made-up pid: in `SYNTHETIC_PIDS..=i32::MAX`.
    fn synthetic_pid(&self) -> i32 {
        let n = self.next_pid.fetch_add(1, Ordering::Relaxed) % (i32::MAX as u32 - SYNTHETIC_PIDS + 1);
        (SYNTHETIC_PIDS + n) as i32
    }

    /// Handles a CancelRequest: forwards it if the key matches a session that holds a server
    /// connection. Wrong keys are ignored silently, as PostgreSQL does.
    pub(crate) async fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        let Ok(secret) = <[u8; 4]>::try_from(secret) else {
            return false;
        };
        let slot = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            match sessions.get(&(pid, i32::from_be_bytes(secret))) {
                Some(slot) => slot.clone(),
                None => return false,
            }
        };
        let target = slot.lock().await;
        match &*target {
            Some(t) => {
                if let Err(e) = send_cancel(&t.addr, t.pid, t.secret).await {
                    tracing::warn!(error = %e, "forwarding a cancel request failed");
                }
                true
            }
            None => false,
        }
    }
}

/// One session's cancel key.
#[derive(Debug)]
pub(crate) struct CancelKey {
    /// The pid the client was given.
    pub pid: i32,
    /// The secret the client was given.
    pub secret: i32,
    slot: Slot,
    registry: Arc<CancelRegistry>,
}

impl CancelKey {
    /// Points cancels at `target` (or nowhere). Waits for a cancel in flight to finish.
    pub(crate) async fn set_target(&self, target: Option<CancelTarget>) {
        // Uncontended but for a cancel being forwarded: no wait (and no future) then.
        match self.slot.try_lock() {
            Ok(mut slot) => *slot = target,
            Err(_) => *self.slot.lock().await = target,
        }
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        let mut sessions = self.registry.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&(self.pid, self.secret));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_pids_are_above_every_real_process_id() {
        let r = Arc::new(CancelRegistry::new());
        r.next_pid.store(u32::MAX - 3, Ordering::Relaxed);
        for _ in 0..8 {
            let k = r.register(None);
            assert!(k.pid >= SYNTHETIC_PIDS as i32, "{}", k.pid);
        }
    }

    #[test]
    fn sessions_with_the_same_backend_pid_keep_apart_keys() {
        let r = Arc::new(CancelRegistry::new());
        let a = r.register(Some(4242));
        let b = r.register(Some(4242));
        assert_eq!((a.pid, b.pid), (4242, 4242));
        assert_ne!(a.secret, b.secret);
        assert_eq!(r.sessions.lock().unwrap().len(), 2);
        drop(a);
        let sessions = r.sessions.lock().unwrap();
        assert!(sessions.contains_key(&(4242, b.secret)));
        assert_eq!(sessions.len(), 1);
    }
}

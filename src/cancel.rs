//! Cancel routing: the proxy's own BackendKeyData keys, mapped to whichever backend serves
//! each client right now.
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

/// Keys of all live sessions of one proxy.
#[derive(Debug)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, Slot)>>,
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
            next_pid: AtomicU32::new(u32::from(u16::from_be_bytes(seed)) + 1),
            rng,
        }
    }

    /// Issues a key for a new session; the key is forgotten when the handle drops.
    pub(crate) fn register(self: &Arc<Self>) -> CancelKey {
        let mut b = [0u8; 4];
        let _ = self.rng.fill(&mut b);
        let secret = i32::from_be_bytes(b);
        let slot: Slot = Arc::default();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = (self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff) as i32;
            if pid != 0 && !sessions.contains_key(&pid) {
                break pid;
            }
        };
        sessions.insert(pid, (secret, slot.clone()));
        CancelKey {
            pid,
            secret,
            slot,
            registry: self.clone(),
        }
    }

    /// Handles a CancelRequest: forwards it if the key matches a session that holds a server
    /// connection. Wrong keys are ignored silently, as PostgreSQL does.
    pub(crate) async fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        let slot = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            match sessions.get(&pid) {
                Some((s, slot)) if secret == s.to_be_bytes() => slot.clone(),
                _ => return false,
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
        sessions.remove(&self.pid);
    }
}

//! Cancel routing: the BackendKeyData keys pgvalve gives clients, mapped to whichever backend
//! serves each client right now.
//!
//! The secret is always pgvalve's own (a client never learns a backend's secret): 4 bytes for
//! a protocol 3.0 client, 32 for a client that speaks 3.2 (PostgreSQL 18's length; 3.2 allows
//! up to 256), whatever the server behind speaks. The pid is
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
//!
//! In a `[cluster]`, a CancelRequest whose key is not this instance's is forwarded, once, to
//! the instance that issued it ([`forward`]); a transaction-mode pid carries the issuing
//! instance's tag in its high bits (docs/cluster.md, "Cancel requests").

mod forward;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ring::rand::{SecureRandom, SystemRandom};

use crate::cluster::Cluster;
use crate::server::{send_cancel, ServerAddr};

/// The backend a cancel should reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CancelTarget {
    /// Server address.
    pub addr: ServerAddr,
    /// Backend pid.
    pub pid: i32,
    /// Backend key: the server's own, 4 bytes (protocol 3.0) or up to 256 (3.2).
    pub secret: bytes::Bytes,
}

type Slot = Arc<tokio::sync::Mutex<Option<CancelTarget>>>;

/// Longest secret pgvalve gives (protocol 3.2; PostgreSQL 18 gives 32 bytes too).
pub(crate) const LONG_SECRET: usize = 32;

/// A secret given to a client: 4 bytes (protocol 3.0) or [`LONG_SECRET`] (3.2), kept inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Secret {
    bytes: [u8; LONG_SECRET],
    len: u8,
}

impl Secret {
    /// The secret as sent in BackendKeyData and CancelRequest.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The secret a CancelRequest carries (None for a length pgvalve never gives).
    fn from_slice(s: &[u8]) -> Option<Secret> {
        if s.len() != 4 && s.len() != LONG_SECRET {
            return None;
        }
        let mut bytes = [0u8; LONG_SECRET];
        bytes[..s.len()].copy_from_slice(s);
        Some(Secret {
            bytes,
            len: s.len() as u8,
        })
    }
}

/// Where transaction-mode pids start: above `PID_MAX_LIMIT` (2^22), the largest process id
/// Linux hands out, so a pid pgvalve makes up is never a real backend's.
pub(crate) const SYNTHETIC_PIDS: u32 = 1 << 22;

/// Where a takeover's successor queues cancel requests (pid, secret) for its predecessor.
pub(crate) type ToPredecessor = tokio::sync::mpsc::Sender<(i32, Vec<u8>)>;

/// Keys of all live sessions of one proxy, by (pid, secret).
#[derive(Debug)]
pub(crate) struct CancelRegistry {
    sessions: Mutex<HashMap<(i32, Secret), Slot>>,
    next_pid: AtomicU32,
    rng: SystemRandom,
    /// This instance's cluster: its tag goes into made-up pids, unknown keys are forwarded.
    cluster: Option<Arc<Cluster>>,
    /// While a takeover's predecessor still serves clients: where keys this process does not
    /// know go (they may be those clients').
    predecessor: std::sync::Mutex<Option<ToPredecessor>>,
    /// Cancel requests for the predecessor dropped because its queue was full.
    dropped: AtomicU32,
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
            cluster: None,
            predecessor: std::sync::Mutex::new(None),
            dropped: AtomicU32::new(0),
        }
    }

    /// A registry for an instance of `cluster` (None: as [`CancelRegistry::new`]).
    pub(crate) fn in_cluster(cluster: Option<Arc<Cluster>>) -> Self {
        Self { cluster, ..Self::new() }
    }

    /// Issues a key for a new session with the real backend's `pid` (session mode) or one of
    /// pgvalve's own (None), with a secret of 4 bytes, or of [`LONG_SECRET`] for a client that
    /// speaks protocol 3.2 (`long`); the key is forgotten when the handle drops.
    pub(crate) fn register(self: &Arc<Self>, pid: Option<i32>, long: bool) -> CancelKey {
        let slot: Slot = Arc::default();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let len = if long { LONG_SECRET } else { 4 };
        let (pid, secret) = loop {
            let mut secret = Secret {
                bytes: [0; LONG_SECRET],
                len: len as u8,
            };
            let _ = self.rng.fill(&mut secret.bytes[..len]);
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

    /// Registers the key a client was given by another process (a takeover's predecessor),
    /// so its cancels keep working here; None when the secret's length is not one pgvalve
    /// gives or the key is taken already.
    pub(crate) fn adopt(self: &Arc<Self>, pid: i32, secret: &[u8]) -> Option<CancelKey> {
        let secret = Secret::from_slice(secret)?;
        let slot: Slot = Arc::default();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.contains_key(&(pid, secret)) {
            return None;
        }
        sessions.insert((pid, secret), slot.clone());
        Some(CancelKey {
            pid,
            secret,
            slot,
            registry: self.clone(),
        })
    }

    /// The next made-up pid: in `SYNTHETIC_PIDS..=i32::MAX`; in a cluster, this instance's
    /// tag in bits 16 to 30 (so every instance can tell which one issued it).
    fn synthetic_pid(&self) -> i32 {
        let n = self.next_pid.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.cluster {
            return ((u32::from(c.tag()) << 16) | (n & 0xffff)) as i32;
        }
        let n = n % (i32::MAX as u32 - SYNTHETIC_PIDS + 1);
        (SYNTHETIC_PIDS + n) as i32
    }

    /// Handles a CancelRequest for this instance's sessions only (one another instance
    /// forwarded): forwards it if the key matches a session that holds a server connection.
    /// Wrong keys are ignored silently, as PostgreSQL does.
    pub(crate) async fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        match Secret::from_slice(secret) {
            Some(secret) => self.cancel_local(pid, secret).await.unwrap_or(false),
            None => false,
        }
    }

    /// Handles a CancelRequest from a client: this instance's key is handled here; in a
    /// cluster, any other key is forwarded once to the instance that issued it, found from
    /// the key alone (no query, no broadcast: a forged key costs one forward at most).
    pub(crate) async fn cancel_anywhere(&self, pid: i32, secret: &[u8]) -> bool {
        let Some(s) = Secret::from_slice(secret) else {
            return false;
        };
        if let Some(done) = self.cancel_local(pid, s).await {
            return done;
        }
        if self.to_predecessor(pid, secret) {
            return true;
        }
        match &self.cluster {
            Some(c) => forward::to_issuer(c, pid, secret).await,
            None => false,
        }
    }

    /// Sends keys this process does not know to a takeover's predecessor through `to`, while
    /// it serves clients (None: no longer).
    pub(crate) fn set_predecessor(&self, to: Option<ToPredecessor>) {
        *self.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }

    /// Hands an unknown key to the predecessor, if there is one (and its queue has room: a
    /// flood of forged keys is dropped, not queued).
    fn to_predecessor(&self, pid: i32, secret: &[u8]) -> bool {
        let to = self.predecessor.lock().unwrap_or_else(|p| p.into_inner());
        match to.as_ref().map(|tx| tx.try_send((pid, secret.to_vec()))) {
            Some(Ok(())) => true,
            Some(Err(tokio::sync::mpsc::error::TrySendError::Full(_))) => {
                // Once per power of two: a flood of forged keys does not flood the log.
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "takeover: cancel requests for the previous process dropped: its queue is full (a flood of unknown keys?)");
                }
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// None when the key is not this instance's; else whether the cancel went to a server.
    async fn cancel_local(&self, pid: i32, secret: Secret) -> Option<bool> {
        let slot = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.get(&(pid, secret))?.clone()
        };
        let target = slot.lock().await;
        match &*target {
            Some(t) => {
                if let Err(e) = send_cancel(&t.addr, t.pid, &t.secret).await {
                    tracing::warn!(error = %e, "forwarding a cancel request failed");
                }
                Some(true)
            }
            None => Some(false),
        }
    }
}

/// One session's cancel key.
#[derive(Debug)]
pub(crate) struct CancelKey {
    /// The pid the client was given.
    pub pid: i32,
    /// The secret the client was given.
    pub secret: Secret,
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

    #[tokio::test]
    async fn a_new_target_waits_for_a_cancel_being_forwarded() {
        let r = Arc::new(CancelRegistry::new());
        let key = r.register(None, false);
        let target = CancelTarget {
            addr: ServerAddr::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid: 7,
            secret: bytes::Bytes::from_static(b"abcd"),
        };
        key.set_target(Some(target)).await;
        let slot = key.slot.clone();
        // What `cancel_local` holds while it forwards a cancel to the target.
        let forwarding = slot.lock().await;
        let key = Arc::new(key);
        let set = tokio::spawn({
            let key = key.clone();
            async move { key.set_target(None).await }
        });
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert!(!set.is_finished(), "the cancel is still being forwarded");
        assert_eq!(forwarding.as_ref().map(|t| t.pid), Some(7));
        drop(forwarding);
        set.await.unwrap();
        assert!(slot.lock().await.is_none(), "set once it was forwarded");
    }

    #[tokio::test]
    async fn unknown_keys_beyond_the_predecessors_queue_are_dropped_and_counted() {
        let r = CancelRegistry::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        r.set_predecessor(Some(tx));
        assert!(r.to_predecessor(7, &[1, 2, 3, 4]), "queued");
        assert!(!r.to_predecessor(8, &[1, 2, 3, 4]), "the queue is full: dropped");
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(rx.recv().await, Some((7, vec![1, 2, 3, 4])));
        r.set_predecessor(None);
        assert!(!r.to_predecessor(9, &[1, 2, 3, 4]), "no predecessor: a miss");
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1, "not counted as dropped");
    }

    #[test]
    fn made_up_pids_are_above_every_real_process_id() {
        let r = Arc::new(CancelRegistry::new());
        r.next_pid.store(u32::MAX - 3, Ordering::Relaxed);
        for _ in 0..8 {
            let k = r.register(None, false);
            assert!(k.pid >= SYNTHETIC_PIDS as i32, "{}", k.pid);
        }
    }

    #[test]
    fn sessions_with_the_same_backend_pid_keep_apart_keys() {
        let r = Arc::new(CancelRegistry::new());
        let a = r.register(Some(4242), false);
        let b = r.register(Some(4242), true);
        assert_eq!((a.pid, b.pid), (4242, 4242));
        assert_ne!(a.secret, b.secret);
        assert_eq!(r.sessions.lock().unwrap().len(), 2);
        drop(a);
        let sessions = r.sessions.lock().unwrap();
        assert!(sessions.contains_key(&(4242, b.secret)));
        assert_eq!(sessions.len(), 1);
    }

    /// Both key lengths: a 3.0 client's 4-byte secret and a 3.2 client's 32-byte one are
    /// found by exactly what was given, and by nothing shorter, longer or different.
    #[tokio::test]
    async fn short_and_long_secrets_route_cancels_by_exactly_their_bytes() {
        let r = Arc::new(CancelRegistry::new());
        let short = r.register(None, false);
        let long = r.register(Some(77), true);
        assert_eq!(
            (short.secret.as_bytes().len(), long.secret.as_bytes().len()),
            (4, LONG_SECRET)
        );
        assert_ne!(long.secret.as_bytes(), &[0u8; LONG_SECRET][..], "random");
        {
            let sessions = r.sessions.lock().unwrap();
            for k in [&short, &long] {
                let found = Secret::from_slice(k.secret.as_bytes()).is_some_and(|s| sessions.contains_key(&(k.pid, s)));
                assert!(found);
            }
            // The long key's first 4 bytes are not its key; other lengths are never looked up.
            let first4 = Secret::from_slice(&long.secret.as_bytes()[..4]).unwrap();
            assert!(!sessions.contains_key(&(77, first4)));
            assert!(Secret::from_slice(&[1; 8]).is_none() && Secret::from_slice(&[1; 256]).is_none());
        }
        // Without a server connection behind them, cancels go nowhere (and say so).
        assert!(!r.cancel(77, long.secret.as_bytes()).await);
        assert!(!r.cancel(77, &long.secret.as_bytes()[..4]).await);
    }

    /// In a cluster, made-up pids carry the instance's tag (other instances route by it), and
    /// a key with this instance's own tag that it does not know is dropped, never forwarded.
    #[tokio::test]
    async fn cluster_pids_carry_the_tag_and_an_unknown_own_key_is_dropped() {
        let cl = Cluster::new(&crate::config::ClusterSettings::new("shop", 5));
        let r = Arc::new(CancelRegistry::in_cluster(Some(cl.clone())));
        r.next_pid.store(u32::MAX - 3, Ordering::Relaxed);
        for _ in 0..8 {
            let k = r.register(None, false);
            assert!(k.pid >= SYNTHETIC_PIDS as i32, "{}", k.pid);
            assert_eq!((k.pid >> 16) as u16, cl.tag());
        }
        let own = i32::from(cl.tag()) << 16;
        assert!(!r.cancel_anywhere(own, &[1, 2, 3, 4]).await);
        assert!(!r.cancel_anywhere(4242, &[1, 2, 3, 4]).await, "no peer known: dropped");
        let session = r.register(Some(4242), false);
        assert!(
            !r.cancel_anywhere(4242, session.secret.as_bytes()).await,
            "its own, idle: not forwarded"
        );
    }
}

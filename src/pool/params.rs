//! Client parameters left behind on idle server connections (transaction mode).
//!
//! Part of the pool. A transaction-mode client's startup parameters (application_name above
//! all) stay applied on the server connections it used: the next client with the same ones
//! needs no round trip (`ServerConn::applied`). Once no live session of the pool uses a set
//! any more, the idle connections still carrying it would keep naming a client that is gone
//! in pg_stat_activity, so monitoring blames the wrong app. Sessions hold a [`ParamsLease`]
//! on their set; the reaper's [`reset_stale`] takes idle connections whose set nobody holds
//! (idle at least [`STALE_AFTER`], so a client that reconnects at once finds its set still
//! applied) and runs `RESET ALL` on them. Cold path only: leases change at login and after a
//! tracked `SET`, the sweep runs on the reaper's tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{Object, Timeouts};

use super::manager::{Pool, ServerManager};

/// How long an idle connection keeps a set nobody uses before it is reset.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(1);

/// How long a reset may take before the connection is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Parameter sets (by `ServerConn::applied` key) that live sessions of one pool use, counted.
#[derive(Debug, Default)]
pub(crate) struct LiveParams(Mutex<HashMap<u64, usize>>);

impl LiveParams {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, key: u64) {
        if key != 0 {
            *self.map().entry(key).or_default() += 1;
        }
    }

    fn remove(&self, key: u64) {
        let mut map = self.map();
        if let Some(n) = map.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
            }
        }
    }

    /// Whether a connection carrying `key` carries a set no live session uses.
    fn stale(&self, key: u64) -> bool {
        key != 0 && !self.map().contains_key(&key)
    }
}

/// A session's hold on its parameter set; given back when dropped.
#[derive(Debug)]
pub(crate) struct ParamsLease {
    live: Arc<LiveParams>,
    key: u64,
}

impl ParamsLease {
    pub(crate) fn new(live: Arc<LiveParams>, key: u64) -> Self {
        live.add(key);
        Self { live, key }
    }

    /// The session's set changed (it SET a tracked parameter).
    pub(crate) fn set(&mut self, key: u64) {
        if key != self.key {
            self.live.add(key);
            self.live.remove(self.key);
            self.key = key;
        }
    }
}

impl Drop for ParamsLease {
    fn drop(&mut self) {
        self.live.remove(self.key);
    }
}

/// Resets the idle connections of `pool` that carry a set no session of `live` uses; returns
/// how many. Connections are taken like any checkout, for a moment (idle ones first, so only
/// a client racing for the last idle one can make this open a new one, within every cap),
/// and go back as they were but for the reset; one whose reset fails is closed.
pub(crate) async fn reset_stale(pool: &Pool, live: &LiveParams) -> usize {
    let mut stale = 0;
    let due = |c: &crate::server::ServerConn| live.stale(c.applied) && c.idle_since.elapsed() >= STALE_AFTER;
    pool.retain(|c, _| {
        stale += usize::from(due(c));
        true
    });
    let idle = pool.status().available;
    if stale == 0 || idle == 0 {
        return 0;
    }
    let now = Timeouts {
        wait: Some(Duration::ZERO),
        ..Timeouts::default()
    };
    // Idle connections come out in the pool's order, not the stale ones first: take them
    // until every stale one is out (or every idle one was).
    let (mut taken, mut found) = (Vec::with_capacity(idle), 0);
    while found < stale && taken.len() < idle {
        match pool.timeout_get(&now).await {
            Ok(obj) => {
                found += usize::from(due(&obj));
                taken.push(obj);
            }
            Err(_) => break,
        }
    }
    let mut reset = 0;
    for mut obj in taken {
        if !due(&obj) {
            continue; // back as it was
        }
        if reset_one(&mut obj).await {
            reset += 1;
        } else {
            drop(Object::take(obj));
        }
    }
    reset
}

/// `RESET ALL` on an idle connection; false when it failed (the connection must close).
async fn reset_one(obj: &mut Object<ServerManager>) -> bool {
    let ok = matches!(
        tokio::time::timeout(RESET_TIMEOUT, obj.simple_query("RESET ALL")).await,
        Ok(Ok(()))
    );
    if ok && obj.is_clean() {
        obj.applied = 0;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_stale_once_its_last_lease_is_gone() {
        let live = Arc::new(LiveParams::default());
        let a = ParamsLease::new(live.clone(), 7);
        let mut b = ParamsLease::new(live.clone(), 7);
        assert!(!live.stale(7));
        assert!(!live.stale(0), "a reset connection carries nothing");
        drop(a);
        assert!(!live.stale(7), "b still uses it");
        b.set(9);
        assert!(live.stale(7));
        assert!(!live.stale(9));
        drop(b);
        assert!(live.stale(9));
        assert!(live.map().is_empty());
    }
}

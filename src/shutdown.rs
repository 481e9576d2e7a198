//! Shutdown phases, broadcast to the listener and every session.
//!
//! Beside the flow: `Running` → `Draining` (the listener stops accepting; idle sessions are
//! told 57P01 and closed; sessions in a transaction finish it) → `Stopped` (after
//! `shutdown_timeout`: what remains is closed). Tests drive it through [`crate::ProxyHandle`];
//! the binary maps SIGTERM/SIGINT to it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::sync::watch;

/// Where a proxy is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Serving.
    Running = 0,
    /// Not accepting; sessions end at their next idle point.
    Draining,
    /// Everything is being closed.
    Stopped,
}

/// The phase as sessions follow it: an atomic read, and one waker per session that is woken
/// when the phase changes. Following it costs no lock per poll (a `watch` receiver's waiter
/// takes the channel's lock each time it is polled, and every session polls it in every
/// round of its relay).
#[derive(Debug, Default)]
pub(crate) struct PhaseBell {
    phase: AtomicU8,
    /// Rings without a phase change ([`PhaseBell::nudge`]) so far.
    nudges: AtomicU64,
    next_id: AtomicU64,
    watchers: Mutex<crate::FastMap<u64, Arc<AtomicWaker>>>,
}

impl PhaseBell {
    /// The phase now.
    pub(crate) fn now(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Stopped,
        }
    }

    /// Wakes every session that follows the phase without changing it: each one's
    /// [`PhaseWatch::changed`] resolves once (with the same phase) and the session looks at
    /// what else may have changed (a takeover's handoff began).
    pub(crate) fn nudge(&self) {
        self.nudges.fetch_add(1, Ordering::SeqCst);
        self.wake_all();
    }

    /// Moves to `p` and wakes every session that follows the phase.
    fn ring(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Release);
        self.wake_all();
    }

    fn wake_all(&self) {
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for w in watchers.values() {
            w.wake();
        }
    }
}

/// Sets the phase: for the proxy's own tasks (a `watch` channel) and for its sessions (the
/// [`PhaseBell`]). Dropping it means Stopped, for both.
#[derive(Debug)]
pub(crate) struct PhaseSender {
    tx: watch::Sender<Phase>,
    bell: Arc<PhaseBell>,
}

impl PhaseSender {
    /// A sender in `Running`, with the receiver for tasks and the bell for sessions.
    pub(crate) fn new() -> (Self, watch::Receiver<Phase>, Arc<PhaseBell>) {
        let (tx, rx) = watch::channel(Phase::Running);
        let bell = Arc::new(PhaseBell::default());
        (Self { tx, bell: bell.clone() }, rx, bell)
    }

    /// Running → Draining (no change in any other phase).
    pub(crate) fn begin_drain(&self) {
        let changed = self.tx.send_if_modified(|p| {
            let change = *p == Phase::Running;
            if change {
                *p = Phase::Draining;
            }
            change
        });
        if changed {
            self.bell.ring(Phase::Draining);
        }
    }

    /// Stopped: everything closes.
    pub(crate) fn stop(&self) {
        let _ = self.tx.send(Phase::Stopped);
        self.bell.ring(Phase::Stopped);
    }

    /// A receiver for a task that watches the phase.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }
}

impl Drop for PhaseSender {
    fn drop(&mut self) {
        self.bell.ring(Phase::Stopped);
    }
}

/// The phase as one session follows it.
#[derive(Debug)]
pub(crate) struct PhaseWatch {
    now: Phase,
    /// The bell's nudges as of the last change seen.
    nudges: u64,
    bell: Arc<PhaseBell>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl PhaseWatch {
    /// Follows `bell` from its current phase on.
    pub(crate) fn new(bell: &Arc<PhaseBell>) -> Self {
        let id = bell.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        bell.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, waker.clone());
        Self {
            now: bell.now(),
            nudges: bell.nudges.load(Ordering::SeqCst),
            bell: bell.clone(),
            id,
            waker,
        }
    }

    /// The phase as of the last change seen.
    pub(crate) fn now(&self) -> Phase {
        self.now
    }

    /// Resolves at the next change, or nudge (see [`PhaseBell::nudge`]). Cancel-safe.
    pub(crate) async fn changed(&mut self) -> Phase {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            let (p, nudges) = (self.bell.now(), self.bell.nudges.load(Ordering::SeqCst));
            if p == self.now && nudges == self.nudges {
                return Poll::Pending;
            }
            (self.now, self.nudges) = (p, nudges);
            Poll::Ready(p)
        })
        .await
    }
}

impl Drop for PhaseWatch {
    fn drop(&mut self) {
        self.bell
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sessions_follow_every_change_and_a_dropped_sender_means_stopped() {
        let (tx, rx, bell) = PhaseSender::new();
        let mut w = PhaseWatch::new(&bell);
        assert_eq!(w.now(), Phase::Running);
        let waiting = tokio::spawn(async move {
            let p = w.changed().await;
            (p, w)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.begin_drain();
        let (p, mut w) = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p, Phase::Draining);
        assert_eq!(*rx.borrow(), Phase::Draining);
        // A second drain changes nothing; dropping the sender stops everything.
        tx.begin_drain();
        drop(tx);
        let p = tokio::time::timeout(Duration::from_secs(2), w.changed()).await.unwrap();
        assert_eq!(p, Phase::Stopped);
        assert_eq!(w.now(), Phase::Stopped);
        // Watchers leave the bell when dropped.
        drop(w);
        assert!(bell.watchers.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_nudge_wakes_every_watcher_once_without_a_phase_change() {
        let (_tx, _rx, bell) = PhaseSender::new();
        let mut w = PhaseWatch::new(&bell);
        let waiting = tokio::spawn(async move {
            let p = w.changed().await;
            (p, w)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        bell.nudge();
        let (p, mut w) = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p, Phase::Running);
        // Seen: the next wait waits again.
        assert!(tokio::time::timeout(Duration::from_millis(50), w.changed())
            .await
            .is_err());
    }
}

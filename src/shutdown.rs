//! Shutdown phases, broadcast to the listener and every session.
//!
//! Beside the flow: `Running` → `Draining` (the listener stops accepting; idle sessions are
//! told 57P01 and closed; sessions in a transaction finish it) → `Stopped` (after
//! `shutdown_timeout`: what remains is closed). Tests drive it through [`crate::ProxyHandle`];
//! the binary maps SIGTERM/SIGINT to it.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;

/// Where a proxy is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Running,
    /// Not accepting; sessions end at their next idle point.
    Draining,
    /// Everything is being closed.
    Stopped,
}

type NextPhase = Pin<Box<dyn Future<Output = (Phase, watch::Receiver<Phase>)> + Send>>;

/// The phase as one session follows it: a single waiter registered for the whole session,
/// not one per transaction (each registration takes the channel's lock twice).
pub struct PhaseWatch {
    now: Phase,
    next: NextPhase,
}

impl PhaseWatch {
    /// Follows `rx` from its current value on.
    pub fn new(mut rx: watch::Receiver<Phase>) -> Self {
        let now = *rx.borrow_and_update();
        Self {
            now,
            next: Box::pin(next_phase(rx)),
        }
    }

    /// The phase as of the last change seen.
    pub fn now(&self) -> Phase {
        self.now
    }

    /// Resolves at the next change (a closed channel means Stopped, at once from then on).
    /// Cancel-safe: the waiter stays registered when this future is dropped.
    pub async fn changed(&mut self) -> Phase {
        let (p, rx) = self.next.as_mut().await;
        self.now = p;
        self.next = Box::pin(next_phase(rx));
        p
    }
}

async fn next_phase(mut rx: watch::Receiver<Phase>) -> (Phase, watch::Receiver<Phase>) {
    let p = match rx.changed().await {
        Ok(()) => *rx.borrow_and_update(),
        Err(_) => Phase::Stopped,
    };
    (p, rx)
}

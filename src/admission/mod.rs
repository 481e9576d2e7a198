//! Admission: whether a new client connection may proceed at all.
//!
//! Third step of the flow, decided before any authentication work: the listener takes a
//! [`ClientPermit`] (`max_client_connections`) for every accepted socket and moves it into the
//! session task; without one the session refuses the client with FATAL 53300 right after
//! its startup packet. Per-identity caps and fair queueing build on this.

use std::sync::Arc;

pub mod identity;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Held by a session for its whole life; returns its slot when dropped.
#[derive(Debug)]
pub struct ClientPermit {
    _permit: OwnedSemaphorePermit,
}

/// Client-side admission control of one proxy.
#[derive(Debug, Clone)]
pub struct Admission {
    clients: Arc<Semaphore>,
    max_clients: u32,
}

impl Admission {
    /// Admits at most `max_clients` client connections at once.
    pub fn new(max_clients: u32) -> Self {
        Self {
            clients: Arc::new(Semaphore::new(max_clients as usize)),
            max_clients,
        }
    }

    /// A permit for a new client, or None when `max_client_connections` are connected.
    pub fn admit_client(&self) -> Option<ClientPermit> {
        self.clients
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| ClientPermit { _permit: p })
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.max_clients as usize - self.clients.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_clients_exactly() {
        let a = Admission::new(2);
        let p1 = a.admit_client().unwrap();
        let _p2 = a.admit_client().unwrap();
        assert!(a.admit_client().is_none());
        assert_eq!(a.clients(), 2);
        drop(p1);
        assert!(a.admit_client().is_some());
    }
}

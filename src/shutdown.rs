//! Shutdown phases, broadcast to the listener and every session.
//!
//! Beside the flow: `Running` → `Draining` (the listener stops accepting; idle sessions are
//! told 57P01 and closed; sessions in a transaction finish it) → `Stopped` (after
//! `shutdown_timeout`: what remains is closed). Tests drive it through [`crate::ProxyHandle`];
//! the binary maps SIGTERM/SIGINT to it.

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

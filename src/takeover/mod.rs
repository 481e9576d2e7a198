//! Takeover: a new pgvalve process (`pgvalve run --takeover`, or
//! [`crate::ProxyHandle::start_takeover`]) takes the listening sockets and the clients of a
//! running one, so an upgrade or restart drops no client.
//!
//! Beside the listener. The running process listens on a Unix control socket
//! (`[proxy] takeover_socket`, mode 0600, only a peer of the same user id is served). Over
//! it ([`wire`]):
//! 1. the successor says HELLO; the predecessor sends its listening sockets (the clients'
//!    and, when set, the HTTP endpoint's) as file descriptors, with the plan (its
//!    `max_server_connections`);
//! 2. the successor accepts on them and says READY; from then on the predecessor accepts
//!    nothing (both accepted on the same socket meanwhile, so no connection is refused);
//! 3. the predecessor's idle transaction-mode clients move ([`crate::client::Handoff`]):
//!    each socket with its session state; clients in a transaction move at their next idle
//!    moment. What cannot move (TLS clients, LISTEN, pinned and session-mode sessions) stays:
//!    idle transaction-mode ones are closed at once with 57P01, the others are served until
//!    they leave or `shutdown_timeout` has passed, then drained as on SIGTERM. Meanwhile the
//!    successor passes the predecessor each CancelRequest whose key it does not know (it may
//!    be for a client still served there): CANCEL, looked up there only, never passed on;
//! 4. the cap stays exact: the successor's server connections hold slots of a budget the
//!    predecessor lends ([`crate::server::budget::Budget::lent`]). The predecessor lends its
//!    free slots, closes its idle connections while none of its sessions waits for one, and
//!    lends each slot so freed, keeping one beyond its own connections (the lock monitor's)
//!    until it exits, so a session still served there gets a connection (and its size is
//!    never 0, which means unlimited); when the control connection ends (the predecessor exited) the lent budget
//!    becomes unlimited and the successor's own `max_server_connections` alone applies.
//!    `pool_size` is per process: during the overlap a pool may have up to its size in each.
//!
//! [`predecessor`] is the running side, [`successor`] the new one.

pub(crate) mod predecessor;
pub(crate) mod successor;
pub(crate) mod wire;

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the successor says first.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// Its process id (for the logs).
    pub pid: u32,
}

/// What the predecessor hands over besides the sockets.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Plan {
    /// Whether the second descriptor is the HTTP endpoint's listener.
    pub http: bool,
    /// Server connection slots are lent (the predecessor's `max_server_connections` is
    /// set and it is in no `[cluster]`): the successor starts with none.
    pub lends: bool,
}

/// Binds the control socket at `path` (a stale file there is replaced), readable and
/// writable by this user only.
pub(crate) fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Whether the peer of `w` runs as this process's user (or root).
fn same_user(w: &wire::Wire) -> std::io::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let peer = w.peer_uid()?;
    if peer == me || peer == 0 {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("takeover control socket: peer uid {peer} is not this process's ({me})"),
        ))
    }
}

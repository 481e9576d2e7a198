//! Closing a server connection: its slot is given back once PostgreSQL has closed its end.
//!
//! Part of the server side, under the pools. Dropping pgvalve's end of a socket does not end
//! the backend at that instant: PostgreSQL reads the end of the stream, exits, and leaves
//! pg_stat_activity and its max_connections slot on the way out (its socket closes after
//! both). A slot given back when pgvalve drops its end would let a new connection in while the
//! old backend is still there, and PostgreSQL would see one more than the cap for a moment.
//! So a closing connection's slot is kept by a small task holding a duplicate of the socket: it
//! closes pgvalve's sending side (the backend reads end-of-stream, or a Terminate sent before),
//! reads and discards until the server closes its side too, then gives the slot back; after
//! [`CLOSE_WAIT`] at most, so a server that cannot be reached does not keep slots forever.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::budget::Slot;
use super::stream::{ServerStream, SocketDup};

/// Longest a closing connection keeps its slot waiting for the server to close.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Gives `slot` back once the server has closed the connection of `stream` (which is being
/// dropped); at once when no runtime is there or the socket cannot be duplicated.
pub(crate) fn release_when_closed(stream: &ServerStream, mut slot: Slot) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    match stream.dup() {
        Ok(dup) => {
            slot.closing();
            rt.spawn(release_after(dup, slot));
        }
        Err(e) => tracing::debug!(error = %e, "cannot wait for the server to close; slot given back now"),
    }
}

/// Closes pgvalve's sending side of `dup`'s socket, waits until the server has closed its
/// side (at most [`CLOSE_WAIT`]), then drops `slot`.
pub(crate) async fn release_after(dup: SocketDup, mut slot: Slot) {
    slot.closing();
    let closed = tokio::time::timeout(CLOSE_WAIT, wait_closed(dup)).await;
    if !matches!(closed, Ok(Ok(()))) {
        tracing::debug!("server did not close a connection in time; its slot is given back anyway");
    }
    drop(slot);
}

async fn wait_closed(dup: SocketDup) -> std::io::Result<()> {
    match dup {
        SocketDup::Tcp(fd) => {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            drain(tokio::net::TcpStream::from_std(s)?).await
        }
        SocketDup::Unix(fd) => {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            drain(tokio::net::UnixStream::from_std(s)?).await
        }
    }
}

/// Shuts the sending side, then reads until the server closes (an error counts as closed).
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let _ = s.shutdown().await;
    let mut sink = [0u8; 1024];
    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    Ok(())
}

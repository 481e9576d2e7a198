//! The relay's writes: what a read produced goes to the other side at once when the socket
//! takes it, and is queued otherwise; buffers are given back when drained.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::READ_RESERVE;
use crate::server::stream::TryWrite;

#[inline]
pub(super) fn move_ready(from: &mut BytesMut, to: &mut BytesMut, n: usize) {
    if n == 0 {
        return;
    }
    let chunk = from.split_to(n);
    if to.is_empty() {
        *to = chunk;
    } else {
        to.unsplit(chunk);
    }
}

#[inline]
pub(super) fn ensure_space(b: &mut BytesMut) {
    if b.capacity() - b.len() < 4096 {
        b.reserve(READ_RESERVE);
    }
}

#[inline]
pub(super) fn consumed(b: &mut BytesMut, n: usize) {
    b.advance(n);
    if b.is_empty() {
        // Drop the reference to the shared allocation so the read buffer can reuse it.
        *b = BytesMut::new();
    }
}

/// Writes some of `out` when it holds bytes, else flushes TLS records the socket did not take
/// yet. The count written (0 after a flush); `Err` when the socket failed.
pub(super) async fn drain<W: AsyncWrite + Unpin>(w: &mut W, out: &[u8]) -> Result<usize, ()> {
    if out.is_empty() {
        return w.flush().await.map(|()| 0).map_err(|_| ());
    }
    match w.write(out).await {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(()),
    }
}

/// Writes as much of `out` as the socket takes now, without waiting. `Err` when it failed.
pub(super) fn write_now(w: &impl TryWrite, out: &mut BytesMut) -> Result<(), ()> {
    let n = write_some(w, out)?;
    if n > 0 {
        consumed(out, n);
    }
    Ok(())
}

/// Writes as much of `buf` as the socket takes now; the count written, `Err` when it failed.
fn write_some(w: &impl TryWrite, buf: &[u8]) -> Result<usize, ()> {
    let mut sent = 0;
    while sent < buf.len() {
        match w.try_write_now(&buf[sent..]) {
            Ok(0) => return Err(()),
            Ok(k) => sent += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Err(()),
        }
    }
    Ok(sent)
}

/// Sends the first `n` (scanned) bytes of `input` on: straight from `input` when nothing is
/// queued before them, queuing in `out` whatever the socket does not take now.
pub(super) fn forward(input: &mut BytesMut, n: usize, out: &mut BytesMut, w: &impl TryWrite) -> Result<(), ()> {
    if !out.is_empty() {
        move_ready(input, out, n);
        return write_now(w, out);
    }
    let sent = write_some(w, &input[..n])?;
    input.advance(sent);
    move_ready(input, out, n - sent);
    Ok(())
}

/// Sends all of `scratch` on (and empties it, keeping its allocation): straight from it when
/// nothing is queued in `out` before it, queuing in `out` whatever the socket does not take.
pub(super) fn send(scratch: &mut BytesMut, out: &mut BytesMut, w: &impl TryWrite) -> Result<(), ()> {
    let sent = if out.is_empty() { write_some(w, scratch)? } else { 0 };
    out.extend_from_slice(&scratch[sent..]);
    scratch.clear();
    write_now(w, out)
}

//! TLS streams as the relay drives them: the glue that lets it read and write a TLS stream
//! like a socket ([`Locked`], [`TryWrite`], [`try_read`]), and PostgreSQL's ALPN name.
//!
//! Below the server connection and the client session, which both use it; above config,
//! where `[tls]` is loaded into acceptor and connector ([`crate::config::Tls`], re-exported
//! here) so a reload reads renewed certificates off to the side.

use std::io;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) use crate::config::{end_point_hash, ServerTls};

pub(crate) use crate::protocol::startup::ALPN;

/// The write half of a split stream, writable without waiting.
pub(crate) trait TryWrite {
    /// Writes what the socket takes now.
    ///
    /// # Errors
    /// `WouldBlock` when it takes nothing, or the socket error.
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize>;

    /// True while the writer holds bytes the socket has not taken yet (TLS records); the
    /// relay then flushes before it waits for anything else to write.
    fn backlog(&self) -> bool {
        false
    }
}

impl TryWrite for tokio::net::tcp::WriteHalf<'_> {
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.as_ref().try_write(buf)
    }
}

impl TryWrite for tokio::net::unix::WriteHalf<'_> {
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        self.as_ref().try_write(buf)
    }
}

/// A TLS stream that says whether it holds encrypted bytes not yet written to its socket.
pub(crate) trait Backlog {
    /// True while records wait to be written.
    fn backlog(&self) -> bool;
}

impl<IO> Backlog for tokio_rustls::server::TlsStream<IO> {
    fn backlog(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

impl<IO> Backlog for tokio_rustls::client::TlsStream<IO> {
    fn backlog(&self) -> bool {
        self.get_ref().1.wants_write()
    }
}

/// One half of a TLS stream the relay reads and writes at once: both halves share the stream
/// behind an uncontended lock (the relay polls them from one task, one at a time).
pub(crate) struct Locked<'a, 'b, S>(pub &'a Mutex<&'b mut S>);

impl<S> Locked<'_, '_, S> {
    fn with<R>(&self, f: impl FnOnce(Pin<&mut S>) -> R) -> R
    where
        S: Unpin,
    {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(Pin::new(&mut **g))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Locked<'_, '_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_read(cx, buf))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Locked<'_, '_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.with(|s| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_shutdown(cx))
    }
}

impl<S: AsyncWrite + Backlog + Unpin> TryWrite for Locked<'_, '_, S> {
    /// Encrypts what fits and writes what the socket takes now. Records the socket did not
    /// take stay in the stream ([`TryWrite::backlog`]) until the relay flushes them.
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        self.with(|mut s| {
            if s.backlog() {
                match s.as_mut().poll_flush(&mut cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => return Err(io::ErrorKind::WouldBlock.into()),
                }
            }
            match s.as_mut().poll_write(&mut cx, buf) {
                Poll::Ready(Ok(n)) => {
                    let _ = s.poll_flush(&mut cx);
                    Ok(n)
                }
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            }
        })
    }

    fn backlog(&self) -> bool {
        self.with(|s| s.backlog())
    }
}

/// A non-blocking read of a TLS stream (the pool's liveness probe): `WouldBlock` when
/// nothing is there.
pub(crate) fn try_read<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> io::Result<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut rb = ReadBuf::new(buf);
    match Pin::new(s).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Ok(rb.filled().len()),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

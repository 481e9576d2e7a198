//! The client socket (plain or TLS) with its read buffer: cancel-safe reads of the first
//! packet and of whole messages, writes of what the proxy says, and the TLS handshake.
//!
//! Part of the client session; the relay takes the socket and buffer over after login.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::buffers::Stash;
use super::SessionError;
use crate::error::PgError;
use crate::protocol::frame::{split_frame, Frame};
use crate::protocol::messages;
use crate::protocol::startup::{split_initial, InitialPacket};

/// Largest message accepted during authentication (SASL messages are a few hundred bytes).
pub(crate) const MAX_AUTH_MESSAGE: usize = 10_000;

/// A client's byte stream.
#[derive(Debug)]
pub enum ClientStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Between the two, while the handshake runs (or after it failed).
    Closed,
}

impl ClientStream {
    /// The local address the client connected to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            ClientStream::Tcp(s) => s.local_addr(),
            ClientStream::Tls(s) => s.get_ref().0.local_addr(),
            ClientStream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }
}

fn closed<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            ClientStream::Closed => closed(),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            ClientStream::Closed => closed(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            ClientStream::Closed => closed(),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            ClientStream::Closed => closed(),
        }
    }
}

/// A client connection.
#[derive(Debug)]
pub struct ClientConn {
    /// The socket.
    pub stream: ClientStream,
    /// Bytes read and not yet consumed.
    pub(crate) rbuf: BytesMut,
    /// What the proxy will write next.
    pub(crate) wbuf: BytesMut,
    /// Client address.
    pub(crate) peer: SocketAddr,
    /// Its core's read buffers (see [`ClientConn::wait_idle`]); None: allocated as needed.
    pub(crate) stash: Option<Arc<Stash>>,
}

impl ClientConn {
    /// Wraps an accepted socket.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream: ClientStream::Tcp(stream),
            rbuf: BytesMut::with_capacity(super::buffers::SIZE),
            wbuf: BytesMut::new(),
            peer,
            stash: None,
        }
    }

    /// Reads whatever arrives next into `rbuf`.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn read_more(&mut self) -> Result<(), SessionError> {
        self.rbuf.reserve(super::buffers::SIZE);
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(SessionError::ClientGone(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(()),
            Err(e) => Err(SessionError::ClientGone(e)),
        }
    }

    /// Waits until the client sends something, holding no buffer meanwhile (an idle client
    /// between transactions costs its socket and task, not 8 KiB of buffer): its read buffer
    /// goes back to its core's stash, and one comes from there when it sends.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn wait_idle(&mut self) -> Result<(), SessionError> {
        if self.wbuf.is_empty() {
            self.wbuf = BytesMut::new();
        }
        if self.rbuf.is_empty() {
            let idle = std::mem::take(&mut self.rbuf);
            match &self.stash {
                Some(stash) => stash.give(idle),
                // (Dropped here, not kept in the wait's state.)
                None => drop(idle),
            }
            if let ClientStream::Tcp(s) = &self.stream {
                s.readable().await.map_err(SessionError::ClientGone)?;
            }
            if let Some(stash) = &self.stash {
                self.rbuf = stash.take();
            }
        }
        self.read_more().await
    }

    /// Reads the untagged first packet (at most `max` bytes).
    ///
    /// # Cancel safety
    /// Cancel safe: partial data stays in the buffer.
    pub(crate) async fn read_initial(&mut self, max: usize) -> Result<InitialPacket, SessionError> {
        loop {
            if let Some(p) = split_initial(&mut self.rbuf, max).map_err(SessionError::Startup)? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Reads one whole message of at most `max` bytes.
    ///
    /// # Cancel safety
    /// Cancel safe: partial data stays in the buffer.
    pub(crate) async fn read_frame(&mut self, max: usize) -> Result<Frame, SessionError> {
        loop {
            if let Some(f) = split_frame(&mut self.rbuf, max).map_err(SessionError::Frame)? {
                return Ok(f);
            }
            self.read_more().await?;
        }
    }

    /// Writes and clears `wbuf`.
    pub async fn flush(&mut self) -> Result<(), SessionError> {
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(SessionError::ClientGone)?;
        self.stream.flush().await.map_err(SessionError::ClientGone)?;
        self.wbuf.clear();
        Ok(())
    }

    /// Writes some of `wbuf` (one write) and removes what was written.
    ///
    /// # Cancel safety
    /// Cancel safe: what is not written stays in `wbuf`, so messages stay whole.
    pub(crate) async fn write_some(&mut self) -> Result<(), SessionError> {
        let n = self.stream.write(&self.wbuf).await.map_err(SessionError::ClientGone)?;
        if n == 0 {
            return Err(SessionError::ClientGone(io::ErrorKind::WriteZero.into()));
        }
        let _ = self.wbuf.split_to(n);
        if self.wbuf.is_empty() {
            self.stream.flush().await.map_err(SessionError::ClientGone)?;
        }
        Ok(())
    }

    /// Writes `bytes` (what the relay had not written yet), best effort within a second.
    pub(crate) async fn write_out(&mut self, bytes: &[u8]) {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
    }

    /// Looks at the first byte without taking it (0x16 opens a direct TLS handshake).
    pub(crate) async fn peek_first(&mut self) -> Result<Option<u8>, SessionError> {
        let ClientStream::Tcp(s) = &self.stream else {
            return Ok(None);
        };
        let mut b = [0u8; 1];
        match s.peek(&mut b).await {
            Ok(0) => Err(SessionError::ClientGone(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(Some(b[0])),
            Err(e) => Err(SessionError::ClientGone(e)),
        }
    }

    /// Runs the TLS handshake on the plain socket. `direct`: the client opened with TLS (no
    /// SSLRequest), which PostgreSQL allows only with ALPN `postgresql`.
    pub(crate) async fn start_tls(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        direct: bool,
    ) -> Result<(), SessionError> {
        let ClientStream::Tcp(tcp) = std::mem::replace(&mut self.stream, ClientStream::Closed) else {
            return Err(SessionError::Protocol("TLS requested twice".into()));
        };
        // Boxed: the handshake future is large and rare.
        let tls = Box::pin(acceptor.accept(tcp))
            .await
            .map_err(SessionError::TlsHandshake)?;
        if direct && tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN) {
            return Err(SessionError::Tls(
                "direct TLS connection without ALPN \"postgresql\"".into(),
            ));
        }
        self.stream = ClientStream::Tls(Box::new(tls));
        Ok(())
    }

    /// Sends one byte (the answer to SSLRequest / GSSENCRequest).
    pub(crate) async fn send_byte(&mut self, b: u8) -> Result<(), SessionError> {
        self.wbuf.extend_from_slice(&[b]);
        self.flush().await
    }

    /// Sends an ErrorResponse, best effort.
    pub(crate) async fn send_error(&mut self, e: &PgError) {
        self.wbuf.clear();
        messages::error_response(e, &mut self.wbuf);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.flush()).await;
    }
}

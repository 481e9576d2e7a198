//! The client socket with its read buffer: cancel-safe reads of the first packet and of
//! whole messages, and writes of what the proxy says.
//!
//! Part of the client session; the relay takes the socket and buffer over after login.

use std::io;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SessionError;
use crate::error::PgError;
use crate::protocol::frame::{split_frame, Frame};
use crate::protocol::messages;
use crate::protocol::startup::{split_initial, InitialPacket};

/// Largest message accepted during authentication (SASL messages are a few hundred bytes).
pub const MAX_AUTH_MESSAGE: usize = 10_000;

/// A client connection.
#[derive(Debug)]
pub struct ClientConn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read and not yet consumed.
    pub rbuf: BytesMut,
    /// What the proxy will write next.
    pub wbuf: BytesMut,
    /// Client address.
    pub peer: SocketAddr,
}

impl ClientConn {
    /// Wraps an accepted socket.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::with_capacity(1024),
            peer,
        }
    }

    /// Reads whatever arrives next into `rbuf`.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub(crate) async fn read_more(&mut self) -> Result<(), SessionError> {
        self.rbuf.reserve(8192);
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(SessionError::ClientGone(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(()),
            Err(e) => Err(SessionError::ClientGone(e)),
        }
    }

    /// Reads the untagged first packet (at most `max` bytes).
    ///
    /// # Cancel safety
    /// Cancel safe: partial data stays in the buffer.
    pub async fn read_initial(&mut self, max: usize) -> Result<InitialPacket, SessionError> {
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
    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, SessionError> {
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
        self.wbuf.clear();
        Ok(())
    }

    /// Sends one byte (the answer to SSLRequest / GSSENCRequest).
    pub async fn send_byte(&mut self, b: u8) -> Result<(), SessionError> {
        self.wbuf.extend_from_slice(&[b]);
        self.flush().await
    }

    /// Sends an ErrorResponse, best effort.
    pub async fn send_error(&mut self, e: &PgError) {
        self.wbuf.clear();
        messages::error_response(e, &mut self.wbuf);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.flush()).await;
    }
}

//! The byte stream to a PostgreSQL server: TCP, or a Unix-domain socket when the host is a
//! directory (libpq's convention: `host = "/var/run/postgresql"` means the socket file
//! `/var/run/postgresql/.s.PGSQL.<port>`). A local server is cheaper to reach over the socket.
//!
//! Part of the server connection; the relay splits it into borrowed halves.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// host:port over TCP.
    Tcp(std::net::SocketAddr),
    /// A Unix-domain socket file.
    Unix(PathBuf),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => write!(f, "{a}"),
            ServerAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A connected stream to a server.
#[derive(Debug)]
pub enum ServerStream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix-domain socket.
    Unix(UnixStream),
}

/// True when `host` names a socket directory rather than a network host.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

impl ServerStream {
    /// Connects to `host`:`port` (a socket directory when `host` starts with `/`).
    ///
    /// # Errors
    /// The connect error.
    pub async fn connect(host: &str, port: u16) -> io::Result<(ServerStream, ServerAddr)> {
        if is_socket_dir(host) {
            let path = Path::new(host).join(format!(".s.PGSQL.{port}"));
            let s = UnixStream::connect(&path).await?;
            Ok((ServerStream::Unix(s), ServerAddr::Unix(path)))
        } else {
            let s = TcpStream::connect((host, port)).await?;
            s.set_nodelay(true)?;
            let peer = s.peer_addr()?;
            Ok((ServerStream::Tcp(s), ServerAddr::Tcp(peer)))
        }
    }

    /// Connects to a known address (for cancel requests).
    ///
    /// # Errors
    /// The connect error.
    pub async fn connect_addr(addr: &ServerAddr) -> io::Result<ServerStream> {
        Ok(match addr {
            ServerAddr::Tcp(a) => ServerStream::Tcp(TcpStream::connect(a).await?),
            ServerAddr::Unix(p) => ServerStream::Unix(UnixStream::connect(p).await?),
        })
    }

    /// Non-blocking read (the pool's liveness probe).
    ///
    /// # Errors
    /// `WouldBlock` when nothing is there, or the socket error.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_read(buf),
            ServerStream::Unix(s) => s.try_read(buf),
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The write half of a split stream, writable without waiting.
pub trait TryWrite {
    /// Writes what the socket takes now.
    ///
    /// # Errors
    /// `WouldBlock` when it takes nothing, or the socket error.
    fn try_write_now(&self, buf: &[u8]) -> io::Result<usize>;
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

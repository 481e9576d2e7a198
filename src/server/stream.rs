//! The byte stream to a PostgreSQL server: TCP, or a Unix-domain socket when the host is a
//! directory (libpq's convention: `host = "/var/run/postgresql"` means the socket file
//! `/var/run/postgresql/.s.PGSQL.<port>`). A local server is cheaper to reach over the socket.
//!
//! Over TCP, `server_tls_mode` asks for TLS first (SSLRequest), with libpq's sslmode meanings.
//!
//! Part of the server connection; the relay splits it into borrowed halves.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{ServerTls, ServerTlsMode};
use crate::protocol::tags::encryption;
pub(crate) use crate::tls::TryWrite;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// host:port over TCP.
    Tcp(std::net::SocketAddr),
    /// A Unix-domain socket file (shared: the address is copied into the cancel target at
    /// every transaction).
    Unix(std::sync::Arc<Path>),
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
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A duplicate descriptor of a server socket, with its kind.
#[derive(Debug)]
pub(crate) enum SocketDup {
    /// A TCP socket (also under TLS).
    Tcp(std::os::fd::OwnedFd),
    /// A Unix-domain socket.
    Unix(std::os::fd::OwnedFd),
}

/// True when `host` names a socket directory rather than a network host.
pub(crate) fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

impl ServerStream {
    /// Registers the socket with the event loop of the calling thread (a core taking over an
    /// idle connection from another, see `pool::shards`) so its readiness wakes no other thread: the descriptor is
    /// duplicated, the copy registered here, the old registration dropped. TLS streams stay
    /// where they are (they work from any thread).
    ///
    /// # Errors
    /// A failed `dup` or registration; the stream is unchanged then.
    pub(crate) fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        match self {
            ServerStream::Tcp(s) => {
                let copy = std::net::TcpStream::from(s.as_fd().try_clone_to_owned()?);
                copy.set_nonblocking(true)?;
                *s = TcpStream::from_std(copy)?;
            }
            ServerStream::Unix(s) => {
                let copy = std::os::unix::net::UnixStream::from(s.as_fd().try_clone_to_owned()?);
                copy.set_nonblocking(true)?;
                *s = UnixStream::from_std(copy)?;
            }
            ServerStream::Tls(_) => {}
        }
        Ok(())
    }

    /// Connects to `host`:`port` (a socket directory when `host` starts with `/`).
    ///
    /// # Errors
    /// The connect error.
    pub async fn connect(host: &str, port: u16, tls: &ServerTls) -> io::Result<(ServerStream, ServerAddr)> {
        if is_socket_dir(host) {
            let path = Path::new(host).join(format!(".s.PGSQL.{port}"));
            let s = UnixStream::connect(&path).await?;
            Ok((ServerStream::Unix(s), ServerAddr::Unix(path.into())))
        } else {
            let s = TcpStream::connect((host, port)).await?;
            s.set_nodelay(true)?;
            let peer = s.peer_addr()?;
            Ok((start_tls(s, host, tls).await?, ServerAddr::Tcp(peer)))
        }
    }

    /// The `tls-server-end-point` channel-binding data of the server's certificate (TLS only).
    pub fn channel_binding(&self) -> Option<Vec<u8>> {
        match self {
            ServerStream::Tls(s) => crate::tls::end_point_hash(s.get_ref().1.peer_certificates()?.first()?),
            _ => None,
        }
    }

    /// Connects to a known address (for cancel requests).
    ///
    /// # Errors
    /// The connect error.
    pub(crate) async fn connect_addr(addr: &ServerAddr) -> io::Result<ServerStream> {
        // PostgreSQL reads a cancel request before any TLS or authentication.
        Ok(match addr {
            ServerAddr::Tcp(a) => ServerStream::Tcp(TcpStream::connect(a).await?),
            ServerAddr::Unix(p) => ServerStream::Unix(UnixStream::connect(&**p).await?),
        })
    }

    /// A duplicate of the socket's descriptor (the TCP socket under TLS), to learn when the
    /// server has closed the connection after this stream is gone (see `server::close`).
    ///
    /// # Errors
    /// A failed `dup`.
    pub(crate) fn dup(&self) -> io::Result<SocketDup> {
        use std::os::fd::AsFd;
        Ok(match self {
            ServerStream::Tcp(s) => SocketDup::Tcp(s.as_fd().try_clone_to_owned()?),
            ServerStream::Unix(s) => SocketDup::Unix(s.as_fd().try_clone_to_owned()?),
            ServerStream::Tls(s) => SocketDup::Tcp(s.get_ref().0.as_fd().try_clone_to_owned()?),
        })
    }

    /// Non-blocking read (the pool's liveness probe).
    ///
    /// # Errors
    /// `WouldBlock` when nothing is there, or the socket error.
    pub(crate) fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Tcp(s) => s.try_read(buf),
            ServerStream::Unix(s) => s.try_read(buf),
            ServerStream::Tls(s) => crate::tls::try_read(&mut **s, buf),
        }
    }

    /// Whether this stream's event loop has seen it readable since it was last read to the end
    /// (no system call: tokio's record of the socket's readiness). An idle server connection
    /// that is readable was closed or written to; false says nothing for a stream registered
    /// with an event loop too recently for it to have looked.
    pub(crate) fn seen_readable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let ready = match self {
            ServerStream::Tcp(s) => s.poll_read_ready(&mut cx),
            ServerStream::Unix(s) => s.poll_read_ready(&mut cx),
            ServerStream::Tls(s) => s.get_ref().0.poll_read_ready(&mut cx),
        };
        ready.is_ready()
    }

    /// Whether the server sent anything on this idle connection (or closed it), asked of the
    /// socket itself: a peek that reads nothing, whatever tokio last saw of its readiness (a
    /// stream just registered on another event loop has seen nothing yet). `Ok(0)`: closed;
    /// `Err(WouldBlock)`: nothing came. TLS streams are read as [`ServerStream::try_read`].
    pub(crate) fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use rustix::net::{recv, RecvFlags};
        use std::os::fd::AsFd;
        let flags = RecvFlags::PEEK | RecvFlags::DONTWAIT;
        let peeked = match self {
            ServerStream::Tcp(s) => recv(s.as_fd(), buf, flags),
            ServerStream::Unix(s) => recv(s.as_fd(), buf, flags),
            ServerStream::Tls(_) => return self.try_read(buf),
        };
        Ok(peeked?.0)
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Asks for TLS (SSLRequest) as `tls.mode` says and runs the handshake.
async fn start_tls(mut s: TcpStream, host: &str, tls: &ServerTls) -> io::Result<ServerStream> {
    let Some(connector) = tls.connector.as_ref().filter(|_| tls.mode != ServerTlsMode::Disable) else {
        return Ok(ServerStream::Tcp(s));
    };
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8i32.to_be_bytes());
    request[4..].copy_from_slice(&crate::protocol::startup::SSL_REQUEST_CODE.to_be_bytes());
    s.write_all(&request).await?;
    // Exactly one byte: anything after it would be unencrypted data the server had no right to send.
    match s.read_u8().await? {
        encryption::SSL_ACCEPTED => {}
        encryption::REFUSED if tls.mode == ServerTlsMode::Prefer => return Ok(ServerStream::Tcp(s)),
        encryption::REFUSED => {
            return Err(io::Error::other(format!(
                "the server does not offer TLS (server_tls_mode = {})",
                tls.mode
            )))
        }
        b => return Err(io::Error::other(format!("unexpected answer {b:#x} to SSLRequest"))),
    }
    let name = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::other(format!("{host:?} is not a valid TLS server name: {e}")))?,
    };
    let stream = connector
        .connect(name, s)
        .await
        .map_err(|e| io::Error::other(format!("TLS handshake (server_tls_mode = {}): {e}", tls.mode)))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}

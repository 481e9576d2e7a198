//! The PROXY protocol on a client socket: the real client address behind a TCP load balancer.
//!
//! Part of the client session, its very first step: from an address in
//! `proxy_protocol_trusted` the connection must open with a PROXY header (v1 or v2, parsed by
//! [`crate::protocol::proxy_header`]), read before anything else and only up to its last
//! byte, so TLS and the startup packet that follow are read as from any client. The address
//! it carries then stands for the client everywhere (identities, limits, SHOW CLIENTS, logs,
//! lock attribution). A header from any other address is refused in [`super::opening`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::SessionError;
use crate::protocol::proxy_header::{self, ProxyHeader, MAX_HEADER};

/// Reads the PROXY header a trusted balancer at `peer` sends first and returns the client's
/// address it carries (the socket's own for LOCAL and UNKNOWN headers).
///
/// # Errors
/// [`SessionError::ProxyHeader`] for a missing, malformed or too long header, or none within
/// `timeout`; [`SessionError::ClientGone`] when the socket closes first.
pub(crate) async fn client_addr(
    stream: &mut TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr, SessionError> {
    // Boxed: the fixed buffer lives only while the header is read, not in the session's task.
    let header = tokio::time::timeout(timeout, Box::pin(read_header(stream, peer)))
        .await
        .map_err(|_| {
            SessionError::ProxyHeader(peer, format!("no header within {timeout:?} (client_login_timeout)"))
        })??;
    Ok(match header {
        ProxyHeader::Proxied { source, .. } => source,
        ProxyHeader::Local | ProxyHeader::Unknown => peer,
    })
}

/// Reads exactly the header's bytes into a buffer of fixed size ([`MAX_HEADER`]).
async fn read_header(stream: &mut TcpStream, peer: SocketAddr) -> Result<ProxyHeader, SessionError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut filled = 0;
    loop {
        match proxy_header::parse(&buf[..filled]) {
            Ok(Some((header, _))) => return Ok(header),
            Ok(None) => {}
            Err(e) => return Err(SessionError::ProxyHeader(peer, e.to_string())),
        }
        let want = proxy_header::wanted(&buf[..filled]).min(MAX_HEADER);
        if want <= filled {
            return Err(SessionError::ProxyHeader(peer, "header too long".into()));
        }
        match stream.read(&mut buf[filled..want]).await {
            Ok(0) => return Err(SessionError::ClientGone(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) => return Err(SessionError::ClientGone(e)),
        }
    }
}

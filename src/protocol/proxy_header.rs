//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a TCP load balancer sends
//! before the client's own bytes, carrying the client's real address.
//!
//! Bottom layer, sans-IO: [`parse`] reads a header from the front of a buffer and says how
//! long it was; [`wanted`] says how many bytes the reader may take from the socket without
//! reading past the header (the PostgreSQL or TLS bytes behind it stay in the socket). The
//! client session reads the header only from trusted addresses (`proxy_protocol_trusted`).
//! Lengths from the wire are checked against [`MAX_HEADER`] before anything is read by them,
//! and nothing is allocated: the reader's buffer has a fixed size.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What a v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 line, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
/// Shortest v1 line (`PROXY UNKNOWN\r\n`): the first read takes this many bytes.
pub const MIN_HEADER: usize = 15;
/// Longest header accepted: the v2 fixed part and up to 2032 bytes of addresses and TLVs
/// (the addresses take at most 216; load balancers' TLVs a few dozen).
pub const MAX_HEADER: usize = 2048;
const V2_FIXED: usize = 16;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A TCP connection from `source` to `destination`, relayed by the balancer.
    Proxied {
        /// The client's address.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The balancer's own connection (v2 LOCAL, such as a health check): the socket's
    /// address stands.
    Local,
    /// An address the proxy does not use (v1 UNKNOWN, v2 UNSPEC, UNIX or datagram): the
    /// socket's address stands.
    Unknown,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The bytes are not a PROXY header.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// Longer than [`MAX_HEADER`] (v2) or [`V1_MAX`] (v1).
    #[error("PROXY protocol header too long")]
    TooLong,
    /// A header that breaks the format.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
}

/// Parses the header at the front of `buf`: `Ok(None)` while `buf` holds only part of one,
/// else the header and its length in bytes.
///
/// # Errors
/// [`HeaderError`] when the bytes cannot be the start of a valid header.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, HeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() { Ok(None) } else { parse_v1(buf) };
    }
    Err(HeaderError::NotProxy)
}

/// How many bytes the buffer should hold before [`parse`] is asked again, given that it
/// returned `Ok(None)` for `buf`; never more than the header is long, so a reader that fills
/// its buffer to this size takes no byte after the header.
pub fn wanted(buf: &[u8]) -> usize {
    if buf.len() < MIN_HEADER {
        return MIN_HEADER;
    }
    if buf.starts_with(&V2_SIGNATURE) {
        return match v2_len(buf) {
            Some(len) => V2_FIXED + len,
            None => V2_FIXED,
        };
    }
    // v1: the line ends with CRLF; a trailing CR may be followed by its LF alone.
    match buf.last() {
        Some(b'\r') => buf.len() + 1,
        _ => buf.len() + 2,
    }
}

/// The v2 length field, once the fixed part is there.
fn v2_len(buf: &[u8]) -> Option<usize> {
    let b = buf.get(14..16)?;
    Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, HeaderError> {
    let Some(len) = v2_len(buf) else {
        return Ok(None);
    };
    let total = V2_FIXED + len;
    if total > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(HeaderError::Malformed("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(HeaderError::Malformed("unknown command")),
    };
    if buf.len() < total {
        return Ok(None);
    }
    if local {
        // The balancer's own connection: its address block, if any, is ignored.
        return Ok(Some((ProxyHeader::Local, total)));
    }
    let body = &buf[V2_FIXED..total];
    let addr_len = match fam >> 4 {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(HeaderError::Malformed("unknown address family")),
    };
    if body.len() < addr_len {
        return Err(HeaderError::Malformed("address block shorter than its family"));
    }
    let stream = fam & 0x0f == 1;
    let header = match fam >> 4 {
        1 if stream => {
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]));
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 if stream => {
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&body[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        _ => ProxyHeader::Unknown,
    };
    Ok(Some((header, total)))
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        if window.len() == V1_MAX {
            return Err(HeaderError::TooLong);
        }
        // A lone LF, or a CR not followed by LF, can never become a valid line.
        if window
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' || (b == b'\r' && i + 1 < window.len()))
        {
            return Err(HeaderError::Malformed("v1 line not ended by CRLF"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..cr]).map_err(|_| HeaderError::Malformed("v1 not ASCII"))?;
    let mut fields = line.split(' ');
    let header = match fields.next() {
        Some("UNKNOWN") => ProxyHeader::Unknown,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let v4 = proto == "TCP4";
            let mut next = || fields.next().ok_or(HeaderError::Malformed("v1 field missing"));
            let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
            if fields.next().is_some() {
                return Err(HeaderError::Malformed("v1 has extra fields"));
            }
            ProxyHeader::Proxied {
                source: SocketAddr::new(v1_ip(src, v4)?, v1_port(sport)?),
                destination: SocketAddr::new(v1_ip(dst, v4)?, v1_port(dport)?),
            }
        }
        _ => return Err(HeaderError::Malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Some((header, cr + 2)))
}

fn v1_ip(s: &str, v4: bool) -> Result<IpAddr, HeaderError> {
    let bad = HeaderError::Malformed("v1 address");
    if v4 {
        s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad)
    } else {
        s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad)
    }
}

fn v1_port(s: &str) -> Result<u16, HeaderError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeaderError::Malformed("v1 port"));
    }
    s.parse().map_err(|_| HeaderError::Malformed("v1 port"))
}

/// Encodes a v2 PROXY header for a TCP connection (for tests and tools).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// Encodes a v1 PROXY header line for a TCP connection (for tests and tools).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let proto = if source.is_ipv4() && destination.is_ipv4() {
        "TCP4"
    } else {
        "TCP6"
    };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 6432\r\nrest";
        let (p, n) = parse(h).unwrap().unwrap();
        assert_eq!(n, h.len() - 4);
        assert_eq!(
            p,
            ProxyHeader::Proxied {
                source: "192.0.2.1:5555".parse().unwrap(),
                destination: "198.51.100.2:6432".parse().unwrap()
            }
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Some((ProxyHeader::Unknown, 15)));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4").unwrap(), None);
        assert!(parse(b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 70000\r\n").is_err());
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert_eq!(parse(&[b'P'; 200]), Err(HeaderError::NotProxy));
    }

    #[test]
    fn v2_local_tcp6_and_limits() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).unwrap(), Some((ProxyHeader::Local, 16)));
        let h = encode_v2("[2001:db8::1]:40000".parse().unwrap(), "[::1]:6432".parse().unwrap());
        let (p, n) = parse(&h).unwrap().unwrap();
        assert_eq!(n, 52);
        assert!(matches!(p, ProxyHeader::Proxied { source, .. } if source.port() == 40000));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(HeaderError::TooLong));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse(&short).is_err());
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(parse(&v3).is_err());
    }
}

//! The untagged first packet of a client connection: SSLRequest, GSSENCRequest, CancelRequest
//! or StartupMessage (PostgreSQL protocol, "Start-up" and "Canceling Requests in Progress").
//!
//! First step of the client session: the listener hands the socket to the session, which reads
//! this packet with a small size limit before anything else. The startup body is decoded by
//! pgwire, but only as one isolated packet whose length was checked here first.

use bytes::{Buf, BytesMut};
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message};

use crate::error::{sqlstate, Side, Sided};

/// Request code of an SSLRequest.
pub(crate) const SSL_REQUEST_CODE: i32 = 80877103;
/// Request code of a GSSENCRequest.
pub(crate) const GSSENC_REQUEST_CODE: i32 = 80877104;
/// The newest protocol minor version pgvalve speaks with clients: 3.2 (PostgreSQL 18), which
/// differs from 3.0 only in the cancel key's length (up to 256 bytes).
pub const NEWEST_MINOR: u16 = 2;

/// Request code of a CancelRequest.
pub(crate) const CANCEL_REQUEST_CODE: i32 = 80877102;
/// pgvalve's own request code for a CancelRequest another instance of its cluster forwarded
/// (1234.28790; PostgreSQL's codes are 1234.5678 to 1234.5680): looked up locally only,
/// never forwarded again.
pub(crate) const FORWARDED_CANCEL_CODE: i32 = (1234 << 16) | 28790;
/// The ALPN protocol name of PostgreSQL (required for direct TLS).
pub const ALPN: &[u8] = b"postgresql";

/// The first packet of a connection, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialPacket {
    /// Client asks for TLS.
    SslRequest,
    /// Client asks for GSSAPI encryption.
    GssEncRequest,
    /// Cancel the query of the session with this key.
    Cancel {
        /// Process id from BackendKeyData.
        pid: i32,
        /// Secret key bytes from BackendKeyData (4 bytes in protocol 3.0).
        secret: Vec<u8>,
    },
    /// A CancelRequest another pgvalve instance of the cluster forwarded (pgvalve's own code).
    ForwardedCancel {
        /// Process id from BackendKeyData.
        pid: i32,
        /// Secret key bytes from BackendKeyData.
        secret: Vec<u8>,
    },
    /// A StartupMessage.
    Startup(StartupParams),
}

/// Why a first packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// Length field outside 8..=limit.
    #[error("invalid startup packet length {len} (limit {max})")]
    BadLength {
        /// Announced length.
        len: i32,
        /// The limit in force.
        max: usize,
    },
    /// A protocol major version other than 3, or an unknown request code.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol {
        /// Major version requested.
        major: u16,
        /// Minor version requested.
        minor: u16,
    },
    /// The body could not be decoded.
    #[error("invalid startup packet layout: {0}")]
    Malformed(String),
}

impl Sided for StartupError {
    fn side(&self) -> Side {
        Side::Client
    }

    fn sqlstate(&self) -> &str {
        match self {
            StartupError::UnsupportedProtocol { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            StartupError::BadLength { .. } | StartupError::Malformed(_) => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// Startup parameters by name, in name order. A client sends a handful, and they are kept for
/// the whole session: a sorted vector is a fraction of a map's size.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&String> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(name)).ok()?;
        Some(&self.0[i].1)
    }

    /// Whether `name` was sent.
    pub(crate) fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets `name` (replacing an earlier value).
    pub fn insert(&mut self, name: String, value: String) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&name)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }

    /// Removes `name`, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.0.binary_search_by(|(k, _)| k.as_str().cmp(name)).ok()?;
        Some(self.0.remove(i).1)
    }

    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Names and values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl FromIterator<(String, String)> for Params {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(it: I) -> Self {
        let mut p = Params::default();
        for (k, v) in it {
            p.insert(k, v);
        }
        p.0.shrink_to_fit();
        p
    }
}

/// Parameters of a StartupMessage, as sent by the client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupParams {
    /// Protocol minor version requested (major is always 3).
    pub minor: u16,
    /// All parameters, including user and database.
    pub params: Params,
}

impl StartupParams {
    /// The `user` parameter (required by the protocol; empty when missing).
    pub fn user(&self) -> &str {
        self.params.get("user").map(String::as_str).unwrap_or("")
    }

    /// The `database` parameter, defaulting to the user name as PostgreSQL does.
    pub fn database(&self) -> &str {
        match self.params.get("database") {
            Some(db) if !db.is_empty() => db,
            _ => self.user(),
        }
    }

    /// The `application_name` parameter, if any.
    pub fn application_name(&self) -> Option<&str> {
        self.params.get("application_name").map(String::as_str)
    }

    /// Protocol options (`_pq_.*`) that this proxy does not support (it supports none).
    pub(crate) fn protocol_options(&self) -> Vec<String> {
        self.params.keys().filter(|k| k.starts_with("_pq_.")).cloned().collect()
    }

    /// Whether the client must be sent NegotiateProtocolVersion (PostgreSQL does it when the
    /// minor version is above what it supports or `_pq_.` options are present).
    pub(crate) fn needs_negotiation(&self) -> bool {
        self.minor > NEWEST_MINOR || self.params.keys().any(|k| k.starts_with("_pq_."))
    }

    /// The protocol minor version spoken with this client: what it asked for, at most 3.2.
    pub fn protocol_minor(&self) -> u16 {
        self.minor.min(NEWEST_MINOR)
    }

    /// Session parameters to apply on the server: everything except the connection keys
    /// (`user`, `database`, `replication`, `_pq_.*`). `options` is returned as is.
    pub(crate) fn session_params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "replication") && !k.starts_with("_pq_."))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Splits the first packet off the front of `buf`, or `Ok(None)` when it is not all there yet.
///
/// # Errors
/// [`StartupError`] when the length is outside `8..=max` or the packet is not one we know.
pub fn split_initial(buf: &mut BytesMut, max: usize) -> Result<Option<InitialPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > max {
        return Err(StartupError::BadLength { len, max });
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST_CODE if len == 8 => Ok(Some(InitialPacket::SslRequest)),
        GSSENC_REQUEST_CODE if len == 8 => Ok(Some(InitialPacket::GssEncRequest)),
        CANCEL_REQUEST_CODE if (12..=12 + 256).contains(&len) => {
            packet.advance(8);
            let pid = packet.get_i32();
            Ok(Some(InitialPacket::Cancel {
                pid,
                secret: packet.to_vec(),
            }))
        }
        FORWARDED_CANCEL_CODE if (12..=12 + 256).contains(&len) => {
            packet.advance(8);
            let pid = packet.get_i32();
            Ok(Some(InitialPacket::ForwardedCancel {
                pid,
                secret: packet.to_vec(),
            }))
        }
        _ => decode_startup(packet, code).map(|s| Some(InitialPacket::Startup(s))),
    }
}

fn decode_startup(mut packet: BytesMut, code: i32) -> Result<StartupParams, StartupError> {
    let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
    if major != 3 {
        return Err(StartupError::UnsupportedProtocol { major, minor });
    }
    if packet.last() != Some(&0) {
        return Err(StartupError::Malformed("missing terminator".into()));
    }
    let ctx = DecodeContext::default();
    let startup = Startup::decode(&mut packet, &ctx)
        .map_err(|e| StartupError::Malformed(e.to_string()))?
        .ok_or_else(|| StartupError::Malformed("incomplete".into()))?;
    Ok(StartupParams {
        minor,
        params: startup.parameters.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn startup(minor: u16, params: &[(&str, &str)]) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u16(3);
        body.put_u16(minor);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::new();
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(&body);
        out
    }

    #[test]
    fn parses_startup_and_defaults() {
        let mut b = startup(0, &[("user", "app"), ("application_name", "web")]);
        let Some(InitialPacket::Startup(p)) = split_initial(&mut b, 10000).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(p.user(), "app");
        assert_eq!(p.database(), "app");
        assert_eq!(p.application_name(), Some("web"));
        assert!(!p.needs_negotiation());
        let s: Vec<_> = p.session_params().collect();
        assert_eq!(s, vec![("application_name", "web")]);
    }

    #[test]
    fn negotiation_needed_for_minor_and_pq_options() {
        let mut b = startup(2, &[("user", "u"), ("_pq_.test", "1")]);
        let Some(InitialPacket::Startup(p)) = split_initial(&mut b, 10000).unwrap() else {
            panic!()
        };
        assert!(p.needs_negotiation());
        assert_eq!(p.protocol_options(), vec!["_pq_.test".to_string()]);
    }

    #[test]
    fn classifies_requests_and_rejects_junk() {
        let mut b = BytesMut::new();
        b.put_i32(8);
        b.put_i32(SSL_REQUEST_CODE);
        assert_eq!(split_initial(&mut b, 10000), Ok(Some(InitialPacket::SslRequest)));
        let mut b = BytesMut::new();
        b.put_i32(16);
        b.put_i32(CANCEL_REQUEST_CODE);
        b.put_i32(42);
        b.put_i32(7);
        assert_eq!(
            split_initial(&mut b, 10000),
            Ok(Some(InitialPacket::Cancel {
                pid: 42,
                secret: 7i32.to_be_bytes().to_vec()
            }))
        );
        let mut b = BytesMut::new();
        b.put_i32(44);
        b.put_i32(FORWARDED_CANCEL_CODE);
        b.put_i32(42);
        b.put_slice(&[9; 32]);
        assert_eq!(
            split_initial(&mut b, 10000),
            Ok(Some(InitialPacket::ForwardedCancel {
                pid: 42,
                secret: vec![9; 32]
            }))
        );
        let mut b = BytesMut::from(&[0x40u8, 0, 0, 0][..]);
        assert!(split_initial(&mut b, 10000).is_err());
        let mut b = BytesMut::from(&[0u8, 0, 0, 2][..]);
        assert!(split_initial(&mut b, 10000).is_err());
        let mut b = BytesMut::new();
        b.put_i32(12);
        b.put_i32(0x0002_0000);
        b.put_i32(0);
        assert!(matches!(
            split_initial(&mut b, 10000),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        // truncated: not an error, just not there yet
        let full = startup(0, &[("user", "u")]);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(split_initial(&mut b, 10000), Ok(None));
        }
    }

    #[test]
    fn startup_errors_are_the_clients() {
        let cases = [
            (StartupError::BadLength { len: 4, max: 10000 }, "08P01"),
            (StartupError::UnsupportedProtocol { major: 2, minor: 0 }, "0A000"),
            (StartupError::Malformed("incomplete".into()), "08P01"),
        ];
        for (e, code) in cases {
            assert_eq!((e.side(), e.sqlstate()), (Side::Client, code), "{e}");
        }
    }
}

//! The protocol version spoken with PostgreSQL and the server's cancel key: the startup
//! packet asks for 3.2, NegotiateProtocolVersion says what the server speaks instead (3.0
//! before PostgreSQL 18), BackendKeyData carries the server's secret (4 bytes in 3.0, up to
//! 256 in 3.2; PostgreSQL 18 gives 32), and CancelRequest sends that secret back whole.
//!
//! Part of the server connection ([`super`]): login reads these messages by tag (the
//! postgres-protocol parser knows neither NegotiateProtocolVersion nor a key longer than 4
//! bytes); every cancel toward a server (cancel forwarding, query_timeout, discarding a busy
//! connection, recovery) goes through [`super::send_cancel`] with the stored secret.

use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ServerConn, ServerError, ServerTarget};
use crate::error::sqlstate;

/// The minor version pgvalve asks servers for: 3.2 (PostgreSQL 18). Only the cancel key's
/// length differs from 3.0.
pub(crate) const REQUESTED_MINOR: u16 = 2;

/// Longest secret protocol 3.2 allows in BackendKeyData.
pub(crate) const MAX_SECRET: usize = 256;

/// Request code of a CancelRequest.
const CANCEL_REQUEST_CODE: i32 = 80877102;

/// The StartupMessage for protocol `3.minor` with `params` (name, value).
///
/// # Errors
/// A name or value containing a NUL byte.
pub(crate) fn startup_message(minor: u16, params: &[(&str, &str)], out: &mut BytesMut) -> Result<(), ServerError> {
    let start = out.len();
    out.put_i32(0);
    out.put_i32((3 << 16) | i32::from(minor));
    for s in params.iter().flat_map(|(n, v)| [n, v]) {
        if s.contains('\0') {
            return Err(ServerError::Protocol(format!(
                "a startup parameter contains a NUL byte: {s:?}"
            )));
        }
        out.put_slice(s.as_bytes());
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = i32::try_from(out.len() - start).map_err(|_| ServerError::Protocol("startup packet too long".into()))?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// The minor version a server's NegotiateProtocolVersion body offers, when pgvalve asked for
/// `asked`. PostgreSQL sends the full version number (`3 << 16 | minor`); a bare minor is
/// read the same way. The `_pq_` options it lists are ignored (pgvalve sends none).
///
/// # Errors
/// A short body, another major version, or a minor above what was asked.
pub(crate) fn negotiated_minor(body: &[u8], asked: u16) -> Result<u16, ServerError> {
    let Some(v) = body.get(..4) else {
        return Err(ServerError::Protocol("short NegotiateProtocolVersion".into()));
    };
    let v = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
    let (major, minor) = (v >> 16, (v & 0xffff) as u16);
    if !(major == 3 || major == 0) || minor > asked {
        return Err(ServerError::Protocol(format!(
            "NegotiateProtocolVersion offers {major}.{minor} after a request for 3.{asked}"
        )));
    }
    Ok(minor)
}

/// The backend pid and secret of a BackendKeyData body: 4 bytes of pid, then a secret of 4
/// to [`MAX_SECRET`] bytes (the frame was already bounded; nothing longer is kept).
///
/// # Errors
/// A secret shorter than 4 or longer than [`MAX_SECRET`] bytes.
pub(crate) fn backend_key(body: &[u8]) -> Result<(i32, Bytes), ServerError> {
    match body.split_first_chunk::<4>() {
        Some((pid, secret)) if (4..=MAX_SECRET).contains(&secret.len()) => {
            Ok((i32::from_be_bytes(*pid), Bytes::copy_from_slice(secret)))
        }
        _ => Err(ServerError::Protocol(format!(
            "BackendKeyData of {} bytes (a secret of 4 to {MAX_SECRET} bytes expected)",
            body.len()
        ))),
    }
}

/// A CancelRequest for backend `pid` with its whole `secret`.
pub(crate) fn cancel_request(pid: i32, secret: &[u8], out: &mut BytesMut) {
    // The secret is at most MAX_SECRET bytes (`backend_key`), so the length fits.
    out.put_i32(12 + secret.len() as i32);
    out.put_i32(CANCEL_REQUEST_CODE);
    out.put_i32(pid);
    out.put_slice(secret);
}

/// Logs in to `target` asking for protocol 3.2. A server that refuses the request where
/// PostgreSQL would negotiate ([`refused_version`]: servers from before 2017's minor releases,
/// poolers or look-alikes that know no NegotiateProtocolVersion) is logged in to again with
/// 3.0, once it has closed the first connection, so it never sees two for one slot.
pub(super) async fn connect_negotiating(target: &ServerTarget, addr: &str) -> Result<ServerConn, ServerError> {
    let mut conn = super::open(target, addr, REQUESTED_MINOR).await?;
    let refusal = match conn.login(target).await {
        Ok(()) => return Ok(conn),
        Err(e) if refused_version(&e) => e,
        Err(e) => return Err(e),
    };
    tracing::debug!(server = %addr, error = %refusal, "protocol 3.2 refused; logging in with 3.0");
    let _ = conn.stream.shutdown().await;
    let mut sink = [0u8; 1024];
    while matches!(conn.stream.read(&mut sink).await, Ok(n) if n > 0) {}
    drop(conn);
    let mut conn = super::open(target, addr, 0).await?;
    conn.login(target).await?;
    Ok(conn)
}

/// Whether a failed login asking for 3.2 may be a refusal of the version itself: an
/// ErrorResponse with 0A000 (old PostgreSQL's "unsupported frontend protocol") or 08P01 (a
/// protocol violation, as other implementations may call it), or a close without a word.
pub(crate) fn refused_version(e: &ServerError) -> bool {
    match e {
        ServerError::Postgres(p) => {
            [sqlstate::FEATURE_NOT_SUPPORTED, sqlstate::PROTOCOL_VIOLATION].contains(&p.code.as_str())
        }
        ServerError::Io(e) => e.kind() == io::ErrorKind::UnexpectedEof,
        _ => false,
    }
}

/// How a minor version reads in SHOW SERVERS: `3.0`, `3.2`.
pub(crate) fn label(minor: u16) -> String {
    format!("3.{minor}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_startup_packet_asks_for_the_minor_given() {
        let mut w = BytesMut::new();
        startup_message(2, &[("user", "app"), ("database", "db")], &mut w).unwrap();
        assert_eq!(&w[..8], &[0, 0, 0, 30, 0, 3, 0, 2]);
        assert_eq!(&w[8..], b"user\0app\0database\0db\0\0");
        let mut w = BytesMut::new();
        startup_message(0, &[("user", "a")], &mut w).unwrap();
        assert_eq!(&w[4..8], &196608i32.to_be_bytes());
        assert!(startup_message(2, &[("user", "a\0b")], &mut BytesMut::new()).is_err());
    }

    #[test]
    fn negotiation_accepts_older_minors_of_major_3_only() {
        let body = |v: u32| [&v.to_be_bytes()[..], &0u32.to_be_bytes()].concat();
        assert_eq!(negotiated_minor(&body(3 << 16), 2).unwrap(), 0);
        assert_eq!(negotiated_minor(&body(0), 2).unwrap(), 0);
        assert_eq!(negotiated_minor(&body((3 << 16) | 2), 2).unwrap(), 2);
        assert!(negotiated_minor(&body((3 << 16) | 3), 2).is_err());
        assert!(negotiated_minor(&body(4 << 16), 2).is_err());
        assert!(negotiated_minor(&[0, 3], 2).is_err());
    }

    /// Both key lengths: a 3.0 server's 4-byte secret and a 3.2 server's 32-byte one (and the
    /// longest 3.2 allows) are kept whole and sent back whole in the CancelRequest.
    #[test]
    fn short_and_long_server_keys_round_trip_into_cancel_requests() {
        for len in [4usize, 32, MAX_SECRET] {
            let secret: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let body = [&4242i32.to_be_bytes()[..], &secret].concat();
            let (pid, kept) = backend_key(&body).unwrap();
            assert_eq!((pid, &kept[..]), (4242, &secret[..]));
            let mut w = BytesMut::new();
            cancel_request(pid, &kept, &mut w);
            assert_eq!(w.len(), 12 + len);
            assert_eq!(&w[..4], &((12 + len) as i32).to_be_bytes());
            assert_eq!(&w[4..8], &80877102i32.to_be_bytes());
            assert_eq!(&w[8..12], &4242i32.to_be_bytes());
            assert_eq!(&w[12..], &secret[..]);
        }
        // The 3.0 request is exactly what postgres-protocol encodes.
        let mut ours = BytesMut::new();
        cancel_request(7, &9i32.to_be_bytes(), &mut ours);
        let mut theirs = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(7, 9, &mut theirs);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn refusals_of_the_version_are_told_from_other_login_failures() {
        let pg = |code: &str| ServerError::Postgres(crate::error::PgError::fatal(code, "m"));
        assert!(refused_version(&pg("0A000")) && refused_version(&pg("08P01")));
        assert!(!refused_version(&pg("28P01")) && !refused_version(&pg("28000")) && !refused_version(&pg("53300")));
        assert!(refused_version(&ServerError::Io(io::ErrorKind::UnexpectedEof.into())));
        assert!(!refused_version(&ServerError::Io(
            io::ErrorKind::ConnectionRefused.into()
        )));
    }

    #[test]
    fn keys_outside_4_to_256_bytes_are_refused() {
        for len in [0usize, 3, MAX_SECRET + 1, 1 << 16] {
            let body = [&1i32.to_be_bytes()[..], &vec![1u8; len]].concat();
            assert!(backend_key(&body).is_err(), "{len}");
        }
        assert!(backend_key(&[0, 0, 1]).is_err());
    }
}

//! Messages the proxy itself says or must understand, off the hot path.
//!
//! Encoding of what the proxy originates (authentication requests, ParameterStatus,
//! BackendKeyData, ErrorResponse, ReadyForQuery, NegotiateProtocolVersion) goes through
//! pgwire's typed messages into the caller's `BytesMut`. Decoding is only ever done on one
//! isolated, length-checked frame: SASL bodies from clients with pgwire after a layout check
//! (its decoders panic on short bodies), server messages with postgres-protocol's
//! bounds-checked parser.

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, PasswordMessageFamily, SecretKey,
};
use pgwire::messages::Message;
use postgres_protocol::message::backend;

use crate::error::{PgError, Severity};
use crate::protocol::frame::Frame;
use crate::protocol::tags::{self, field, frontend};

fn put<M: Message>(m: M, out: &mut BytesMut) {
    // Encoding into a BytesMut only fails for values over the protocol's size limits, which
    // nothing the proxy says comes near.
    if let Err(e) = m.encode(out) {
        tracing::error!(error = %e, "encoding a proxy message failed");
    }
}

/// AuthenticationOk.
pub(crate) fn auth_ok(out: &mut BytesMut) {
    put(Authentication::Ok, out);
}

/// AuthenticationSASL offering `mechanisms`.
pub(crate) fn auth_sasl(mechanisms: &[&str], out: &mut BytesMut) {
    put(
        Authentication::SASL(mechanisms.iter().map(|m| m.to_string()).collect()),
        out,
    );
}

/// AuthenticationSASLContinue.
pub(crate) fn auth_sasl_continue(data: &[u8], out: &mut BytesMut) {
    put(Authentication::SASLContinue(Bytes::copy_from_slice(data)), out);
}

/// AuthenticationSASLFinal.
pub(crate) fn auth_sasl_final(data: &[u8], out: &mut BytesMut) {
    put(Authentication::SASLFinal(Bytes::copy_from_slice(data)), out);
}

/// ParameterStatus.
pub(crate) fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    put(ParameterStatus::new(name.into(), value.into()), out);
}

/// BackendKeyData with a protocol 3.0 (i32) key.
pub(crate) fn backend_key_data(pid: i32, secret: &[u8], out: &mut BytesMut) {
    let key = match <[u8; 4]>::try_from(secret) {
        Ok(b) => SecretKey::I32(i32::from_be_bytes(b)),
        // Protocol 3.2's longer key.
        Err(_) => SecretKey::Bytes(bytes::Bytes::copy_from_slice(secret)),
    };
    put(BackendKeyData::new(pid, key), out);
}

/// ReadyForQuery with the status byte `I`, `T` or `E` ([`tags::status`]).
pub(crate) fn ready_for_query(status: u8, out: &mut BytesMut) {
    let status = match status {
        tags::status::IN_TRANSACTION => TransactionStatus::Transaction,
        tags::status::FAILED => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put(ReadyForQuery::new(status), out);
}

/// The protocol version the proxy speaks with clients: 3.0, as `major << 16 | minor`.
pub(crate) const PROTOCOL_3_0: i32 = 3 << 16;

/// NegotiateProtocolVersion: the newest version we speak (3.0, sent as the full version
/// number, as PostgreSQL does and as libpq 18 reads it; a bare minor 0 reads there as a
/// downgrade below 3.0) and the `_pq_` options we do not support.
pub(crate) fn negotiate_protocol_version(minor: u16, unsupported: Vec<String>, out: &mut BytesMut) {
    put(
        NegotiateProtocolVersion::new(PROTOCOL_3_0 | i32::from(minor), unsupported),
        out,
    );
}

fn fields(e: &PgError) -> Vec<(u8, String)> {
    let mut f = vec![
        (field::SEVERITY, e.severity.as_str().to_string()),
        (field::SEVERITY_V, e.severity.as_str().to_string()),
        (field::CODE, e.code.clone()),
        (field::MESSAGE, e.message.clone()),
    ];
    if let Some(d) = &e.detail {
        f.push((field::DETAIL, d.clone()));
    }
    if let Some(h) = &e.hint {
        f.push((field::HINT, h.clone()));
    }
    f
}

/// ErrorResponse.
pub(crate) fn error_response(e: &PgError, out: &mut BytesMut) {
    put(ErrorResponse::new(fields(e)), out);
}

/// NoticeResponse with severity NOTICE.
pub(crate) fn notice_response(code: &str, message: &str, out: &mut BytesMut) {
    put(
        NoticeResponse::new(vec![
            (field::SEVERITY, "NOTICE".into()),
            (field::SEVERITY_V, "NOTICE".into()),
            (field::CODE, code.into()),
            (field::MESSAGE, message.into()),
        ]),
        out,
    );
}

/// Column types the admin console uses (PostgreSQL type OIDs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnType {
    /// text.
    Text,
    /// int8.
    Int8,
    /// float8.
    Float8,
}

/// RowDescription of text-format columns.
pub(crate) fn row_description(columns: &[(&str, ColumnType)], out: &mut BytesMut) {
    let fields = columns
        .iter()
        .map(|(name, t)| {
            let (oid, size) = match t {
                ColumnType::Text => (25, -1),
                ColumnType::Int8 => (20, 8),
                ColumnType::Float8 => (701, 8),
            };
            FieldDescription::new(name.to_string(), 0, 0, oid, size, -1, 0)
        })
        .collect();
    put(RowDescription::new(fields), out);
}

/// DataRow of text values (None = NULL).
pub(crate) fn data_row(values: &[Option<String>], out: &mut BytesMut) {
    let mut data = BytesMut::new();
    for v in values {
        match v {
            None => data.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(s) => {
                data.extend_from_slice(&(s.len() as i32).to_be_bytes());
                data.extend_from_slice(s.as_bytes());
            }
        }
    }
    put(DataRow::new(data, values.len() as i16), out);
}

/// CommandComplete with `tag`.
pub(crate) fn command_complete(tag: &str, out: &mut BytesMut) {
    put(CommandComplete::new(tag.to_string()), out);
}

/// The SASL payload of a client's SASLInitialResponse: `(mechanism, data)`.
///
/// Returns `None` for a malformed body (checked here, before pgwire sees it).
pub fn sasl_initial_response(frame: Frame) -> Option<(String, Bytes)> {
    let body = frame.body();
    let (_mechanism, rest) = tags::split_cstr(body)?;
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    if len < 0 || rest.len() - 4 != len as usize || frame.tag != frontend::PASSWORD {
        return None;
    }
    let mut bytes = frame.bytes;
    let msg = PasswordMessageFamily::decode(&mut bytes, &Default::default()).ok()??;
    let init = msg.into_sasl_initial_response().ok()?;
    Some((init.auth_method, init.data?))
}

/// The SASL payload of a client's SASLResponse.
pub fn sasl_response(frame: Frame) -> Option<Bytes> {
    if frame.tag != frontend::PASSWORD {
        return None;
    }
    let mut bytes = frame.bytes;
    let msg = PasswordMessageFamily::decode(&mut bytes, &Default::default()).ok()??;
    msg.into_sasl_response().ok().map(|r| r.data)
}

/// The password of a client's PasswordMessage (the MD5 answer).
pub fn password_message(frame: Frame) -> Option<String> {
    if frame.tag != frontend::PASSWORD {
        return None;
    }
    let mut bytes = frame.bytes;
    let msg = PasswordMessageFamily::decode(&mut bytes, &Default::default()).ok()??;
    msg.into_password().ok().map(|p| p.password)
}

/// AuthenticationMD5Password with `salt`.
pub(crate) fn auth_md5(salt: [u8; 4], out: &mut BytesMut) {
    out.extend_from_slice(&[b'R', 0, 0, 0, 12, 0, 0, 0, 5]);
    out.extend_from_slice(&salt);
}

/// Parses one whole ErrorResponse or NoticeResponse frame from a server.
pub fn parse_server_error(frame: &Frame) -> Option<PgError> {
    let mut bytes = frame.bytes.clone();
    let body = match backend::Message::parse(&mut bytes).ok()?? {
        backend::Message::ErrorResponse(b) => b,
        _ => return None,
    };
    let mut e = PgError::error("XX000", "");
    let mut it = body.fields();
    while let Ok(Some(f)) = it.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            field::SEVERITY_V if v == "FATAL" || v == "PANIC" => e.severity = Severity::Fatal,
            field::CODE => e.code = v,
            field::MESSAGE => e.message = v,
            field::DETAIL => e.detail = Some(v),
            field::HINT => e.hint = Some(v),
            _ => {}
        }
    }
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::split_frame;

    #[test]
    fn error_roundtrip_through_server_parser() {
        let e = PgError::fatal("53300", "too many").with_hint("wait");
        let mut out = BytesMut::new();
        error_response(&e, &mut out);
        let f = split_frame(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(parse_server_error(&f), Some(e));
    }

    #[test]
    fn sasl_initial_rejects_short_bodies_without_panicking() {
        for body in [&b""[..], b"SCRAM", b"SCRAM\0", b"SCRAM\0\0\0", b"SCRAM\0\0\0\0\x09abc"] {
            let mut b = BytesMut::new();
            b.extend_from_slice(b"p");
            b.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            b.extend_from_slice(body);
            let f = split_frame(&mut b, 1000).unwrap().unwrap();
            assert_eq!(sasl_initial_response(f), None);
        }
        let mut b = BytesMut::new();
        let body = b"SCRAM-SHA-256\0\0\0\0\x03abc";
        b.extend_from_slice(b"p");
        b.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        b.extend_from_slice(body);
        let f = split_frame(&mut b, 1000).unwrap().unwrap();
        let (m, d) = sasl_initial_response(f).unwrap();
        assert_eq!(m, "SCRAM-SHA-256");
        assert_eq!(&d[..], b"abc");
    }
}

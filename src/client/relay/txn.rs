//! Transaction-mode helpers of the relay: what pins a session, tracked parameters reported by
//! the server, and message-by-message handling when prepared statements are tracked.

use super::*;
use crate::client::prepared::split_cstr;
use crate::client::sql::deallocates_all;

/// The text of a C string at the start of `b`, and what follows it.
pub(super) fn cstr(b: &[u8]) -> Option<(std::borrow::Cow<'_, str>, &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((String::from_utf8_lossy(&b[..nul]), &b[nul + 1..]))
}

/// Why a whole Query ('Q') or Parse ('P') message pins the session, if it does. A named
/// Parse pins only when statements are not tracked (`named_pins`).
pub(super) fn pin_reason(tag: u8, msg: &[u8], named_pins: bool) -> Option<&'static str> {
    let body = msg.get(5..)?;
    let named_parse = named_pins && tag == b'P';
    if !named_parse && !crate::client::sql::might_change_session(body) {
        return None;
    }
    match tag {
        b'Q' => session_state_change(&cstr(body)?.0),
        b'P' => {
            let (name, rest) = cstr(body)?;
            if named_pins && !name.is_empty() {
                return Some("named prepared statement (max_prepared_statements = 0)");
            }
            session_state_change(&cstr(rest)?.0)
        }
        _ => None,
    }
}

/// Records a ParameterStatus of a tracked parameter (see `sql::TRACKED_PARAMETERS`).
pub(super) fn note_reported(msg: &[u8], reported: &mut Vec<(String, String)>) {
    if let Some((name, rest)) = msg.get(5..).and_then(cstr) {
        if crate::client::sql::TRACKED_PARAMETERS.contains(&name.to_ascii_uppercase().as_str()) {
            if let Some((value, _)) = cstr(rest) {
                reported.push((name.into_owned(), value.into_owned()));
            }
        }
    }
}

/// Logs and counts a pin the tracker just found.
pub(super) fn note_pin(t: &Tracker, mode: &mut Mode) {
    if t.pin.is_some() && mode.pinned.is_none() {
        mode.pinned = t.pin;
        mode.pins.add(t.pin.unwrap_or("unknown"));
        tracing::info!(reason = t.pin, client = %mode.who, "session pinned to its server connection until it disconnects");
    }
}

/// Transaction mode with statement tracking: handles every whole client message in `c_in`
/// (a partial one stays there), renaming statements for the server.
pub(super) fn client_frames(
    c_in: &mut BytesMut,
    max: usize,
    t: &mut Tracker,
    st: &mut ClientStatements,
    out: &mut Outputs<'_>,
    reject: bool,
) -> Result<(), SessionError> {
    while let Some(f) = split_frame(c_in, max).map_err(SessionError::Frame)? {
        let seen = Seen {
            tag: f.tag,
            start: 0,
            len: f.bytes.len(),
            complete: true,
        };
        let was_pinned = t.pin.is_some();
        if t.on_client(&seen, &f.bytes) == Walk::StopBefore {
            break; // Terminate: not forwarded
        }
        if f.tag == b'Q'
            && crate::client::sql::might_deallocate(&f.bytes[5..])
            && cstr(&f.bytes[5..]).is_some_and(|(sql, _)| deallocates_all(&sql))
        {
            st.forget_all(out.conn);
        }
        match (reject, was_pinned, t.pin) {
            (true, false, Some(reason)) => {
                t.pin = None;
                t.inspect = true;
                tracing::info!(reason, "session state change rejected (session_state = \"reject\")");
                st.on_client(rejection(&f.bytes, reason), out);
            }
            _ => st.on_client(f.bytes.freeze(), out),
        }
    }
    Ok(())
}

/// The message that replaces one changing session state under `session_state = "reject"`:
/// the same request, failing on the server with pgvalve's error, so PostgreSQL itself keeps
/// the transaction state and the answers in order. (A Parse fails when it is executed.)
fn rejection(msg: &[u8], reason: &str) -> bytes::Bytes {
    use bytes::BufMut;
    let message = format!("pgvalve: {reason} is not allowed in transaction pooling mode (session_state = \"reject\")");
    let hint = "Use SET LOCAL or pg_advisory_xact_lock inside a transaction, or connect to a session-mode pool.";
    let sql = format!(
        "DO $pgvalve$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}, HINT = {}; END $pgvalve$",
        crate::server::quote_literal(&message),
        crate::server::quote_literal(hint)
    );
    let mut b = BytesMut::new();
    match msg[0] {
        b'P' => {
            let name = split_cstr(&msg[5..]).map(|(n, _)| n.to_vec()).unwrap_or_default();
            b.put_u8(b'P');
            b.put_i32((4 + name.len() + 1 + sql.len() + 1 + 2) as i32);
            b.put_slice(&name);
            b.put_u8(0);
        }
        _ => {
            b.put_u8(b'Q');
            b.put_i32((4 + sql.len() + 1) as i32);
        }
    }
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    if msg[0] == b'P' {
        b.put_i16(0);
    }
    b.freeze()
}

/// Transaction mode with statement tracking: moves the server's messages in `s_in` to
/// `s_out`, dropping answers to injected messages and adding the proxy's own answers in order.
pub(super) fn server_messages(
    s_in: &mut BytesMut,
    s_out: &mut BytesMut,
    walk: &mut MessageWalker,
    t: &mut Tracker,
    responses: &mut Responses,
    conn: &mut ServerStatements,
    reported: &mut Vec<(String, String)>,
) -> Result<(), SessionError> {
    // Tags that end a request, and ParameterStatus, are looked at whole (they are small);
    // rows stream.
    let inspect = |tag: u8| {
        matches!(
            tag,
            b'1' | b'2' | b'3' | b'n' | b'C' | b'I' | b's' | b'Z' | b'E' | b'T' | b't' | b'S'
        )
    };
    loop {
        let (mut after, mut swallow, mut stop_next) = (Vec::new(), 0usize, false);
        let n = walk
            .scan(s_in, inspect, |seen, msg| {
                if stop_next {
                    return Walk::StopBefore;
                }
                t.on_server(seen, msg);
                if seen.tag == b'S' {
                    note_reported(msg, reported);
                }
                let stale = seen.tag == b'E' && is_stale_plan(msg);
                match responses.on_server(seen.tag, stale, conn) {
                    OnServer::Forward(due) => {
                        stop_next = !due.is_empty();
                        after = due;
                        Walk::Continue
                    }
                    OnServer::Swallow(due) => {
                        after = due;
                        swallow = seen.len;
                        Walk::StopBefore
                    }
                }
            })
            .map_err(SessionError::ServerProtocol)?;
        move_ready(s_in, s_out, n);
        s_in.advance(swallow);
        for b in &after {
            s_out.extend_from_slice(b);
        }
        if swallow == 0 && !stop_next {
            return Ok(());
        }
    }
}

/// Whether an ErrorResponse says a cached plan changed its result type (SQLSTATE 0A000).
pub(super) fn is_stale_plan(msg: &[u8]) -> bool {
    let f = crate::protocol::frame::Frame {
        tag: b'E',
        bytes: BytesMut::from(msg),
    };
    crate::protocol::messages::parse_server_error(&f)
        .is_some_and(|e| e.code == "0A000" && e.message.contains("cached plan must not change result type"))
}

//! Transaction-mode helpers of the relay: what pins a session, and tracked parameters
//! reported by the server.

use crate::client::sql::{might_change_session, session_state_change, TRACKED_PARAMETERS};
use crate::protocol::tags::{frontend, read_cstr};

/// Why a whole Query or Parse message pins the session, if it does. A named Parse pins only
/// when statements are not tracked (`named_pins`).
pub(super) fn pin_reason(tag: u8, msg: &[u8], named_pins: bool) -> Option<&'static str> {
    let body = msg.get(5..)?;
    let named_parse = named_pins && tag == frontend::PARSE;
    if !named_parse && !might_change_session(body) {
        return None;
    }
    match tag {
        frontend::QUERY => session_state_change(&read_cstr(body)?.0),
        frontend::PARSE => {
            let (name, rest) = read_cstr(body)?;
            if named_pins && !name.is_empty() {
                return Some("named prepared statement (max_prepared_statements = 0)");
            }
            session_state_change(&read_cstr(rest)?.0)
        }
        _ => None,
    }
}

/// Whether the first message in `buf`, when it is there whole, pins the session (see
/// [`pin_reason`]): a transaction that starts with it is asked for as a long hold.
pub(crate) fn first_message_pins(buf: &[u8], named_pins: bool) -> bool {
    let Some(len) = buf
        .get(1..5)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return false;
    };
    buf.get(..len.saturating_add(1))
        .is_some_and(|msg| pin_reason(msg[0], msg, named_pins).is_some())
}

/// Records a ParameterStatus of a tracked parameter (see `sql::TRACKED_PARAMETERS`).
pub(super) fn note_reported(msg: &[u8], reported: &mut Vec<(String, String)>) {
    if let Some((name, rest)) = msg.get(5..).and_then(read_cstr) {
        if TRACKED_PARAMETERS.contains(&name.to_ascii_uppercase().as_str()) {
            if let Some((value, _)) = read_cstr(rest) {
                reported.push((name.into_owned(), value.into_owned()));
            }
        }
    }
}

//! Transaction-mode helpers of the relay: what pins a session, and tracked parameters
//! reported by the server.

use crate::client::sql::{code_part, might_change_session, query_text, session_effect, Effect, TRACKED_PARAMETERS};
use crate::protocol::tags::{frontend, read_cstr};

/// What a whole Query or Parse message does to session state (see [`session_effect`];
/// `extra`: `track_parameters`), and whether it is a named Parse (a named statement that
/// sets a tracked parameter may run again in any later transaction). A named Parse pins
/// when statements are not tracked (`named_pins`).
pub(super) fn effect(tag: u8, msg: &[u8], named_pins: bool, extra: &[String]) -> (Effect, bool) {
    let none = (Effect::default(), false);
    let Some(body) = msg.get(5..) else {
        return none;
    };
    let named_parse = named_pins && tag == frontend::PARSE;
    if !named_parse && !might_change_session(code_part(query_text(tag, body))) {
        return none;
    }
    let of = |sql: Option<(std::borrow::Cow<'_, str>, &[u8])>| {
        sql.map_or_else(Effect::default, |(sql, _)| session_effect(&sql, extra))
    };
    match tag {
        frontend::QUERY => (of(read_cstr(body)), false),
        frontend::PARSE => {
            let Some((name, rest)) = read_cstr(body) else {
                return none;
            };
            if named_pins && !name.is_empty() {
                let pin = Some("named prepared statement (max_prepared_statements = 0)");
                return (
                    Effect {
                        pin,
                        ..Effect::default()
                    },
                    true,
                );
            }
            (of(read_cstr(rest)), !name.is_empty())
        }
        _ => none,
    }
}

/// Whether the first message in `buf`, when it is there whole, pins the session (see
/// [`effect`]): a transaction that starts with it is asked for as a long hold.
pub(crate) fn first_message_pins(buf: &[u8], named_pins: bool, extra: &[String]) -> bool {
    let Some(len) = buf
        .get(1..5)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return false;
    };
    buf.get(..len.saturating_add(1))
        .is_some_and(|msg| effect(msg[0], msg, named_pins, extra).0.pin.is_some())
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

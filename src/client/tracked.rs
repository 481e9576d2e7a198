//! Parameters tracked by reading them back: `search_path` and `track_parameters`.
//!
//! Part of the client session in transaction mode (below the relay, beside `params`).
//! PostgreSQL does not report these with ParameterStatus, so a `SET` of one cannot be learned
//! from the server's messages. Instead the relay notes that a statement may have changed one
//! ([`Readback`]), and when the transaction is over the session asks its server connection
//! for their values (one round trip, only after such a transaction) and keeps them with the
//! reported ones: they are re-applied on whichever server connection the client gets next,
//! and the session does not pin. What the server says is the truth, so a rolled-back
//! transaction, an error, `SET LOCAL`, `RESET`, `SET ... TO DEFAULT` and `RESET ALL` all come
//! out right without the proxy interpreting them.

use super::params::{parse_options, Reported};
use super::sql::{Effect, TRACKED_PARAMETERS};
use super::SessionError;
use crate::protocol::startup::StartupParams;
use crate::server::ServerConn;

/// What the relay saw of tracked parameters, for the session to read back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Readback {
    /// A statement of the transaction may have changed one.
    pub(crate) due: bool,
    /// It contained `RESET ALL`.
    pub(crate) reset_all: bool,
    /// A named prepared statement changes one: it may run again in any later transaction
    /// (a Bind is not looked into), so every transaction of the session is read back.
    pub(crate) always: bool,
}

impl Readback {
    /// Notes what a statement does (`named`: it is a named Parse).
    #[inline]
    pub(crate) fn note(&mut self, e: &Effect, named: bool) {
        if e.track {
            self.due = true;
            self.reset_all |= e.reset_all;
            self.always |= named;
        }
    }

    /// Whether a read-back is due after this transaction, and whether it saw `RESET ALL`;
    /// clears what this transaction noted (`always` stays).
    pub(crate) fn take(&mut self) -> Option<bool> {
        let due = std::mem::take(&mut self.due) || self.always;
        let reset_all = std::mem::take(&mut self.reset_all);
        due.then_some(reset_all)
    }
}

/// `track_parameters` as the relay's lexer compares them (upper case); None when empty.
pub(crate) fn extra_names(list: &[String]) -> Option<std::sync::Arc<[String]>> {
    (!list.is_empty()).then(|| list.iter().map(|n| n.to_ascii_uppercase()).collect())
}

/// The names of the parameters as PostgreSQL spells them, their values, and whether each
/// comes from anywhere but a SET in the session (then every server connection of the pool has
/// it without being told: a default, the configuration file, the role's or database's).
const READ_BACK: &str = "SELECT COALESCE(s.name, n), pg_catalog.current_setting(n, true), \
     COALESCE(s.source <> 'session', false) \
     FROM pg_catalog.unnest(pg_catalog.string_to_array($1, ',')) AS n \
     LEFT JOIN pg_catalog.pg_settings s ON pg_catalog.lower(s.name) = n";

/// Reads the tracked parameters back from `server` (idle, after the client's transaction)
/// into `reported`: `search_path`, `extra` (`track_parameters`) and, after `RESET ALL`, the
/// reported ones too. A value not SET in the session is dropped (the connections the client
/// gets next have it already) unless the client's startup packet set that parameter (then the
/// value is kept, so an explicit SET to the default sticks; `RESET` of such a parameter
/// gives the server's default, not the startup value). Returns whether `server` now carries
/// less than the client's startup parameters (after `RESET ALL`): it must be reset and set
/// up again before anyone uses it.
///
/// # Errors
/// The server failed or refused the query: the client's parameters are unknown.
pub(crate) async fn read_back(
    server: &mut ServerConn,
    p: &StartupParams,
    extra: &[String],
    reset_all: bool,
    reported: &mut Reported,
) -> Result<bool, SessionError> {
    let mut names: Vec<String> = vec!["search_path".into()];
    names.extend(extra.iter().map(|n| n.to_ascii_lowercase()));
    if reset_all {
        names.extend(TRACKED_PARAMETERS.iter().map(|n| n.to_ascii_lowercase()));
    }
    let rows = server.query_rows(READ_BACK, &[&names.join(",")]).await?;
    let startup = startup_names(p);
    if reset_all {
        reported.clear();
    }
    for row in rows {
        let (Some(Some(name)), value, default) = (row.first(), row.get(1).cloned().flatten(), row.get(2)) else {
            continue;
        };
        reported.retain(|k, _| !k.eq_ignore_ascii_case(name));
        let default = matches!(default, Some(Some(d)) if d == "t");
        let from_startup = startup.iter().any(|s| s.eq_ignore_ascii_case(name));
        match value {
            Some(v) if !(default && (reset_all || !from_startup)) => {
                reported.insert(name.clone(), v);
            }
            _ => {}
        }
    }
    Ok(reset_all)
}

/// The parameters the client's startup packet sets (`options` included).
fn startup_names(p: &StartupParams) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in p.session_params() {
        if k == "options" {
            out.extend(parse_options(v).unwrap_or_default().into_iter().map(|(k, _)| k));
        } else {
            out.push(k.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_statement_makes_every_transaction_read_back() {
        let mut r = Readback::default();
        assert_eq!(r.take(), None);
        r.note(&Effect::default(), true);
        assert_eq!(r.take(), None, "nothing tracked");
        let reset = Effect {
            track: true,
            reset_all: true,
            ..Effect::default()
        };
        r.note(&reset, false);
        assert_eq!(r.take(), Some(true));
        assert_eq!(r.take(), None);
        let set = Effect {
            track: true,
            ..Effect::default()
        };
        r.note(&set, true);
        assert_eq!(r.take(), Some(false));
        assert_eq!(r.take(), Some(false), "a named SET may run again");
    }

    #[test]
    fn startup_names_include_options() {
        let mut p = StartupParams::default();
        p.params.insert("user".into(), "u".into());
        p.params.insert("application_name".into(), "a".into());
        p.params.insert("options".into(), "-c search_path=x".into());
        let mut names = startup_names(&p);
        names.sort();
        assert_eq!(names, ["application_name", "search_path"]);
    }
}

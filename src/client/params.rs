//! Startup parameters a client sent, turned into what its server connection must run.
//!
//! Part of the client session: after a server connection is checked out, the client's
//! session parameters (application_name, DateStyle, TimeZone, client_encoding, the `-c`
//! settings in `options`, any other) are applied with `set_config`, in one round trip.
//! The server's reset (`DISCARD ALL`) undoes them before the next client. The identity's
//! `server_settings` (see [`server_settings`]) ride the same query, first, so the client's
//! own settings win.

use super::SessionError;
use crate::protocol::startup::StartupParams;
use crate::server::quote_literal;

/// Splits libpq's `options` string: whitespace separates, backslash escapes.
fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `name=value` settings in an `options` string (`-c name=value`, `-cname=value`,
/// `--name=value`).
///
/// # Errors
/// [`SessionError::Unsupported`] for any other switch.
pub(crate) fn parse_options(s: &str) -> Result<Vec<(String, String)>, SessionError> {
    let mut out = Vec::new();
    let mut tokens = split_options(s).into_iter();
    while let Some(t) = tokens.next() {
        let setting = if t == "-c" {
            tokens.next()
        } else {
            t.strip_prefix("-c")
                .or_else(|| t.strip_prefix("--"))
                .map(str::to_string)
        };
        match setting.as_deref().and_then(|s| s.split_once('=')) {
            Some((name, value)) => out.push((name.replace('-', "_"), value.to_string())),
            None => {
                return Err(SessionError::Unsupported(format!(
                    "unsupported switch in startup option \"{t}\": pgvalve accepts only -c name=value and --name=value"
                )))
            }
        }
    }
    Ok(out)
}

/// The `server_settings` for a client described by `facts` under `config`: `[admission]`'s
/// with those of the first `[[identity]]` rule that matches put over them.
pub(crate) fn server_settings(
    config: &crate::config::Config,
    facts: &crate::admission::identity::ClientFacts<'_>,
) -> Vec<(String, String)> {
    let (_, rule) = crate::admission::identity::identify_with_rule(&config.identities, facts);
    crate::config::ServerSettings::merged(
        &config.admission.server_settings,
        rule.and_then(|r| r.server_settings.as_ref()),
    )
}

/// Values the client set after startup for parameters PostgreSQL reports (learned from the
/// server's ParameterStatus in transaction mode), applied after the startup parameters.
pub(crate) type Reported = std::collections::BTreeMap<String, String>;

/// `ServerConn::applied` of a connection that carries less than the parameters its key
/// says (after a client's `RESET ALL`): whoever gets it next resets it first (keys of real
/// sets are odd, so none is this).
pub(crate) const DIRTY: u64 = 2;

/// A key for the set of parameters `base` (the identity's server_settings), `p` and
/// `reported` apply: 0 when they apply none (a fresh or reset server connection needs
/// nothing), else a nonzero hash.
pub(crate) fn params_key(base: &[(String, String)], p: &StartupParams, reported: &Reported) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut any = false;
    for kv in base {
        ("server_settings", kv).hash(&mut h);
        any = true;
    }
    for kv in p.session_params() {
        kv.hash(&mut h);
        any = true;
    }
    for kv in reported {
        kv.hash(&mut h);
        any = true;
    }
    if any {
        h.finish() | 1
    } else {
        0
    }
}

/// Makes `server` carry exactly the parameters of `p`: nothing when it already does, else
/// `RESET ALL` (when it carries another client's) and `set_config` for each, in one round trip.
///
/// # Errors
/// PostgreSQL's refusal of a parameter, or a failed connection.
pub(crate) async fn prepare_server(
    server: &mut crate::server::ServerConn,
    base: &[(String, String)],
    p: &StartupParams,
    reported: &Reported,
    key: u64,
) -> Result<(), SessionError> {
    if server.applied == key {
        return Ok(());
    }
    let mut sql = String::new();
    if server.applied != 0 {
        sql.push_str("RESET ALL;");
    }
    if let Some(q) = apply_query(base, p, reported)? {
        sql.push_str(&q);
    }
    server.simple_query(&sql).await?;
    server.applied = key;
    Ok(())
}

/// One query applying the settings of `base`, then every session parameter of `p`, then
/// `reported` (a later one wins), or None when there are none.
///
/// # Errors
/// [`SessionError::Unsupported`] for an `options` switch other than a setting.
pub(crate) fn apply_query(
    base: &[(String, String)],
    p: &StartupParams,
    reported: &Reported,
) -> Result<Option<String>, SessionError> {
    let mut settings = base.to_vec();
    for (k, v) in p.session_params() {
        if k == "options" {
            settings.extend(parse_options(v)?);
        } else {
            settings.push((k.to_string(), v.to_string()));
        }
    }
    settings.extend(reported.iter().map(|(k, v)| (k.clone(), v.clone())));
    if settings.is_empty() {
        return Ok(None);
    }
    let calls: Vec<String> = settings
        .iter()
        .map(|(k, v)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                quote_literal(k),
                quote_literal(v)
            )
        })
        .collect();
    Ok(Some(format!("SELECT {}", calls.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_forms() {
        let o = parse_options(r"-c search_path=a,b --statement-timeout=5s -cwork_mem=64MB -c x=has\ space").unwrap();
        assert_eq!(
            o,
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into()),
                ("x".into(), "has space".into()),
            ]
        );
        assert!(parse_options("-B 100").is_err());
    }

    #[test]
    fn query_quotes_values() {
        let mut p = StartupParams::default();
        p.params.insert("user".into(), "u".into());
        p.params.insert("application_name".into(), "it's".into());
        let none = Reported::new();
        let q = apply_query(&[], &p, &none).unwrap().unwrap();
        assert_eq!(q, "SELECT pg_catalog.set_config('application_name', 'it''s', false)");
        p.params.remove("application_name");
        assert_eq!(apply_query(&[], &p, &none).unwrap(), None);
        assert_eq!(params_key(&[], &p, &none), 0);
        let tz: Reported = [("TimeZone".to_string(), "UTC".to_string())].into();
        let q = apply_query(&[], &p, &tz).unwrap().unwrap();
        assert_eq!(q, "SELECT pg_catalog.set_config('TimeZone', 'UTC', false)");
        assert_ne!(params_key(&[], &p, &tz), 0);
    }

    #[test]
    fn server_settings_come_first_so_the_clients_own_win() {
        let mut p = StartupParams::default();
        p.params.insert("options".into(), "-c lock_timeout=9s".into());
        let base = vec![("lock_timeout".to_string(), "2s".to_string())];
        let q = apply_query(&base, &p, &Reported::new()).unwrap().unwrap();
        assert_eq!(
            q,
            "SELECT pg_catalog.set_config('lock_timeout', '2s', false), pg_catalog.set_config('lock_timeout', '9s', false)"
        );
        let none = StartupParams::default();
        assert_ne!(params_key(&base, &none, &Reported::new()), 0);
        assert_ne!(
            params_key(&base, &none, &Reported::new()),
            params_key(&[("lock_timeout".into(), "3s".into())], &none, &Reported::new())
        );
    }
}

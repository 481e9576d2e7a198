//! The checks [`Config::validate`](super::Config::validate) runs, one per part of the file,
//! in the order it runs them (its error names the first field that cannot work). Part of
//! `config/`: each takes the parsed [`FileConfig`] (or the part it consumes) and returns what
//! it validated.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::types::{self, AuthType, FileConfig, SessionStatePolicy, UserConfig};
use super::{ClusterSettings, ConfigError, ScramVerifier, User};

/// Builds the [`ConfigError::Invalid`] for a field of the file being validated.
pub(super) type Invalid<'a> = dyn Fn(&str, String) -> ConfigError + 'a;

/// `[proxy]`: the listen address (returned parsed) and the connection and message limits.
pub(super) fn proxy(f: &FileConfig, invalid: &Invalid) -> Result<SocketAddr, ConfigError> {
    let listen: SocketAddr = f.proxy.listen.parse().map_err(|_| {
        invalid(
            "proxy.listen",
            format!("{:?} is not an address like 127.0.0.1:6432", f.proxy.listen),
        )
    })?;
    if f.proxy.max_client_connections == 0 {
        return Err(invalid("proxy.max_client_connections", "must be at least 1".into()));
    }
    if f.proxy.max_message_size.0 < 8192 || f.proxy.max_message_size.0 > (1 << 30) {
        return Err(invalid("proxy.max_message_size", "must be between 8kB and 1GB".into()));
    }
    if !(64..=1 << 20).contains(&f.proxy.max_startup_packet_size) {
        return Err(invalid(
            "proxy.max_startup_packet_size",
            "must be between 64 and 1MB".into(),
        ));
    }
    // A Unix socket path holds at most 107 bytes (sun_path).
    if f.proxy
        .takeover_socket
        .as_ref()
        .is_some_and(|p| p.as_os_str().len() > 107)
    {
        return Err(invalid(
            "proxy.takeover_socket",
            "is longer than a Unix socket path may be (107 bytes)".into(),
        ));
    }
    Ok(listen)
}

/// `[pool]` and `[databases]`: at least one database, no pool of size 0, and statement
/// tracking where the session-state policy needs it.
pub(super) fn pools(f: &FileConfig, invalid: &Invalid) -> Result<(), ConfigError> {
    if f.pool.pool_size == 0 {
        return Err(invalid("pool.pool_size", "must be at least 1".into()));
    }
    if f.databases.is_empty() {
        return Err(invalid(
            "databases",
            "no database is configured: add [databases.NAME] (or \"*\"), or use --upstream".into(),
        ));
    }
    for (db, d) in &f.databases {
        if d.pool_size == Some(0) {
            return Err(invalid(
                &format!("databases.{db}.pool_size"),
                "must be at least 1".into(),
            ));
        }
    }
    for name in &f.pool.track_parameters {
        if !is_parameter_name(name) {
            return Err(invalid(
                "pool.track_parameters",
                format!("{name:?} is not a parameter name (letters, digits and _, optionally prefix.name)"),
            ));
        }
    }
    if f.pool.session_state == SessionStatePolicy::Reject && f.pool.max_prepared_statements == 0 {
        return Err(invalid(
            "pool.session_state",
            "\"reject\" needs statement tracking: set max_prepared_statements above 0".into(),
        ));
    }
    Ok(())
}

/// A parameter name as `SET` takes it unquoted: `name` or `prefix.name` (a custom one).
fn is_parameter_name(name: &str) -> bool {
    let part = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match name.split_once('.') {
        Some((a, b)) => part(a) && part(b),
        None => part(name),
    }
}

/// `[users]`: at least one, each with a way to authenticate its clients under `auth_type`;
/// builds the validated users (client verifier, server password).
pub(super) fn users(
    file_users: BTreeMap<String, UserConfig>,
    auth_type: AuthType,
    hba: bool,
    invalid: &Invalid,
) -> Result<BTreeMap<String, User>, ConfigError> {
    if file_users.is_empty() {
        return Err(invalid(
            "users",
            "no user is configured: add [users.NAME], or use --upstream".into(),
        ));
    }
    let mut users = BTreeMap::new();
    for (name, u) in file_users {
        let field = format!("users.{name}");
        if u.pool_size == Some(0) {
            return Err(invalid(&format!("{field}.pool_size"), "must be at least 1".into()));
        }
        let md5_verifier = match (&u.md5_verifier, &u.password) {
            (Some(v), _)
                if v.0.len() == 35 && v.0.starts_with("md5") && v.0[3..].bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Some(v.clone())
            }
            (Some(_), _) => {
                return Err(invalid(
                    &format!("{field}.md5_verifier"),
                    "expected md5 and 32 hex digits (as in pg_authid)".into(),
                ))
            }
            (None, Some(p)) => Some(types::Secret(postgres_protocol::password::md5(p.0.as_bytes(), &name))),
            (None, None) => None,
        };
        let client_verifier = match (&u.scram_verifier, &u.password) {
            (Some(v), _) => Some(
                v.0.parse()
                    .map_err(|e| invalid(&format!("{field}.scram_verifier"), e))?,
            ),
            (None, Some(p)) => Some(ScramVerifier::from_password(&p.0)),
            (None, None) if matches!(auth_type, AuthType::Trust | AuthType::Cert) || md5_verifier.is_some() || hba => None,
            (None, None) => {
                return Err(invalid(
                    &field,
                    "auth_type is scram-sha-256 (or md5) but the user has neither password, scram_verifier nor md5_verifier".into(),
                ))
            }
        };
        let server_password = u.server_password.or(u.password);
        users.insert(
            name,
            User {
                client_verifier,
                md5_verifier,
                server_password,
                pool_size: u.pool_size,
                pool_mode: u.pool_mode,
            },
        );
    }
    Ok(users)
}

/// auth_query: `auth_user` is a user with a server password (under SCRAM), `auth_dbname`
/// a configured database.
pub(super) fn auth_query(f: &FileConfig, users: &BTreeMap<String, User>, invalid: &Invalid) -> Result<(), ConfigError> {
    if let Some(a) = &f.proxy.auth_user {
        match users.get(a) {
            Some(u) if u.server_password.is_some() => {}
            Some(_) => return Err(invalid("proxy.auth_user", format!("user {a:?} has no server password"))),
            None => return Err(invalid("proxy.auth_user", format!("user {a:?} is not in [users]"))),
        }
        if matches!(f.proxy.auth_type, AuthType::Trust | AuthType::Cert) {
            return Err(invalid(
                "proxy.auth_user",
                "auth_query needs auth_type = \"scram-sha-256\" or \"md5\"".into(),
            ));
        }
    }
    if let Some(d) = f.proxy.auth_dbname.as_ref().filter(|d| !f.databases.contains_key(*d)) {
        return Err(invalid("proxy.auth_dbname", format!("{d:?} is not in [databases]")));
    }
    Ok(())
}

/// `[admin]`: every console user is a configured user.
pub(super) fn admin_users(
    f: &FileConfig,
    users: &BTreeMap<String, User>,
    invalid: &Invalid,
) -> Result<(), ConfigError> {
    for (field, list) in [
        ("admin.admin_users", &f.admin.admin_users),
        ("admin.stats_users", &f.admin.stats_users),
    ] {
        if let Some(u) = list.iter().find(|u| !users.contains_key(*u)) {
            return Err(invalid(field, format!("user {u:?} is not in [users]")));
        }
    }
    Ok(())
}

/// `[locks]`: a workable poll, known lock modes, a configured user.
pub(super) fn locks(f: &FileConfig, users: &BTreeMap<String, User>, invalid: &Invalid) -> Result<(), ConfigError> {
    let l = &f.locks;
    if l.poll_interval < std::time::Duration::from_millis(100) || l.poll_timeout.is_zero() {
        return Err(invalid(
            "locks.poll_interval",
            "poll_interval must be at least 100ms and poll_timeout more than 0s".into(),
        ));
    }
    if let Some(m) = l
        .dangerous_modes
        .iter()
        .find(|m| !types::LOCK_MODES.contains(&m.as_str()))
    {
        return Err(invalid(
            "locks.dangerous_modes",
            format!("{m:?} is not a lock mode ({})", types::LOCK_MODES.join(", ")),
        ));
    }
    if let Some(u) = l.user.as_ref().filter(|u| !users.contains_key(*u)) {
        return Err(invalid("locks.user", format!("user {u:?} is not in [users]")));
    }
    Ok(())
}

/// `hba_file` and `ident_file`, read; `cert` lines need `client_tls_ca_file`.
pub(super) fn hba(f: &FileConfig, invalid: &Invalid) -> Result<Option<std::sync::Arc<super::hba::Hba>>, ConfigError> {
    let Some(path) = &f.proxy.hba_file else {
        if f.proxy.ident_file.is_some() {
            return Err(invalid("proxy.ident_file", "is used only with hba_file".into()));
        }
        if f.proxy.auth_type == AuthType::Cert && f.tls.client_tls_ca_file.is_none() {
            return Err(invalid(
                "proxy.auth_type",
                "cert needs [tls] client_tls_ca_file (the CA that signs client certificates)".into(),
            ));
        }
        return Ok(None);
    };
    let hba = super::hba::Hba::load(path, f.proxy.ident_file.as_deref()).map_err(|e| invalid("proxy.hba_file", e))?;
    if hba.uses_cert() && f.tls.client_tls_ca_file.is_none() {
        return Err(invalid(
            "proxy.hba_file",
            "cert lines need [tls] client_tls_ca_file (the CA that signs client certificates)".into(),
        ));
    }
    Ok(Some(std::sync::Arc::new(hba)))
}

/// `[http] auth_*`: a user with a password, or neither; no empty secret.
pub(super) fn http_auth(f: &FileConfig, invalid: &Invalid) -> Result<types::HttpAuth, ConfigError> {
    let h = &f.http;
    let basic = match (&h.auth_user, &h.auth_password) {
        (None, None) => None,
        (Some(u), Some(p)) if !u.is_empty() && !u.contains(':') && !p.0.is_empty() => Some((u.clone(), p.clone())),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "http.auth_user",
                "auth_user needs a name without ':' and a non-empty auth_password".into(),
            ))
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(invalid(
                "http.auth_user",
                "auth_user and auth_password go together".into(),
            ))
        }
    };
    if h.auth_token.as_ref().is_some_and(|t| t.0.len() < 16) {
        return Err(invalid(
            "http.auth_token",
            "auth_token must be at least 16 characters".into(),
        ));
    }
    Ok(types::HttpAuth {
        basic,
        token: h.auth_token.clone(),
    })
}

/// A rule's cluster-wide cap: only in a `[cluster]`, and below its budget (each instance's
/// coordination connection takes a slot of it).
pub(super) fn cluster_cap(rule: &super::Rule, cluster: Option<&ClusterSettings>) -> Result<(), String> {
    let Some(n) = rule.limits.cluster_max_server_connections else {
        return Ok(());
    };
    match cluster {
        None => Err("needs a [cluster] (without one, max_server_connections caps the identity)".into()),
        Some(c) if n >= c.max_server_connections => Err(format!(
            "must be below the cluster's max_server_connections ({})",
            c.max_server_connections
        )),
        Some(_) => Ok(()),
    }
}

/// `[cluster]`: workable values, and a database and user the coordination connection can use.
pub(super) fn cluster(f: &FileConfig, users: &BTreeMap<String, User>, invalid: &Invalid) -> Result<(), ConfigError> {
    let Some(c) = &f.cluster else {
        return Ok(());
    };
    c.check()
        .map_err(|(field, reason)| invalid(&format!("cluster.{field}"), reason))?;
    if let Some(d) = c
        .database
        .as_ref()
        .filter(|d| !f.databases.contains_key(*d) && !f.databases.contains_key("*"))
    {
        return Err(invalid(
            "cluster.database",
            format!("database {d:?} is not in [databases]"),
        ));
    }
    if let Some(u) = c.user.as_ref().filter(|u| !users.contains_key(*u)) {
        return Err(invalid("cluster.user", format!("user {u:?} is not in [users]")));
    }
    if users.is_empty() {
        return Err(invalid(
            "cluster.user",
            "the coordination connection needs a user in [users]".into(),
        ));
    }
    Ok(())
}

//! `[databases]`, `[users]` and `userlist.txt`: where clients go, who may log in (passwords
//! and SCRAM verifiers kept as they are), per-database and per-user pool settings, and the
//! per-user and per-database caps as `[[identity]]` rules.
//!
//! Part of `import`; [`super::global`] reads `[pgbouncer]` first.

use std::collections::BTreeMap;

use super::emit::{sub_table, Draft, Setting};
use super::global::{self, Caps, Globals};
use super::ini::{conn_string, At, Entry, ImportError, ListedUser};
use super::values::{self, count, shown};
use crate::config::ScramVerifier;

/// One cap rule: what it matches and its limits.
#[derive(Debug, Default)]
pub struct CapRule {
    /// `user:NAME`, `db:NAME`, or a template.
    name: String,
    /// Match on this user (exactly).
    user: Option<String>,
    /// Match on this database (exactly).
    database: Option<String>,
    /// Server connections.
    server: Option<u32>,
    /// Client connections.
    client: Option<u32>,
    /// Where the caps were written.
    from: String,
}

/// What the databases and users name, for what is mapped after them.
#[derive(Debug, Default)]
pub struct Found {
    /// Users written to `[users]`, and whether each has a password PostgreSQL can be logged
    /// in with.
    pub users: BTreeMap<String, bool>,
    /// Per-user caps, then per-database caps.
    pub rules: Vec<CapRule>,
    /// `auth_user` of `[databases]` entries (database, user, line).
    pub db_auth_users: Vec<(String, String, At)>,
}

/// How clients log in, as imported: what becomes of a user without a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// SCRAM: a user needs a password or a SCRAM verifier.
    Scram,
    /// md5 (or an hba_file, whose lines may say md5): an md5 hash is a verifier too.
    Md5,
    /// trust or cert: no password is checked; a user is listed without one.
    NoPassword,
}

/// `auth_type` (with `auth_hba_file` and `auth_ident_file` for `hba`, which must load as
/// pgvalve's hba_file; relative paths are looked up from the working directory, else the ini
/// file's).
pub fn auth_type(g: &Globals, ini_dir: &std::path::Path, d: &mut Draft) -> Result<ClientAuth, ImportError> {
    let Some(e) = g.get("auth_type") else {
        d.set(
            "proxy",
            "auth_type",
            "md5",
            "auth_type not set: PgBouncer's default md5 (SCRAM for users with a SCRAM verifier)",
        );
        return Ok(ClientAuth::Md5);
    };
    let (mode, why) = match e.value.trim().to_ascii_lowercase().as_str() {
        "scram-sha-256" => ("scram-sha-256", None),
        "trust" => ("trust", None),
        "md5" => ("md5", None),
        "cert" => ("cert", None),
        "plain" => (
            "md5",
            Some("pgvalve never asks for a cleartext password: md5 is used (SCRAM for users with a SCRAM verifier)"),
        ),
        "any" => (
            "trust",
            Some("pgvalve has no \"any\": trust is used, and the user name clients give still chooses the pool"),
        ),
        "hba" => return hba(g, ini_dir, e, d),
        "pam" => (
            "scram-sha-256",
            Some("not supported: clients authenticate with SCRAM-SHA-256 instead"),
        ),
        other => return Err(ImportError::line(&e.at, format!("auth_type: unknown method {other:?}"))),
    };
    if let Some(why) = why {
        d.note(Some(&e.at), format!("auth_type = {}", e.value.trim()), why);
    }
    for k in ["auth_hba_file", "auth_ident_file"] {
        if let Some(f) = g.get(k) {
            d.note(
                Some(&f.at),
                format!("{k} = {}", f.value),
                "used only with auth_type = hba (as in PgBouncer)",
            );
        }
    }
    d.set("proxy", "auth_type", mode, format!("auth_type ({})", e.at));
    Ok(match mode {
        "trust" | "cert" => ClientAuth::NoPassword,
        "md5" => ClientAuth::Md5,
        _ => ClientAuth::Scram,
    })
}

/// `auth_type = hba`: `auth_hba_file` (and `auth_ident_file`) become `hba_file` (and
/// `ident_file`) when pgvalve can read them; else md5 for everyone, noted with why.
fn hba(
    g: &Globals,
    ini_dir: &std::path::Path,
    e: &super::ini::Entry,
    d: &mut Draft,
) -> Result<ClientAuth, ImportError> {
    let find = |key: &str| {
        g.get(key).map(|f| {
            let p = values::located(&f.value, ini_dir);
            (f, std::path::absolute(&p).unwrap_or(p))
        })
    };
    let (file, ident) = (find("auth_hba_file"), find("auth_ident_file"));
    let loaded = match &file {
        None => Err("auth_hba_file is not set".to_string()),
        Some((f, p)) => crate::config::hba::Hba::load(p, ident.as_ref().map(|(_, p)| p.as_path())).map(|_| (*f, p)),
    };
    match loaded {
        Ok((f, p)) => {
            d.set(
                "proxy",
                "hba_file",
                p.display().to_string(),
                format!("auth_hba_file ({})", f.at),
            );
            if let Some((i, p)) = ident {
                d.set(
                    "proxy",
                    "ident_file",
                    p.display().to_string(),
                    format!("auth_ident_file ({})", i.at),
                );
            }
            d.set(
                "proxy",
                "auth_type",
                "md5",
                format!("auth_type ({}): hba_file decides; md5 is used without it", e.at),
            );
            Ok(ClientAuth::Md5)
        }
        Err(why) => {
            let at = file.as_ref().map_or(&e.at, |(f, _)| &f.at);
            d.note(
                Some(at),
                "auth_type = hba",
                format!("the HBA file cannot be used ({why}): md5 is used for every client instead"),
            );
            if let Some((i, _)) = ident {
                d.note(
                    Some(&i.at),
                    format!("auth_ident_file = {}", i.value),
                    "not used: the HBA file could not be",
                );
            }
            d.set("proxy", "auth_type", "md5", format!("auth_type ({})", e.at));
            Ok(ClientAuth::Md5)
        }
    }
}

/// `userlist.txt`: each user with its cleartext password or SCRAM verifier as it is.
///
/// # Errors
/// A `SCRAM-SHA-256$` secret that is not a valid verifier.
pub fn userlist(list: &[ListedUser], auth: ClientAuth, d: &mut Draft, found: &mut Found) -> Result<(), ImportError> {
    let mut md5_only = Vec::new();
    let mut verifier_only = Vec::new();
    for u in list {
        let table = sub_table("users", &u.name);
        let from = format!("userlist ({})", u.at);
        if u.secret.starts_with("SCRAM-SHA-256$") {
            u.secret
                .parse::<ScramVerifier>()
                .map_err(|e| ImportError::line(&u.at, format!("user {:?}: {e}", u.name)))?;
            d.set(&table, "scram_verifier", u.secret.clone(), from);
            verifier_only.push(u.name.clone());
            found.users.insert(u.name.clone(), false);
        } else if is_md5(&u.secret) && auth == ClientAuth::Md5 {
            d.set(&table, "md5_verifier", u.secret.clone(), from);
            md5_only.push(u.name.clone());
            found.users.insert(u.name.clone(), false);
        } else if is_md5(&u.secret) || u.secret.is_empty() {
            let what = if u.secret.is_empty() {
                "an empty password"
            } else {
                "an md5 hash"
            };
            if auth == ClientAuth::NoPassword {
                d.table(&table);
                found.users.insert(u.name.clone(), false);
                d.note(Some(&u.at), format!("user {} ({what})", u.name), "kept without a password (auth_type trust or cert); if PostgreSQL asks pgvalve for one, set server_password");
            } else {
                d.note(Some(&u.at), format!("user {} ({what})", u.name), "cannot become a SCRAM verifier or a password: add [users] with password, or scram_verifier (pgvalve passwd) and server_password");
            }
        } else {
            d.set(&table, "password", u.secret.clone(), from);
            found.users.insert(u.name.clone(), true);
        }
    }
    if !md5_only.is_empty() {
        d.note(None, format!("users with an md5 hash only: {}", md5_only.join(", ")),
            "kept as md5_verifier: clients log in with MD5 as they did; to log in to PostgreSQL pgvalve needs server_password for them (PgBouncer reused the hash), unless PostgreSQL trusts pgvalve");
    }
    if !verifier_only.is_empty() {
        d.note(None, format!("users with a SCRAM verifier only: {}", verifier_only.join(", ")),
            "clients are checked against the verifier as they were; to log in to PostgreSQL pgvalve needs server_password for them (PgBouncer reused the client's SCRAM keys), unless PostgreSQL trusts pgvalve");
    }
    Ok(())
}

fn is_md5(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].chars().all(|c| c.is_ascii_hexdigit())
}

/// `[databases]`: one `[databases.NAME]` each.
///
/// # Errors
/// A malformed connection string or value, naming its line.
pub fn databases(entries: &[Entry], g: &Globals, d: &mut Draft, found: &mut Found) -> Result<(), ImportError> {
    let socket_dir = g.get("unix_socket_dir").map_or("/tmp".to_string(), |e| e.value.clone());
    if let Some(e) = g.get("unix_socket_dir") {
        d.note(
            Some(&e.at),
            format!("unix_socket_dir = {}", e.value),
            "pgvalve listens on TCP only ([proxy] listen); it is used as the server host of databases without host=",
        );
    }
    for e in entries.iter().filter(|e| e.section == "databases") {
        let name = values::name(&e.key);
        if name == "pgbouncer" || name == "pgvalve" {
            d.note(
                Some(&e.at),
                format!("databases.{name}"),
                "the name of the admin console: not a database",
            );
            continue;
        }
        let table = sub_table("databases", &name);
        d.table(&table);
        let pairs = conn_string(&e.value, &e.at)?;
        if !pairs.iter().any(|(k, _)| k == "host") {
            d.set(
                &table,
                "host",
                socket_dir.clone(),
                format!("no host= ({}): the Unix socket in unix_socket_dir", e.at),
            );
        }
        for (k, v) in &pairs {
            database_pair(&name, &table, k, v, &e.at, g, d, found)?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn database_pair(
    name: &str,
    table: &str,
    k: &str,
    v: &str,
    at: &At,
    g: &Globals,
    d: &mut Draft,
    found: &mut Found,
) -> Result<(), ImportError> {
    let from = format!("{k} ({at})");
    let setting = format!("databases.{name}: {k}={}", shown(k, v));
    match k {
        "host" => {
            let hosts = values::list(v);
            let first = hosts.first().cloned().unwrap_or_default();
            if hosts.len() > 1 {
                d.note(Some(at), &setting, format!("pgvalve connects to one host per database: {first} is used"));
            }
            if first.starts_with('@') {
                d.note(Some(at), &setting, "abstract Unix sockets are not supported: give a socket directory or a TCP host");
            }
            d.set(table, "host", first, from);
        }
        "port" => {
            let p = count(v, "port", at)?;
            let p = i64::from(u16::try_from(p).map_err(|_| ImportError::line(at, format!("port: {p} is not a port")))?);
            d.set(table, "port", p, from);
        }
        "dbname" if name == "*" => d.note(Some(at), &setting, "pgvalve's \"*\" routes each database name to the database of the same name"),
        "dbname" => d.set(table, "dbname", v.to_string(), from),
        "pool_size" => match count(v, k, at)? {
            0 => d.note(Some(at), &setting, "a pool of 0 serves nobody: [pool] pool_size applies"),
            n => d.set(table, "pool_size", i64::from(n), from),
        },
        "pool_mode" => {
            if let Some(m) = global::pool_mode(v, "pool_mode", at, d)? {
                d.set(table, "pool_mode", m, from);
            }
        }
        "max_db_connections" | "max_db_client_connections" => {
            let n = count(v, k, at)?;
            if n > 0 {
                let rule = db_rule(found, name);
                rule.from = format!("{} {k} ({at})", rule.from).trim().to_string();
                if k == "max_db_connections" {
                    rule.server = Some(n);
                } else {
                    rule.client = Some(n);
                }
            }
        }
        "auth_user" => found.db_auth_users.push((name.to_string(), v.to_string(), at.clone())),
        "auth_query" | "auth_dbname" if g.get(k).is_some_and(|e| e.value == v) => {}
        "auth_query" | "auth_dbname" => d.note(Some(at), &setting, "pgvalve has one auth_query and auth_dbname for all databases ([proxy])"),
        "user" | "password" => d.note(Some(at), &setting, "pgvalve logs in to PostgreSQL as the client's user (with that user's server_password); a fixed server user per database is not supported"),
        _ => database_unmapped(k, &setting, at, d),
    }
    Ok(())
}

fn database_unmapped(k: &str, setting: &str, at: &At, d: &mut Draft) {
    let why = match k {
        "min_pool_size" => "pgvalve opens server connections on demand",
        "reserve_pool" | "reserve_pool_size" => {
            "pgvalve has no reserve pool: raise this database's pool_size for the same peak"
        }
        "connect_query" => "not supported: set such settings with ALTER ROLE / ALTER DATABASE ... SET",
        "client_encoding" | "datestyle" | "timezone" | "application_name" => {
            "clients' own startup parameters are applied; set a default with ALTER DATABASE ... SET"
        }
        "server_lifetime" => "per database not offered: [pool] server_lifetime applies",
        "load_balance_hosts" => "pgvalve connects to one host per database",
        _ => "not a PgBouncer database parameter pgvalve knows",
    };
    d.note(Some(at), setting, why);
}

fn db_rule<'a>(found: &'a mut Found, db: &str) -> &'a mut CapRule {
    let i = match found.rules.iter().position(|r| r.database.as_deref() == Some(db)) {
        Some(i) => i,
        None => {
            let (name, database) = if db == "*" {
                ("db:{database}".to_string(), None)
            } else {
                (format!("db:{db}"), Some(db.to_string()))
            };
            found.rules.push(CapRule {
                name,
                database,
                ..Default::default()
            });
            found.rules.len() - 1
        }
    };
    &mut found.rules[i]
}

/// `[users]`: `NAME = pool_mode=... pool_size=... max_user_connections=...`.
///
/// # Errors
/// A malformed value, naming its line.
pub fn users(entries: &[Entry], auth: ClientAuth, d: &mut Draft, found: &mut Found) -> Result<(), ImportError> {
    let trust = auth == ClientAuth::NoPassword;
    for e in entries.iter().filter(|e| e.section == "users") {
        let name = values::name(&e.key);
        let table = sub_table("users", &name);
        let listed = found.users.contains_key(&name);
        if !listed && trust {
            d.table(&table);
            found.users.insert(name.clone(), false);
        }
        let known = listed || trust;
        let mut rule = CapRule {
            name: format!("user:{name}"),
            user: Some(name.clone()),
            ..Default::default()
        };
        for (k, v) in conn_string(&e.value, &e.at)? {
            let from = format!("[users] {k} ({})", e.at);
            let setting = format!("users.{name}: {k}={v}");
            match k.as_str() {
                "pool_mode" | "pool_size" if !known => d.note(Some(&e.at), &setting, "the user is not in userlist.txt: pgvalve needs its password or verifier to list it in [users] (users looked up with auth_query get the [pool] settings)"),
                "pool_mode" => {
                    if let Some(m) = global::pool_mode(&v, "pool_mode", &e.at, d)? {
                        d.set(&table, "pool_mode", m, from);
                    }
                }
                "pool_size" => match count(&v, &k, &e.at)? {
                    0 => d.note(Some(&e.at), &setting, "a pool of 0 serves nobody: [pool] pool_size applies"),
                    n => d.set(&table, "pool_size", i64::from(n), from),
                },
                "max_user_connections" => rule.server = Some(count(&v, &k, &e.at)?).filter(|n| *n > 0),
                "max_user_client_connections" => rule.client = Some(count(&v, &k, &e.at)?).filter(|n| *n > 0),
                "reserve_pool" | "reserve_pool_size" => d.note(Some(&e.at), &setting, "pgvalve has no reserve pool"),
                "query_timeout" | "idle_transaction_timeout" | "transaction_timeout" | "client_idle_timeout" => {
                    d.note(Some(&e.at), &setting, "per user not offered: the [pool] setting applies to everyone")
                }
                _ => d.note(Some(&e.at), &setting, "not a PgBouncer user parameter pgvalve knows"),
            }
        }
        if rule.server.is_some() || rule.client.is_some() {
            rule.from = format!("[users] {}", e.at);
            found
                .rules
                .insert(found.rules.iter().take_while(|r| r.user.is_some()).count(), rule);
        }
    }
    Ok(())
}

/// The caps as `[[identity]]` rules: per user, per database, then the global ones (a client
/// is counted by the first rule it matches).
pub fn identities(found: &mut Found, caps: &Caps, d: &mut Draft) {
    let mut rules = std::mem::take(&mut found.rules);
    // A user's (database's) own caps replace the global ones only where it sets them: the
    // first matching rule is the only one, so it carries the global caps it does not set.
    for r in &mut rules {
        let (server, client) = if r.user.is_some() {
            (&caps.user_server, &caps.user_client)
        } else {
            (&caps.db_server, &caps.db_client)
        };
        r.server = r.server.or(server.as_ref().map(|c| c.0));
        r.client = r.client.or(client.as_ref().map(|c| c.0));
    }
    let global = [
        (
            "user:{user}",
            &caps.user_server,
            &caps.user_client,
            "max_user_connections",
            "max_user_client_connections",
        ),
        (
            "db:{database}",
            &caps.db_server,
            &caps.db_client,
            "max_db_connections",
            "max_db_client_connections",
        ),
    ];
    for (name, server, client, ks, kc) in global {
        if server.is_none() && client.is_none() {
            continue;
        }
        let from: Vec<String> = [(ks, server), (kc, client)]
            .iter()
            .filter_map(|(k, c)| c.as_ref().map(|(_, at)| format!("{k} ({at})")))
            .collect();
        rules.push(CapRule {
            name: name.to_string(),
            server: server.as_ref().map(|c| c.0),
            client: client.as_ref().map(|c| c.0),
            from: from.join(", "),
            ..Default::default()
        });
    }
    let by_user = rules.iter().any(|r| r.name.starts_with("user:"));
    let by_db = rules.iter().any(|r| r.name.starts_with("db:"));
    if by_user && by_db {
        d.note(None, "per-user and per-database caps together (max_user_*, max_db_*)",
            "a client is counted by the first [[identity]] rule it matches: the user's caps, else the database's, never both (PgBouncer applied both)");
    }
    for r in rules {
        let mut rule = vec![setting("name", r.name.as_str(), &r.from)];
        if let Some(u) = r.user {
            rule.push(setting("user", u.as_str(), ""));
        }
        if let Some(db) = r.database {
            rule.push(setting("database", db.as_str(), ""));
        }
        if let Some(n) = r.server {
            rule.push(setting("max_server_connections", i64::from(n), ""));
        }
        if let Some(n) = r.client {
            rule.push(setting("max_client_connections", i64::from(n), ""));
        }
        d.identities.push(rule);
    }
}

fn setting(key: &str, value: impl Into<toml::Value>, comment: &str) -> Setting {
    Setting {
        key: key.to_string(),
        value: value.into(),
        comment: comment.to_string(),
    }
}

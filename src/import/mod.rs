//! `pgvalve import pgbouncer.ini [--userlist userlist.txt]`: a PgBouncer configuration as a
//! pgvalve one. Every setting pgvalve supports is mapped (each written with the PgBouncer
//! setting and line it came from); every other one is listed with the reason, in the output
//! and on stderr, so nothing is dropped silently. The result is checked as `pgvalve check`
//! would.
//!
//! A tool beside the proxy (top layer): it reads files and uses only `config`, whose
//! validation it runs on what it wrote.

mod emit;
mod global;
mod ini;
mod pools;
#[cfg(test)]
mod tests;
mod values;

use std::path::Path;

pub use emit::Note;
pub use ini::{At, ImportError};

use emit::Draft;
use global::Globals;
use pools::Found;

/// What an import produced.
#[derive(Debug)]
pub struct Imported {
    /// The pgvalve configuration (TOML), notes at its end.
    pub toml: String,
    /// The PgBouncer settings not mapped, with the reason.
    pub notes: Vec<Note>,
    /// Whether the result passes `pgvalve check` here (certificate files are read from this
    /// machine): why not, if not.
    pub check: Result<(), crate::config::ConfigError>,
}

/// Reads `pgbouncer.ini` (and `userlist`, or else the file its `auth_file` names) and writes
/// the pgvalve configuration.
///
/// # Errors
/// A file that cannot be read, a malformed line (named), or files that name no user.
pub fn import(ini_path: &Path, userlist: Option<&Path>) -> Result<Imported, ImportError> {
    let entries = ini::read_ini(ini_path)?;
    let mut d = Draft::default();
    let g = global::map(&entries, &mut d)?;
    global::listen(&g, &mut d)?;
    if let Some(e) = g.get("pool_mode") {
        if let Some(m) = global::pool_mode(&e.value, "pool_mode", &e.at, &mut d)? {
            d.set("pool", "pool_mode", m, format!("pool_mode ({})", e.at));
        }
    }
    d.set(
        "pool",
        "max_server_connections",
        0,
        "PgBouncer has no cap across pools: see the note below",
    );
    d.note(None, "max_server_connections (PgBouncer has none)",
        "pgvalve can cap server connections across all pools: set [pool] max_server_connections = \"auto\" (sized from PostgreSQL's max_connections less the reserved connections) or a number below that; `pgvalve check --against postgres://...` says whether the pools fit");
    global::tls_modes(&g, &mut d)?;
    global::max_packet_size(&g, &mut d)?;
    global::reserve_pool(&g, &mut d)?;
    let auth = pools::auth_type(&g, ini_path.parent().unwrap_or(Path::new(".")), &mut d)?;
    let mut found = Found::default();
    let (list, sources) = read_users(ini_path, userlist, &g, &mut d)?;
    pools::userlist(&list, auth, &mut d, &mut found)?;
    pools::databases(&entries, &g, &mut d, &mut found)?;
    pools::users(&entries, auth, &mut d, &mut found)?;
    if found.users.is_empty() {
        return Err(ImportError::Incomplete(format!(
            "{}: no user pgvalve could take (pgvalve lists its users): pass --userlist userlist.txt",
            ini_path.display()
        )));
    }
    if !entries.iter().any(|e| e.section == "databases") {
        return Err(ImportError::Incomplete(format!(
            "{}: no [databases] entry",
            ini_path.display()
        )));
    }
    auth_query(&g, &found, &mut d);
    console_users(&g, &found, &mut d);
    pools::identities(&mut found, &global::caps(&g)?, &mut d);
    for e in entries.iter().filter(|e| e.section == "peers") {
        d.note(Some(&e.at), format!("peers.{}", e.key), "pgvalve has no peer list");
    }
    let toml = d.render(&format!("{}{sources}", ini_path.display()));
    let check = crate::config::parse_toml("imported", &toml)
        .and_then(|f| crate::config::Config::validate(f, "imported"))
        .map(|_| ());
    Ok(Imported {
        toml,
        notes: d.notes,
        check,
    })
}

/// The user list: `--userlist`, or PgBouncer's `auth_file` (relative to the working
/// directory, else to the ini file's).
fn read_users(
    ini_path: &Path,
    userlist: Option<&Path>,
    g: &Globals,
    d: &mut Draft,
) -> Result<(Vec<ini::ListedUser>, String), ImportError> {
    if let Some(p) = userlist {
        if let Some(e) = g.get("auth_file") {
            d.note(
                Some(&e.at),
                format!("auth_file = {}", e.value),
                format!("--userlist {} was read instead", p.display()),
            );
        }
        return Ok((ini::read_userlist(p)?, format!(" and {} (--userlist)", p.display())));
    }
    let Some(e) = g.get("auth_file") else {
        return Ok((Vec::new(), String::new()));
    };
    let p = values::located(&e.value, ini_path.parent().unwrap_or(Path::new(".")));
    if !p.exists() {
        d.note(
            Some(&e.at),
            format!("auth_file = {}", e.value),
            "not found here: pass --userlist",
        );
        return Ok((Vec::new(), String::new()));
    }
    Ok((
        ini::read_userlist(&p)?,
        format!(" and {} (auth_file, {})", p.display(), e.at),
    ))
}

/// `auth_user` (global, or the same one on every database that names one), `auth_query`
/// and `auth_dbname`: mapped when pgvalve can run the look-up as that user.
fn auth_query(g: &Globals, found: &Found, d: &mut Draft) {
    let lifted = match (g.get("auth_user"), found.db_auth_users.first()) {
        (Some(e), _) => Some((e.value.clone(), format!("auth_user ({})", e.at), e.at.clone())),
        (None, Some((_, u, at))) if found.db_auth_users.iter().all(|(_, o, _)| o == u) => Some((
            u.clone(),
            format!("auth_user of [databases] ({at}): pgvalve's applies to every database"),
            at.clone(),
        )),
        (None, Some(_)) => None,
        (None, None) => None,
    };
    for (db, u, at) in &found.db_auth_users {
        if lifted.as_ref().is_none_or(|(l, ..)| l != u) {
            d.note(
                Some(at),
                format!("databases.{db}: auth_user={u}"),
                "pgvalve has one auth_user for all databases",
            );
        }
    }
    let Some((user, from, at)) = lifted else {
        for k in ["auth_query", "auth_dbname"] {
            if let Some(e) = g.get(k) {
                d.note(Some(&e.at), format!("{k} = {}", e.value), "no auth_user was mapped");
            }
        }
        return;
    };
    if found.users.get(&user) != Some(&true) {
        d.note(Some(&at), format!("auth_user = {user}"), "pgvalve runs auth_query as a user of [users] with a password (userlist.txt has none for it): add it with password, then set [proxy] auth_user");
        return;
    }
    d.set("proxy", "auth_user", user, from);
    if let Some(e) = g.get("auth_query") {
        d.set("proxy", "auth_query", e.value.clone(), format!("auth_query ({})", e.at));
    }
    if let Some(e) = g.get("auth_dbname") {
        if d.has_table(&emit::sub_table("databases", &e.value)) {
            d.set(
                "proxy",
                "auth_dbname",
                e.value.clone(),
                format!("auth_dbname ({})", e.at),
            );
        } else {
            d.note(
                Some(&e.at),
                format!("auth_dbname = {}", e.value),
                "not in [databases]: look-ups run in the database the client asks for",
            );
        }
    }
}

/// `admin_users` and `stats_users`: those in `[users]` (pgvalve's console users log in as
/// any user does).
fn console_users(g: &Globals, found: &Found, d: &mut Draft) {
    for key in ["admin_users", "stats_users"] {
        let Some(e) = g.get(key) else { continue };
        let (known, unknown): (Vec<String>, Vec<String>) = values::list(&e.value)
            .into_iter()
            .partition(|u| found.users.contains_key(u));
        if !unknown.is_empty() {
            d.note(
                Some(&e.at),
                format!("{key}: {}", unknown.join(", ")),
                "not in [users] (pgvalve's console users log in like any user)",
            );
        }
        let list: Vec<toml::Value> = known.into_iter().map(toml::Value::String).collect();
        d.set("admin", key, toml::Value::Array(list), format!("{key} ({})", e.at));
    }
}

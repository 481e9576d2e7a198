//! The console's commands that change things: PAUSE, RESUME, RELOAD, KILL_CLIENT, SHUTDOWN.
//!
//! Part of the admin console; admin users only (the caller checks). Each answers like
//! PgBouncer: a CommandComplete with the command's name, or an ErrorResponse saying why not.

use std::time::Duration;

use bytes::BytesMut;

use super::Admin;
use crate::error::{sqlstate, PgError};
use crate::protocol::messages;

/// Runs `words` (upper-cased command words) if it is a control command; None when it is not.
pub(super) async fn run(
    shared: &Admin<'_>,
    words: &[&str],
    raw: &str,
    out: &mut BytesMut,
) -> Option<Result<(), PgError>> {
    let arg = raw.split_whitespace().nth(1).map(|a| a.trim_matches('"'));
    let r = match words {
        ["PAUSE"] | ["PAUSE", _] => pause(shared, arg, out).await,
        ["RESUME"] | ["RESUME", _] => resume(shared, arg, out),
        ["RELOAD"] => reload(shared, out).await,
        ["KILL_CLIENT", _] => kill_client(shared, arg.unwrap_or(""), out),
        ["SHUTDOWN"] => {
            tracing::info!("SHUTDOWN from the admin console: draining");
            shared.shutdown_requested.notify_one();
            messages::command_complete("SHUTDOWN", out);
            Ok(())
        }
        _ => return None,
    };
    Some(r)
}

/// PAUSE [db]: new transactions of the database (all when none is named) wait; returns once
/// none of its server connections is in use, after closing the idle ones.
async fn pause(shared: &Admin<'_>, db: Option<&str>, out: &mut BytesMut) -> Result<(), PgError> {
    if let Some(d) = db {
        if !shared.config().databases.contains_key(d) && !shared.config().databases.contains_key("*") {
            return Err(PgError::error(
                sqlstate::INVALID_CATALOG_NAME,
                format!("pgvalve: no database \"{d}\" to pause"),
            ));
        }
    }
    shared.pauses.pause(db);
    tracing::info!(
        database = db.unwrap_or("*"),
        "PAUSE: waiting for server connections in use"
    );
    while shared.pools.in_use(db) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed = shared.pools.close_idle(db);
    tracing::info!(database = db.unwrap_or("*"), closed, "paused");
    messages::command_complete("PAUSE", out);
    Ok(())
}

fn resume(shared: &Admin<'_>, db: Option<&str>, out: &mut BytesMut) -> Result<(), PgError> {
    if !shared.pauses.resume(db) {
        return Err(PgError::error(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pgvalve: {} is not paused",
                db.map_or("pgvalve".to_string(), |d| format!("database \"{d}\""))
            ),
        ));
    }
    tracing::info!(database = db.unwrap_or("*"), "resumed");
    messages::command_complete("RESUME", out);
    Ok(())
}

async fn reload(shared: &Admin<'_>, out: &mut BytesMut) -> Result<(), PgError> {
    match shared.reloader.reload().await {
        Ok(r) => {
            for c in &r.changes {
                messages::notice_response("00000", &format!("pgvalve: reload: {c}"), out);
            }
            for w in &r.warnings {
                messages::notice_response("01000", &format!("pgvalve: reload: {w}"), out);
            }
            for s in &r.restart_needed {
                messages::notice_response(
                    "01000",
                    &format!("pgvalve: reload: {s} changed but applies only after a restart"),
                    out,
                );
            }
            messages::command_complete("RELOAD", out);
            Ok(())
        }
        Err(e) => Err(PgError::error(
            sqlstate::CONFIG_FILE_ERROR,
            format!("pgvalve: reload refused, the running configuration stays: {e}"),
        )),
    }
}

fn kill_client(shared: &Admin<'_>, id: &str, out: &mut BytesMut) -> Result<(), PgError> {
    let session = u64::from_str_radix(id.trim_start_matches("0x"), 16)
        .ok()
        .filter(|_| id.starts_with("0x"))
        .or_else(|| id.parse().ok())
        .and_then(|n| shared.sessions.all().into_iter().find(|s| s.id == n));
    let Some(s) = session else {
        return Err(PgError::error(
            sqlstate::UNDEFINED_OBJECT,
            format!("pgvalve: no client with id {id} (SHOW CLIENTS lists them)"),
        ));
    };
    tracing::info!(client = s.id, identity = %s.client.identity, addr = %s.client.addr, "KILL_CLIENT");
    s.kill(
        PgError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command",
        )
        .with_detail("pgvalve: KILL_CLIENT from the admin console"),
    );
    messages::command_complete("KILL_CLIENT", out);
    Ok(())
}

//! The admin console: the virtual database `pgvalve` (alias `pgbouncer`) on the proxy's own
//! port, answering simple queries such as `SHOW LIMITS` from psql, as PgBouncer's does.
//!
//! Beside the flow: a client session whose startup packet names the console database is
//! authenticated like any other client (SCRAM against `[users]`), must be listed in
//! `[admin] admin_users` or `stats_users` (else FATAL 42501), takes no admission slot of an
//! identity and no server connection, and is served here until it leaves.

mod control;
mod forensics;
mod identities;
mod pgbouncer;
mod show;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use crate::client::{ClientConn, Console, Services, SessionError};
use crate::error::{sqlstate, PgError};
use crate::locks::LockMonitor;
use crate::protocol::messages;
use crate::protocol::tags::{backend, frontend, status};
use crate::reload::Reloader;

pub(crate) use crate::client::Role;

/// The console's own handles (the lock monitor, reloads, the SHUTDOWN signal); the sessions'
/// services come with each console user ([`crate::client::Console::serve`]).
#[derive(Debug)]
pub(crate) struct AdminConsole {
    locks: Arc<LockMonitor>,
    reloader: Arc<Reloader>,
    shutdown_requested: Arc<Notify>,
}

impl AdminConsole {
    /// A console over these handles.
    pub(crate) fn new(locks: Arc<LockMonitor>, reloader: Arc<Reloader>, shutdown_requested: Arc<Notify>) -> Self {
        AdminConsole {
            locks,
            reloader,
            shutdown_requested,
        }
    }
}

impl Console for AdminConsole {
    fn serve<'a>(
        &'a self,
        services: &'a Services,
        client: &'a mut ClientConn,
        role: Role,
    ) -> BoxFuture<'a, Result<(), SessionError>> {
        let admin = Admin {
            services,
            locks: &self.locks,
            reloader: &self.reloader,
            shutdown_requested: &self.shutdown_requested,
        };
        Box::pin(async move { serve(&admin, client, role).await })
    }
}

/// What a console command sees: the sessions' services (through `Deref`) and the console's
/// own handles.
pub(crate) struct Admin<'a> {
    services: &'a Services,
    locks: &'a LockMonitor,
    reloader: &'a Reloader,
    shutdown_requested: &'a Notify,
}

impl std::ops::Deref for Admin<'_> {
    type Target = Services;

    fn deref(&self) -> &Services {
        self.services
    }
}

/// Serves a logged-in console user until Terminate or disconnect.
///
/// # Errors
/// Client I/O and protocol errors.
async fn serve(shared: &Admin<'_>, client: &mut ClientConn, role: Role) -> Result<(), SessionError> {
    for (name, value) in [
        (
            "server_version",
            concat!("16.0 (pgvalve ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("standard_conforming_strings", "on"),
        ("integer_datetimes", "on"),
    ] {
        messages::parameter_status(name, value, &mut client.wbuf);
    }
    messages::backend_key_data(0, &[0; 4], &mut client.wbuf);
    messages::ready_for_query(status::IDLE, &mut client.wbuf);
    client.flush().await?;
    let max = shared.config().proxy.max_message_size.0.min(1 << 20);
    let mut failed_extended = false;
    loop {
        let frame = client.read_frame(max).await?;
        match frame.tag {
            frontend::QUERY => {
                let body = frame.body();
                let sql = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
                run(shared, role, &sql, &mut client.wbuf).await;
                messages::ready_for_query(status::IDLE, &mut client.wbuf);
            }
            frontend::TERMINATE => return Ok(()),
            frontend::SYNC => {
                failed_extended = false;
                messages::ready_for_query(status::IDLE, &mut client.wbuf);
            }
            _ if failed_extended => continue,
            _ => {
                // Parse/Bind/Execute...: refuse once, then skip to Sync, as PostgreSQL does.
                failed_extended = true;
                let e = PgError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgvalve console understands only simple queries (psql, or a driver's simple protocol)",
                );
                messages::error_response(&e, &mut client.wbuf);
            }
        }
        client.flush().await?;
    }
}

/// Runs one console command (several separated by `;` run in turn) into `out`.
async fn run(shared: &Admin<'_>, role: Role, sql: &str, out: &mut bytes::BytesMut) {
    let commands: Vec<&str> = sql.split(';').map(str::trim).filter(|c| !c.is_empty()).collect();
    if commands.is_empty() {
        put_empty(out);
        return;
    }
    for c in commands {
        let words: Vec<String> = c.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        // Stats users only SHOW: show::command refuses anything else with 42501.
        let control = match role {
            Role::Admin => control::run(shared, &words, c, out).await,
            Role::Stats => None,
        };
        let r = control.unwrap_or_else(|| show::command(shared, role, c, out));
        if let Err(e) = r {
            messages::error_response(&e, out);
            return;
        }
    }
}

fn put_empty(out: &mut bytes::BytesMut) {
    out.extend_from_slice(&[backend::EMPTY_QUERY_RESPONSE, 0, 0, 0, 4]);
}

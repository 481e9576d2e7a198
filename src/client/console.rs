//! The console's door: which database names are the console, who may use it, and the trait
//! through which a logged-in console user is handed to whoever serves it.
//!
//! Part of the client layer. A session whose startup packet names the console database is
//! authenticated like any other client and then served by [`Console::serve`]; the admin
//! module implements it and the composition root plugs it into [`super::Services`], so the
//! session needs no knowledge of the console's commands.

use futures_util::future::BoxFuture;

use crate::config::Config;

use super::{ClientConn, Services, SessionError};

/// The console's database names.
pub(crate) const DATABASES: &[&str] = &["pgvalve", "pgbouncer"];

/// True when `database` is the console.
pub(crate) fn is_console(database: &str) -> bool {
    DATABASES.contains(&database)
}

/// What a console user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every command.
    Admin,
    /// SHOW commands only.
    Stats,
}

/// The console role of `user` under `config`, if any.
pub(crate) fn role(config: &Config, user: &str) -> Option<Role> {
    let a = &config.admin;
    if a.admin_users.iter().any(|u| u == user) {
        Some(Role::Admin)
    } else if a.stats_users.iter().any(|u| u == user) {
        Some(Role::Stats)
    } else {
        None
    }
}

/// Serves a logged-in console user until Terminate or disconnect.
pub trait Console: Send + Sync + std::fmt::Debug {
    /// Serves `client` in `role`, with the sessions' services at hand.
    ///
    /// # Errors
    /// Client I/O and protocol errors.
    fn serve<'a>(
        &'a self,
        services: &'a Services,
        client: &'a mut ClientConn,
        role: Role,
    ) -> BoxFuture<'a, Result<(), SessionError>>;
}

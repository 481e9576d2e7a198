//! Live reload: SIGHUP and the console's `RELOAD`.
//!
//! Beside the flow (config + reload). The new file is read, parsed and validated off to the
//! side ([`crate::config::load_with`]); only a configuration that is valid as a whole is
//! published, in one step: the live [`Config`] is swapped, the pools are resized or retired
//! ([`crate::pool::PoolSet::reload`]) and admission takes the new limits and identity rules.
//! Connected clients are never dropped. Settings read only at start (listen addresses, the
//! proxy-wide caps) keep their old value and the reload says so. A failed reload changes
//! nothing; it is logged, counted and, for `RELOAD`, told to the console user.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::{self, Config, Overrides};
use crate::proxy::Shared;

/// Where a reload reads the configuration from, and how reloads went.
#[derive(Debug, Default)]
pub struct Reloads {
    source: Mutex<Option<(Option<PathBuf>, Overrides)>>,
    /// Reloads applied.
    pub ok: AtomicU64,
    /// Reloads refused (the configuration in force stayed).
    pub failed: AtomicU64,
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// What changed, one line each.
    pub changes: Vec<String>,
    /// Settings that changed in the file but apply only at the next start.
    pub restart_needed: Vec<String>,
}

impl Reloads {
    /// Sets what `RELOAD` and SIGHUP read: the config file (None: the quick start) and the
    /// command-line overrides.
    pub fn set_source(&self, path: Option<PathBuf>, overrides: Overrides) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, overrides));
    }
}

/// Reads the configuration again from its source and applies it.
///
/// # Errors
/// Why the new configuration was refused (nothing changed): no source, or the file's error.
pub fn reload(shared: &Shared) -> Result<Reloaded, String> {
    let source = shared.reloads.source.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let result = match source {
        None => Err("this pgvalve was started without a configuration source to reload".to_string()),
        Some((path, ov)) => config::load_with(path.as_deref(), &ov).map_err(|e| e.to_string()),
    };
    match result {
        Ok(c) => Ok(apply(shared, c)),
        Err(e) => {
            shared.reloads.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "reload failed; the running configuration stays");
            Err(e)
        }
    }
}

/// Publishes an already validated configuration.
pub fn apply(shared: &Shared, new: Config) -> Reloaded {
    let old = shared.config();
    let mut r = Reloaded {
        restart_needed: restart_needed(&old, &new),
        ..Default::default()
    };
    if old.pool != new.pool {
        r.changes.push("[pool] settings".into());
    }
    if old.users.keys().ne(new.users.keys()) || old.databases != new.databases {
        r.changes.push("[users] or [databases]".into());
    }
    if old.admin != new.admin || old.locks != new.locks {
        r.changes.push("[admin] or [locks]".into());
    }
    let admission = crate::admission::AdmissionConfig::from_config(&new);
    shared.live_config.store(Arc::new(new));
    r.changes.extend(shared.pools.reload(&shared.config()));
    shared.admission.reload(admission);
    shared.reloads.ok.fetch_add(1, Ordering::Relaxed);
    tracing::info!(changes = ?r.changes, "configuration reloaded");
    for s in &r.restart_needed {
        tracing::warn!(setting = %s, "changed in the configuration but applies only at the next start");
    }
    r
}

fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    let mut check = |name: &str, same: bool| {
        if !same {
            v.push(name.to_string());
        }
    };
    check("proxy.listen", old.listen == new.listen);
    check("http.listen", old.http_listen == new.http_listen);
    check(
        "proxy.max_client_connections",
        old.proxy.max_client_connections == new.proxy.max_client_connections,
    );
    check(
        "pool.max_server_connections",
        old.pool.max_server_connections == new.pool.max_server_connections,
    );
    check(
        "proxy.worker_threads",
        old.proxy.worker_threads == new.proxy.worker_threads,
    );
    check(
        "proxy.session_threads",
        old.proxy.session_threads == new.proxy.session_threads,
    );
    check("locks.enabled", old.locks.enabled == new.locks.enabled);
    v
}

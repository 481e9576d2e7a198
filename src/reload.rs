//! Live reload: SIGHUP and the console's `RELOAD`.
//!
//! A service above config, the pools and admission, which it takes as handles ([`Reloader`]);
//! the console and the proxy call it. The new file is read, parsed and validated off to the
//! side ([`crate::config::load_with`]); only a configuration that is valid as a whole is
//! published, in one step: the live [`Config`] is swapped, the pools are resized or retired
//! ([`crate::pool::PoolSet::reload`]) and admission takes the new limits and identity rules.
//! Connected clients are never dropped. A `max_server_connections` of `"auto"` or a
//! percentage is sized again from PostgreSQL first ([`sizing`], on a brief slot of the budget
//! in force); when PostgreSQL cannot be read the budget in force stays (a warning; the rest
//! applies), and a new size resizes the budget across pools. Settings read only at start
//! (listen addresses, `max_client_connections`) keep their old value and the reload says so.
//! A failed reload changes nothing; it is logged, counted and, for `RELOAD`, told to the
//! console user.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

use crate::admission::{Admission, AdmissionConfig};
use crate::config::{self, Config, Overrides, ServerBudget};
use crate::pool::PoolSet;
use crate::server::sizing;

/// What a reload publishes to (the live configuration, the pools, admission), where it reads
/// the configuration from, and how reloads went. The proxy builds one; the console's
/// `RELOAD`, SIGHUP and [`crate::ProxyHandle::reload`] use it.
#[derive(Debug)]
pub(crate) struct Reloader {
    live_config: Arc<ArcSwap<Config>>,
    pools: PoolSet,
    admission: Admission,
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
    pub(crate) restart_needed: Vec<String>,
    /// What the reload could not do but did not refuse it (PostgreSQL's limits unread).
    pub warnings: Vec<String>,
}

impl Reloader {
    /// A reloader that publishes to these handles.
    pub(crate) fn new(live_config: Arc<ArcSwap<Config>>, pools: PoolSet, admission: Admission) -> Self {
        Reloader {
            live_config,
            pools,
            admission,
            source: Mutex::default(),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn config(&self) -> Guard<Arc<Config>> {
        self.live_config.load()
    }

    /// Sets what `RELOAD` and SIGHUP read: the config file (None: the quick start) and the
    /// command-line overrides.
    pub(crate) fn set_source(&self, path: Option<PathBuf>, overrides: Overrides) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, overrides));
    }

    /// Reads the configuration again from its source and applies it.
    ///
    /// # Errors
    /// Why the new configuration was refused (nothing changed): no source, or the file's error.
    pub(crate) async fn reload(&self) -> Result<Reloaded, String> {
        let source = self.source.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = match source {
            None => Err("this pgvalve was started without a configuration source to reload".to_string()),
            Some((path, ov)) => config::load_with(path.as_deref(), &ov).map_err(|e| e.to_string()),
        };
        match result {
            Ok(mut c) => {
                // Off to the side: a PostgreSQL that cannot be read keeps the budget in force.
                let not_sized = sizing::size_with_budget(&mut c, self.pools.budgets()).await.err();
                let mut r = self.apply(c);
                if let Some(e) = not_sized {
                    tracing::warn!(error = %e, max_server_connections = self.config().max_server_connections(), "reload: max_server_connections not sized again; the budget in force stays");
                    r.warnings.push(format!(
                        "{e}; max_server_connections stays {}",
                        self.config().max_server_connections()
                    ));
                }
                Ok(r)
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "reload failed; the running configuration stays");
                Err(e)
            }
        }
    }

    /// Publishes an already validated configuration. An `"auto"` or percentage
    /// `max_server_connections` not sized (see [`sizing`]) keeps the budget in force.
    pub(crate) fn apply(&self, mut new: Config) -> Reloaded {
        let old = self.config();
        let mut r = Reloaded {
            restart_needed: restart_needed(&old, &new),
            ..Default::default()
        };
        r.changes.extend(self.resize_budget(&old, &mut new));
        if old.pool != new.pool {
            r.changes.push("[pool] settings".into());
        }
        if old.users.keys().ne(new.users.keys()) || old.databases != new.databases {
            r.changes.push("[users] or [databases]".into());
        }
        if old.admin != new.admin || old.locks != new.locks {
            r.changes.push("[admin] or [locks]".into());
        }
        if self.pools.cluster().is_none() {
            // No cluster runs (it starts with the process): nobody would lease these caps.
            for rule in &mut new.identities {
                if rule.limits.cluster_max_server_connections.take().is_some() {
                    tracing::warn!(rule = %rule.template(), "cluster_max_server_connections ignored until pgvalve restarts with its [cluster]");
                }
            }
        }
        let admission = AdmissionConfig::from_config(&new);
        self.live_config.store(Arc::new(new));
        r.changes.extend(self.pools.reload(&self.config()));
        self.admission.reload(admission);
        self.ok.fetch_add(1, Ordering::Relaxed);
        tracing::info!(changes = ?r.changes, "configuration reloaded");
        for s in &r.restart_needed {
            tracing::warn!(setting = %s, "changed in the configuration but applies only at the next start");
        }
        r
    }
}

impl Reloader {
    /// Resizes the budget of `max_server_connections` to `new`'s (carrying `old`'s over
    /// when `new`'s is unsized); says so when it changed.
    fn resize_budget(&self, old: &Config, new: &mut Config) -> Option<String> {
        if new.server_budget.is_none() {
            let kept = old.max_server_connections();
            new.server_budget = Some(ServerBudget {
                max: kept,
                source: match &old.server_budget {
                    Some(b) if old.pool.max_server_connections == new.pool.max_server_connections => {
                        format!("{} (kept: not read again at the last reload)", b.source)
                    }
                    _ => format!(
                        "{} kept from before the last reload (PostgreSQL not read)",
                        old.pool.max_server_connections
                    ),
                },
            });
        }
        let (was, now) = (old.max_server_connections(), new.max_server_connections());
        if was == now {
            return None;
        }
        self.pools.budgets().server().resize(now as usize);
        tracing::info!(was, now, "max_server_connections resized");
        Some(format!("max_server_connections: {was} -> {now}"))
    }
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
        "proxy.worker_threads",
        old.proxy.worker_threads == new.proxy.worker_threads,
    );
    check(
        "proxy.session_threads",
        old.proxy.session_threads == new.proxy.session_threads,
    );
    check("locks.enabled", old.locks.enabled == new.locks.enabled);
    check("cluster", old.cluster == new.cluster);
    v
}

//! The lock monitor: which sessions hold which locks, attributed to the pgvalve client that
//! holds them, and the `max_lock_hold` policy that acts only on the offender.
//!
//! Beside the flow. One task per proxy polls, every `[locks] poll_interval`, each database
//! pgvalve serves, over its own tokio-postgres connection (never one from the client pools,
//! but inside their caps: it holds a slot of the pool's budget, see [`conn`]):
//! one query joining `pg_locks`, `pg_stat_activity` and `pg_blocking_pids()`, bounded by a
//! statement timeout, one poll in flight at a time. Backends are mapped to sessions through
//! the session registry (which backend each session uses now); [`record`] keeps current
//! locks, episodes and history and says which actions are due; this module carries them out.
//! Between polls the relay reports when a recorded holder's transaction ends (ReadyForQuery
//! 'I'); the monitor then drops that session's locks at once, so its episodes end on time and
//! `max_lock_holders` admits the next transaction without waiting for a poll. A lost
//! connection (PostgreSQL restarted) is re-opened at the next poll. While a client's DROP
//! DATABASE (or the like) holds a database (see [`crate::dbgate`]), the monitor closes its
//! connection to it at once and opens none until the hold is dropped.

mod conn;
pub(crate) mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

pub use record::{Episode, LockView, Recorder, Row};

use arc_swap::{ArcSwap, Guard};

use crate::admission::Admission;
use crate::config::Config;
use crate::pool::PoolSet;
use crate::server::budget::Budget;
use crate::sessions::Sessions;
use crate::shutdown::Phase;

/// The one query of a poll.
pub(crate) const POLL_SQL: &str = "
SELECT l.pid, coalesce(a.usename, ''), coalesce(a.application_name, ''),
       coalesce(host(a.client_addr) || ':' || a.client_port, 'local'), coalesce(a.state, ''),
       extract(epoch FROM now() - a.xact_start)::float8, left(coalesce(a.query, ''), 200),
       l.locktype, l.mode, l.granted, c.relname::text,
       CASE WHEN l.granted THEN NULL ELSE pg_blocking_pids(l.pid) END
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
LEFT JOIN pg_class c ON c.oid = l.relation
WHERE l.pid <> pg_backend_pid() AND a.datname = current_database()
  AND (NOT l.granted
       OR (l.locktype = 'relation' AND l.mode <> 'AccessShareLock'
           AND c.relkind IN ('r', 'p', 'm') AND c.relnamespace <> 'pg_catalog'::regnamespace))";

/// The lock monitor's shared state (SHOW LOCKS, SHOW LOCK_HISTORY, metrics).
#[derive(Debug, Default)]
pub struct LockMonitor {
    recorder: Mutex<Recorder>,
}

impl LockMonitor {
    /// The recorded state.
    pub fn state(&self) -> MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the monitor's task reads and tells: the live configuration, the pools (which
/// databases are in use), the session registry (who uses which backend), admission (each
/// identity's lock policy, and holders per identity for `max_lock_holders`) and the
/// monitor's own state.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The configuration in force.
    pub(crate) live_config: Arc<ArcSwap<Config>>,
    /// The server connection pools.
    pub pools: PoolSet,
    /// Client sessions and the backends they use.
    pub sessions: Arc<Sessions>,
    /// Client admission.
    pub admission: Admission,
    /// Where the monitor records what it saw.
    pub locks: Arc<LockMonitor>,
    /// Databases a client's DROP DATABASE (or the like) needs to itself: the monitor keeps
    /// no connection to them while they are held.
    pub(crate) gates: Arc<crate::dbgate::DbGates>,
}

impl Watch {
    fn config(&self) -> Guard<Arc<Config>> {
        self.live_config.load()
    }
}

/// A database to watch, with the credentials to do it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Target {
    host: String,
    port: u16,
    dbname: String,
    user: String,
    password: Option<String>,
}

/// The databases in use: every configured one, and those reached through `"*"` whose pool
/// has server connections open (so a database dropped through pgvalve is not polled again);
/// each with the budget its connection takes its slot from (the pool of the monitor's user
/// there; the first name wins when several reach one server database).
fn targets(shared: &Watch) -> Vec<(Target, Arc<Budget>)> {
    let c = shared.config();
    let Some(user) = c.locks.user.clone().or_else(|| c.users.keys().next().cloned()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = c.databases.keys().filter(|d| *d != "*").cloned().collect();
    names.extend(
        shared
            .pools
            .stats()
            .into_iter()
            .filter(|p| p.open > 0)
            .map(|p| p.key.database),
    );
    names.sort();
    names.dedup();
    let password = c
        .users
        .get(&user)
        .and_then(|u| u.server_password.as_ref())
        .map(|p| p.0.clone());
    let mut out: Vec<(Target, Arc<Budget>)> = Vec::new();
    for (d, r) in names.iter().filter_map(|d| c.route(d, &user).map(|r| (d, r))) {
        let t = Target {
            host: r.host,
            port: r.port,
            dbname: r.server_dbname,
            password: password.clone(),
            user: user.clone(),
        };
        if !out.iter().any(|(o, _)| *o == t) {
            out.push((t, shared.pools.budget(d, &user, r.pool_size)));
        }
    }
    out
}

/// Runs the poll query once on `client`.
///
/// # Errors
/// The query's error (statement timeout, connection lost).
pub async fn poll(client: &tokio_postgres::Client) -> Result<Vec<Row>, tokio_postgres::Error> {
    let rows = client.query(POLL_SQL, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| Row {
            pid: r.get(0),
            user: r.get(1),
            application_name: r.get(2),
            addr: r.get(3),
            state: r.get(4),
            xact_age: r.get(5),
            query: r.get(6),
            locktype: r.get(7),
            mode: r.get(8),
            granted: r.get(9),
            relation: r.get(10),
            blocked_by: r.get::<_, Option<Vec<i32>>>(11).unwrap_or_default(),
        })
        .collect())
}

/// One round: poll every target, record, act.
async fn round(shared: &Watch, conns: &mut conn::Conns) {
    let config = shared.config();
    let cfg = &config.locks;
    let mut rows = Vec::new();
    let mut owner: HashMap<i32, Target> = HashMap::new();
    // Before the query: which transactions each session had ended, to tell later whether a
    // lock read by the poll is still held.
    let ends_before = shared.sessions.ends();
    let targets = targets(shared);
    conns.keep(&targets);
    for (t, budget) in targets {
        if shared.gates.is_held(&t.host, t.port, &t.dbname) {
            conns.lost(&t);
            continue;
        }
        let Some(client) = conns.ready(&t, &budget, cfg.poll_timeout).await else {
            continue;
        };
        match poll(client).await {
            Ok(r) => {
                owner.extend(r.iter().map(|row| (row.pid, t.clone())));
                rows.extend(r);
            }
            // The connection and its slot are kept unless the connection is gone: in a
            // saturated pool a new slot may be long to come (a slow poll is no reason).
            Err(e) if !client.is_closed() && e.as_db_error().is_some_and(|d| d.severity() == "ERROR") => {
                tracing::info!(error = %e, db = %t.dbname, "lock poll failed; trying again next poll");
            }
            Err(e) => {
                tracing::info!(error = %e, db = %t.dbname, "lock poll failed; reconnecting next poll");
                conns.lost(&t);
            }
        }
    }
    let rules = record::Rules {
        dangerous_modes: cfg.dangerous_modes.clone(),
        warn_after: cfg.warn_after,
        history: cfg.history,
    };
    let sessions = shared.sessions.by_backend();
    let (acts, holders) = {
        let mut rec = shared.locks.state();
        let acts = rec.update(rows, &sessions, &ends_before, &rules, |id| {
            shared.admission.lock_policy(id)
        });
        (acts, rec.holders_per_identity())
    };
    // max_lock_holders: admission holds back new transactions of identities at their cap.
    shared.admission.set_lock_holders(&holders);
    for a in acts {
        let (pid, sql) = match a {
            record::Act::Terminate(_, Some(s), e) => {
                s.verdict.deliver(e);
                continue;
            }
            record::Act::Terminate(pid, None, _) => (pid, "SELECT pg_terminate_backend($1)"),
            record::Act::Cancel(pid, s, e) => {
                s.explain_cancel(e);
                (pid, "SELECT pg_cancel_backend($1)")
            }
        };
        if let Some(c) = owner.get(&pid).and_then(|t| conns.client(t)) {
            if let Err(e) = c.execute(sql, &[&pid]).await {
                tracing::warn!(error = %e, pid, "lock monitor could not signal the backend");
            }
        }
    }
}

/// Between polls: drops the locks of holders whose transaction has ended.
fn release_ended(shared: &Watch) {
    let holders = {
        let mut rec = shared.locks.state();
        if !rec.release_ended(shared.config().locks.history) {
            return;
        }
        rec.holders_per_identity()
    };
    shared.admission.set_lock_holders(&holders);
}

/// Polls until the proxy stops.
pub async fn run(shared: Watch, mut phase: watch::Receiver<Phase>) {
    if !shared.config().locks.enabled {
        return;
    }
    let mut period = shared.config().locks.poll_interval;
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conns = conn::Conns::default();
    let mut holds = shared.gates.subscribe();
    loop {
        tokio::select! {
            // A database is held: its connection goes now.
            Ok(()) = holds.changed() => conns.drop_where(|t| shared.gates.is_held(&t.host, t.port, &t.dbname)),
            _ = every.tick() => {
                round(&shared, &mut conns).await;
                // A reload may have changed the interval.
                let now = shared.config().locks.poll_interval;
                if now != period {
                    period = now;
                    every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            () = shared.sessions.released() => release_ended(&shared),
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
    }
}

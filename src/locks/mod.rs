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
//! connection to it at once and opens none until the hold is dropped. The same task records
//! the deadlocks the relay reports ([`deadlock`]; also when the monitor is disabled) and,
//! at each poll, transactions open longer than `long_transaction_after` ([`long`]) and the
//! routes behind surges still going ([`routes`]); statements' sqlcommenter tags are read
//! here from what a poll returns.

mod conn;
pub mod deadlock;
pub mod long;
pub(crate) mod record;
pub mod routes;

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
       CASE WHEN l.granted THEN NULL ELSE pg_blocking_pids(l.pid) END,
       CASE WHEN length(a.query) > 200 THEN right(a.query, 1024) ELSE '' END
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
    deadlocks: Mutex<deadlock::Deadlocks>,
    long: Mutex<long::LongTransactions>,
    surge_routes: Mutex<routes::SurgeRoutes>,
}

impl LockMonitor {
    /// The recorded state.
    pub fn state(&self) -> MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The long transactions recorded (SHOW LONG_TRANSACTIONS, metrics).
    pub fn long_transactions(&self) -> MutexGuard<'_, long::LongTransactions> {
        self.long.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routes seen behind surges (SHOW SURGES).
    pub fn surge_routes(&self) -> MutexGuard<'_, routes::SurgeRoutes> {
        self.surge_routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The deadlocks recorded (SHOW DEADLOCKS, metrics).
    pub fn deadlocks(&self) -> MutexGuard<'_, deadlock::Deadlocks> {
        self.deadlocks.lock().unwrap_or_else(|p| p.into_inner())
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
            tags: crate::protocol::sqlcomment::Tags::parse(&format!(
                "{} {}",
                r.get::<_, &str>(6),
                r.get::<_, &str>(12)
            )),
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
            query_tail: r.get(12),
        })
        .collect())
}

/// One round: poll every target, record, act.
async fn round(shared: &Watch, conns: &mut conn::Conns) {
    let config = shared.config();
    let cfg = &config.locks;
    let mut rows = Vec::new();
    let mut long_rows = Vec::new();
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
                if !cfg.long_transaction_after.is_zero() {
                    long_rows.extend(long::poll(client, cfg.long_transaction_after).await);
                }
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
    shared
        .locks
        .long_transactions()
        .update(long_rows, &sessions, cfg.history);
    let (acts, holders) = {
        let mut rec = shared.locks.state();
        let acts = rec.update(rows, &sessions, &ends_before, &rules, |id| {
            shared.admission.lock_policy(id)
        });
        (acts, rec.holders_per_identity())
    };
    // max_lock_holders: admission holds back new transactions of identities at their cap.
    shared.admission.set_lock_holders(&holders);
    surge_routes(shared);
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

/// While a surge goes on: the routes its identity's sessions run (see [`routes`]).
fn surge_routes(shared: &Watch) {
    let surges = shared.admission.surges();
    if surges.iter().any(|e| e.ended.is_none()) {
        shared.locks.surge_routes().update(&surges, &shared.sessions.all());
    }
}

/// Records the deadlocks the relay reported: each other side's statement from the last poll,
/// or else from one look-up in pg_stat_activity (on every open connection of the monitor).
async fn deadlocks(shared: &Watch, conns: &conn::Conns) {
    let reports = shared.sessions.take_deadlocks();
    if reports.is_empty() {
        return;
    }
    let mut seen: HashMap<i32, deadlock::Seen> = HashMap::new();
    for l in &shared.locks.state().current {
        let tail = [l.row.query.as_str(), l.row.query_tail.as_str()];
        seen.entry(l.row.pid).or_insert_with(|| deadlock::Seen {
            application_name: l.row.application_name.clone(),
            addr: l.row.addr.clone(),
            query: if tail[1].is_empty() {
                tail[0].to_string()
            } else {
                tail.join(" ... ")
            },
        });
    }
    let missing = deadlock::missing(&reports, &seen);
    for c in conns.open().filter(|_| !missing.is_empty()) {
        match c.query(deadlock::LOOKUP_SQL, &[&missing]).await {
            Ok(rows) => {
                for r in rows {
                    let s = deadlock::Seen {
                        application_name: r.get(1),
                        addr: r.get(2),
                        query: r.get(3),
                    };
                    let e = seen.entry(r.get(0)).or_default();
                    if e.query.is_empty() {
                        *e = s;
                    }
                }
            }
            Err(e) => tracing::info!(error = %e, "deadlock look-up in pg_stat_activity failed"),
        }
    }
    let bound = shared.config().locks.history;
    let mut d = shared.locks.deadlocks();
    for r in &reports {
        d.record(deadlock::episode(r, &seen), bound);
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
        // No polls; deadlocks are still recorded (without the other sides' statements).
        loop {
            tokio::select! {
                () = shared.sessions.deadlock_seen() => deadlocks(&shared, &conn::Conns::default()).await,
                r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
            }
        }
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
            () = shared.sessions.deadlock_seen() => deadlocks(&shared, &conns).await,
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
    }
}

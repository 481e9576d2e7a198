//! What the status page and `/status.json` show: per identity its connections against its
//! caps, waiting clients, the last 15 minutes of them, refusals, latency and surges; the surge
//! episodes; dangerous lock holders with what they block, recent lock episodes and deadlocks
//! (each side's identity, application and sqlcommenter route, never its statement); pool usage
//! per database/user; whether PostgreSQL can be reached. Read now from the services, never a
//! secret (no password, no connection string, no client address).
//!
//! Part of the HTTP endpoint: [`Status::read`] gathers it, `page` renders it as HTML.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::history::Point;
use super::Sources;

/// Everything the page shows.
#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub version: &'static str,
    /// RFC 3339, when this was read.
    pub now: String,
    pub postgres: Reach,
    /// Client connections of the whole proxy now, and its cap.
    pub clients: usize,
    pub max_client_connections: u32,
    /// Sorted by server connections, then clients, most first.
    pub identities: Vec<Identity>,
    pub surges: Vec<Surge>,
    pub lock_holders: Vec<Holder>,
    pub lock_episodes: Vec<Episode>,
    /// The last 20 deadlocks, newest first.
    pub deadlocks: Vec<Deadlock>,
    pub pools: Vec<Pool>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Reach {
    pub reachable: bool,
    pub detail: &'static str,
}

#[derive(Debug, Serialize)]
pub(crate) struct Identity {
    pub identity: String,
    pub clients: u32,
    /// 0: no cap.
    pub max_client_connections: u32,
    pub server_connections: u32,
    pub max_server_connections: u32,
    /// Its cap across every instance of the cluster (0: none).
    pub cluster_max_server_connections: u32,
    /// This instance's part of that cap now.
    pub cluster_grants: u32,
    pub waiting: u32,
    pub login_rate: f64,
    pub client_growth_10s: i64,
    pub surging: bool,
    pub refused: BTreeMap<&'static str, u64>,
    pub queries_1m: u64,
    pub query_p50_ms: Option<f64>,
    pub query_p99_ms: Option<f64>,
    /// Dangerous locks its sessions hold now.
    pub lock_holders: usize,
    /// Deadlocks it was part of since start.
    pub deadlocks: u64,
    /// One point a second, oldest first, up to 15 minutes.
    pub history: Series,
}

/// An identity's sparklines.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Series {
    pub clients: Vec<f32>,
    pub servers: Vec<f32>,
    pub waiting: Vec<f32>,
    pub login_rate: Vec<f32>,
    pub growth_10s: Vec<f32>,
}

impl Series {
    fn of(points: &[Point]) -> Self {
        let pick = |f: fn(&Point) -> f32| points.iter().map(f).collect();
        Series {
            clients: pick(|p| p.clients),
            servers: pick(|p| p.servers),
            waiting: pick(|p| p.waiting),
            login_rate: pick(|p| p.login_rate),
            growth_10s: pick(|p| p.growth_10s),
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Surge {
    pub identity: String,
    pub started: String,
    pub ended: Option<String>,
    pub trigger: &'static str,
    pub login_rate: f64,
    pub peak_login_rate: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Holder {
    pub pid: i32,
    /// The pgvalve identity, or "external".
    pub identity: String,
    pub mode: String,
    pub relation: Option<String>,
    pub state: String,
    pub held_seconds: f64,
    /// Backends waiting on it, with who they are.
    pub blocks: Vec<Blocked>,
    pub blocks_total: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct Blocked {
    pub pid: i32,
    pub identity: String,
    pub mode: String,
    pub relation: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Episode {
    pub identity: String,
    pub pid: i32,
    pub relation: String,
    pub mode: String,
    pub started: String,
    pub ended: Option<String>,
    pub max_blocked: usize,
    pub ended_by: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Deadlock {
    pub at: String,
    /// False: PostgreSQL's DETAIL had an unexpected shape; only the rolled-back side is known.
    pub cycle_known: bool,
    /// The backends of the cycle, the rolled-back one first.
    pub sides: Vec<DeadlockSide>,
}

/// One side of a deadlock: who, and the view (sqlcommenter route) it ran for. Its statement
/// stays in SHOW DEADLOCKS: it may carry values.
#[derive(Debug, Serialize)]
pub(crate) struct DeadlockSide {
    pub pid: i32,
    /// The pgvalve identity, or "external".
    pub identity: String,
    pub application_name: String,
    pub route: Option<String>,
    pub controller: Option<String>,
    pub waited_for: String,
    pub blocked_by: Option<i32>,
    pub rolled_back: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Pool {
    pub database: String,
    pub user: String,
    pub pool_size: usize,
    pub active: usize,
    pub idle: usize,
    /// Slots held by pgvalve's own connections (the lock monitor's).
    pub own: usize,
    pub waiting: usize,
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl Status {
    /// Reads everything now (`reach`: PostgreSQL's reachability, found by the caller).
    pub(crate) fn read(shared: &Sources, reach: Reach) -> Status {
        let services = &shared.services;
        let (lock_holders, lock_episodes) = locks(shared);
        let mut held: BTreeMap<&str, usize> = BTreeMap::new();
        for h in &lock_holders {
            *held.entry(h.identity.as_str()).or_default() += 1;
        }
        let (deadlocks, deadlock_counts) = deadlocks(shared);
        let mut times = services.pools.stats.latency.minute_by_identity(Instant::now());
        let mut identities: Vec<Identity> = services
            .admission
            .identities()
            .into_iter()
            .map(|i| {
                let l = times.remove(i.identity.as_str()).unwrap_or_default();
                Identity {
                    max_client_connections: i.limits.max_clients,
                    max_server_connections: i.limits.max_servers,
                    cluster_max_server_connections: i.limits.cluster_max_servers,
                    cluster_grants: i.cluster_grants,
                    clients: i.clients,
                    server_connections: i.servers,
                    waiting: i.waiting,
                    login_rate: i.login_rate,
                    client_growth_10s: i.delta_10s,
                    surging: i.surging,
                    refused: i.counters.refused.iter().map(|(k, v)| (*k, *v)).collect(),
                    queries_1m: l.query.count(),
                    query_p50_ms: ms(l.query.quantile(0.5)),
                    query_p99_ms: ms(l.query.quantile(0.99)),
                    lock_holders: held.get(i.identity.as_str()).copied().unwrap_or(0),
                    deadlocks: deadlock_counts.get(&i.identity).copied().unwrap_or(0),
                    history: Series::of(&shared.history.series(&i.identity)),
                    identity: i.identity,
                }
            })
            .collect();
        identities.sort_by(|a, b| {
            (b.server_connections, b.clients)
                .cmp(&(a.server_connections, a.clients))
                .then_with(|| a.identity.cmp(&b.identity))
        });
        Status {
            version: env!("CARGO_PKG_VERSION"),
            now: time(SystemTime::now()),
            postgres: reach,
            clients: services.admission.clients(),
            max_client_connections: services.config().proxy.max_client_connections,
            identities,
            surges: surges(shared),
            lock_holders,
            lock_episodes,
            deadlocks,
            pools: pools(shared),
        }
    }
}

/// The last 20 surge episodes, newest first.
fn surges(shared: &Sources) -> Vec<Surge> {
    let mut v = shared.services.admission.surges();
    v.reverse();
    v.truncate(20);
    v.into_iter()
        .map(|e| Surge {
            started: time(e.started),
            ended: e.ended.map(time),
            trigger: e.trigger,
            login_rate: e.rate,
            peak_login_rate: e.peak_rate,
            identity: e.identity,
        })
        .collect()
}

/// Dangerous lock holders now with the backends they block, and the last 20 episodes.
fn locks(shared: &Sources) -> (Vec<Holder>, Vec<Episode>) {
    let st = shared.locks.state();
    let who = |l: &crate::locks::record::LockView| {
        l.session
            .as_ref()
            .map_or("external".to_string(), |s| s.client.identity.to_string())
    };
    let holders = st
        .current
        .iter()
        .filter(|l| l.dangerous && l.row.granted)
        .map(|l| Holder {
            pid: l.row.pid,
            identity: who(l),
            mode: l.row.mode.clone(),
            relation: l.row.relation.clone(),
            state: l.row.state.clone(),
            held_seconds: (l.held.as_secs_f64() * 10.0).round() / 10.0,
            blocks: st
                .current
                .iter()
                .filter(|w| !w.row.granted && w.row.blocked_by.contains(&l.row.pid))
                .map(|w| Blocked {
                    pid: w.row.pid,
                    identity: who(w),
                    mode: w.row.mode.clone(),
                    relation: w.row.relation.clone(),
                })
                .collect(),
            blocks_total: l.blocks_total,
        })
        .collect();
    let episodes = st
        .history
        .iter()
        .rev()
        .take(20)
        .map(|e| Episode {
            identity: e.identity.clone(),
            pid: e.pid,
            relation: e.relation.clone(),
            mode: e.mode.clone(),
            started: time(e.started),
            ended: e.ended.map(time),
            max_blocked: e.max_blocked,
            ended_by: e.ended_by.clone(),
        })
        .collect();
    (holders, episodes)
}

/// The last 20 deadlocks, newest first, and the count per identity since start.
fn deadlocks(shared: &Sources) -> (Vec<Deadlock>, std::collections::HashMap<String, u64>) {
    let d = shared.locks.deadlocks();
    let recent = d
        .history
        .iter()
        .rev()
        .take(20)
        .map(|e| Deadlock {
            at: time(e.at),
            cycle_known: e.cycle_known,
            sides: e
                .parties
                .iter()
                .map(|p| DeadlockSide {
                    pid: p.pid,
                    identity: p.identity.clone(),
                    application_name: p.application_name.clone(),
                    route: p.tags.route.clone(),
                    controller: p.tags.controller.clone(),
                    waited_for: p.waited_for.clone(),
                    blocked_by: p.blocked_by,
                    rolled_back: p.loser,
                })
                .collect(),
        })
        .collect();
    (recent, d.counts.clone())
}

fn pools(shared: &Sources) -> Vec<Pool> {
    shared
        .services
        .pools
        .stats()
        .into_iter()
        .map(|p| Pool {
            active: p.open.saturating_sub(p.idle),
            idle: p.idle,
            own: p.own,
            pool_size: p.pool_size,
            waiting: p.waiting,
            database: p.key.database,
            user: p.key.user,
        })
        .collect()
}

//! The coordinator: one connection to PostgreSQL per instance that leases seats of the
//! cluster's budget with advisory locks and moves them to where clients wait.
//!
//! Part of the cluster coordination. Every `rebalance_interval` it publishes this instance's
//! demand (its application_name), reads every lease and marker of the cluster in one
//! pg_locks snapshot, computes everyone's max-min fair share the same way everyone else
//! does, and takes free seats (lease lock, then a check that nobody else holds or sits on
//! them) or gives back seats no connection sits on. Losing the connection loses every lease
//! at once (PostgreSQL releases the locks; the instance's leased budget drops to 0); the
//! connections sitting on seats keep them through their own markers. docs/cluster.md.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};
use tokio_util::task::AbortOnDropHandle;

use super::routes::Routes;
use super::{grants, lease, share, Cluster, Peer, View};
use crate::config::{Config, ServerTls};
use crate::server::seat::LEASE_BASE;
use crate::server::ServerStream;
use crate::shutdown::Phase;

/// Time allowed to connect and log in.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between attempts to reconnect the coordination connection.
const RETRY_MAX: Duration = Duration::from_millis(400);

/// Every lease and marker of the cluster, with the application_name of its holder.
const SNAPSHOT_SQL: &str = "SELECT l.objid::int8, l.pid, COALESCE(a.application_name, '') \
     FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted AND l.classid::int8 = $1::int8";
/// What one instance publishes: `pgvalve:<id>:<in use>:<idle>:<waiting>[.<weight>][:<address>]`,
/// the weight being how many identities have clients waiting there (left out when at most 1),
/// the address where its listener takes CancelRequests forwarded by the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Published {
    id: String,
    in_use: usize,
    idle: usize,
    waiting: usize,
    /// Identities with clients waiting (shares are weighted by it, docs/cluster.md).
    weight: usize,
    addr: Option<String>,
}

/// PostgreSQL keeps the first 63 bytes of an application_name.
const MAX_APP_NAME: usize = 63;

impl Published {
    fn parse(app: &str) -> Option<Published> {
        let mut p = app.strip_prefix("pgvalve:")?.splitn(5, ':');
        let id = p.next()?.to_string();
        let mut n = || p.next().and_then(|x| x.parse().ok());
        let (in_use, idle) = (n()?, n()?);
        let field = p.next()?;
        let (waiting, weight) = match field.split_once('.') {
            Some((w, k)) => (w.parse().ok()?, k.parse().ok()?),
            None => (field.parse().ok()?, 1),
        };
        Some(Published {
            id,
            in_use,
            idle,
            waiting,
            weight,
            addr: p.next().map(str::to_string),
        })
    }

    /// The application_name; numbers capped at six digits, the address left out when the
    /// whole would not fit in 63 bytes.
    fn name(&self) -> String {
        let c = |n: usize| n.min(999_999);
        let weight = match self.weight {
            0 | 1 => String::new(),
            k => format!(".{}", k.min(9_999)),
        };
        let name = format!(
            "pgvalve:{}:{}:{}:{}{weight}",
            self.id,
            c(self.in_use),
            c(self.idle),
            c(self.waiting)
        );
        match &self.addr {
            Some(a) if name.len() + 1 + a.len() <= MAX_APP_NAME => format!("{name}:{a}"),
            _ => name,
        }
    }
}

/// One pg_locks snapshot of the cluster.
#[derive(Debug, Default)]
struct Snapshot {
    /// Seat -> backend pid holding its lease.
    leases: BTreeMap<i32, i32>,
    /// Seats some connection sits on.
    marked: BTreeSet<i32>,
    /// (seat, backend pid) of every marker.
    sitters: Vec<(i32, i32)>,
    /// Lease holders' application_name.
    apps: BTreeMap<i32, String>,
    /// (key, backend pid) of every grant and want marker of a per-identity cap.
    grants: Vec<(i64, i32)>,
}

impl Snapshot {
    async fn take(client: &Client, class: i32) -> Result<Snapshot, tokio_postgres::Error> {
        let mut s = Snapshot::default();
        for row in client.query(SNAPSHOT_SQL, &[&i64::from(class)]).await? {
            let (objid, pid, app): (i64, i32, String) = (row.get(0), row.get(1), row.get(2));
            if objid >= grants::GRANT_BASE {
                s.grants.push((objid, pid));
            } else if objid >= LEASE_BASE {
                s.leases
                    .insert(i32::try_from(objid - LEASE_BASE).unwrap_or(i32::MAX), pid);
                s.apps.insert(pid, app);
            } else {
                let seat = i32::try_from(objid).unwrap_or(i32::MAX);
                s.marked.insert(seat);
                s.sitters.push((seat, pid));
            }
        }
        Ok(s)
    }

    /// Seats this instance's connections sit on that nobody leases (after a lost
    /// coordination connection).
    fn unleased(&self, table: &super::table::Table) -> Vec<i32> {
        table
            .unleased_sat()
            .into_iter()
            .filter(|i| !self.leases.contains_key(i))
            .collect()
    }

    /// Seats below `budget` nobody leases or sits on.
    fn free(&self, budget: u32) -> BTreeSet<i32> {
        (0..i32::try_from(budget).unwrap_or(i32::MAX))
            .filter(|i| !self.leases.contains_key(i) && !self.marked.contains(i))
            .collect()
    }

    /// Every coordination connection (lease holder) with the seats it holds.
    fn holders(&self) -> BTreeMap<i32, usize> {
        let mut h = BTreeMap::new();
        for pid in self.leases.values() {
            *h.entry(*pid).or_default() += 1;
        }
        h
    }
}

/// What the coordinator remembers between rounds.
struct Memory {
    pid: i32,
    published: String,
    /// Seats free in the last snapshot (a seat is taken only when free in two in a row).
    free: BTreeSet<i32>,
    /// Coordination connections of the last snapshot, with their instance ids.
    peers: BTreeMap<i32, String>,
    /// No seat is taken before this (after an instance was seen gone).
    quiet_until: Instant,
    /// The address this instance publishes for forwarded CancelRequests.
    addr: Option<String>,
}

/// Runs the coordination for `cl` until the proxy stops, reconnecting when the connection is
/// lost (every lease is lost with it).
pub async fn run(cl: Arc<Cluster>, config: Arc<ArcSwap<Config>>, mut phase: watch::Receiver<Phase>) {
    let mut delay = Duration::from_millis(25);
    let mut was_up = false;
    // The grants of per-identity caps: kept across coordination connections.
    let mut held = grants::Held::default();
    loop {
        let cfg = config.load_full();
        let started = Instant::now();
        let r = session(&cl, &cfg, &mut phase, (&mut was_up, &mut held)).await;
        lose_all(&cl, &mut held);
        match r {
            Ok(()) => return,
            Err(e) => {
                Cluster::count(&cl.counters.errors, 1);
                if std::mem::take(&mut was_up) {
                    tracing::warn!(cluster = %cl.settings.name, error = %e, "cluster: coordination connection lost; every slot this instance leased is given up until it reconnects");
                } else {
                    tracing::debug!(cluster = %cl.settings.name, error = %e, "cluster: cannot join yet");
                }
            }
        }
        if started.elapsed() > Duration::from_secs(5) {
            delay = Duration::from_millis(25);
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return },
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Every lease is gone: no new connection until the next session leases again.
fn lose_all(cl: &Cluster, held: &mut grants::Held) {
    cl.root.resize(0);
    cl.table.lose();
    if let Some(g) = cl.grants() {
        grants::lose(g, held);
    }
    let mut v = cl.view();
    v.connected = false;
    cl.set_view(v);
}

/// One coordination connection's life: Ok when the proxy stops, Err when it is lost.
async fn session(
    cl: &Cluster,
    cfg: &Config,
    phase: &mut watch::Receiver<Phase>,
    (was_up, held): (&mut bool, &mut grants::Held),
) -> Result<(), String> {
    let (client, mut conn, local_ip) = connect(cl, cfg).await?;
    let addr = advertised(cl, local_ip).await;
    let published = Published {
        id: cl.id.clone(),
        addr: addr.clone(),
        ..Published::default()
    }
    .name();
    set_name(&client, &published).await?;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let class = cl.settings.lock_class();
    // The coordination connection's own seat (it counts in the budget).
    let snap = Snapshot::take(&client, class).await.map_err(|e| e.to_string())?;
    let free: Vec<i32> = snap.free(cl.settings.max_server_connections).into_iter().collect();
    if lease::acquire(&client, class, &free, 1).await?.is_empty() {
        return Err("every slot of the cluster is held; retrying".into());
    }
    cl.table.hold(pid);
    *was_up = true;
    tracing::info!(cluster = %cl.settings.name, instance = %cl.id, pid, "cluster: joined");
    let mut mem = Memory {
        pid,
        published,
        free: BTreeSet::new(),
        peers: snap
            .apps
            .iter()
            .filter_map(|(p, a)| Some((*p, Published::parse(a)?.id)))
            .collect(),
        quiet_until: Instant::now() + cl.settings.takeover_delay,
        addr,
    };
    let mut every = tokio::time::interval(cl.settings.rebalance_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => round(cl, &client, &mut mem, held).await?,
            _ = &mut conn => return Err("the coordination connection closed".into()),
            r = phase.changed() => if r.is_err() || *phase.borrow() == Phase::Stopped { return Ok(()) },
        }
    }
}

type Conn = AbortOnDropHandle<Result<(), tokio_postgres::Error>>;

/// Connects the coordination connection (without TLS, like the lock monitor's); with the
/// local address of its socket (the address this host uses toward PostgreSQL).
async fn connect(cl: &Cluster, cfg: &Config) -> Result<(Client, Conn, Option<IpAddr>), String> {
    let s = &cl.settings;
    let user = s
        .user
        .clone()
        .or_else(|| cfg.locks.user.clone())
        .or_else(|| cfg.users.keys().next().cloned())
        .ok_or("no user to log in as")?;
    let db = s
        .database
        .clone()
        .or_else(|| cfg.databases.keys().find(|d| *d != "*").cloned())
        .unwrap_or_else(|| "postgres".into());
    let route = cfg.route(&db, &user).ok_or("the cluster's database is not routed")?;
    let mut pg = tokio_postgres::Config::from_str("postgres://").map_err(|e| e.to_string())?;
    pg.dbname(&route.server_dbname)
        .user(&route.user)
        .application_name(format!("pgvalve:{}:0:0:0", cl.id));
    if let Some(p) = cfg.users.get(&user).and_then(|u| u.server_password.as_ref()) {
        pg.password(&p.0);
    }
    let open = async {
        let (stream, _) = ServerStream::connect(&route.host, route.port, &ServerTls::default())
            .await
            .map_err(|e| e.to_string())?;
        let ip = match &stream {
            ServerStream::Tcp(t) => t.local_addr().ok().map(|a| a.ip()),
            _ => None,
        };
        let (client, conn) = pg.connect_raw(stream, NoTls).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((client, conn, ip))
    };
    let (client, conn, ip) = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| format!("timed out after {CONNECT_TIMEOUT:?}"))??;
    Ok((client, AbortOnDropHandle::new(tokio::spawn(conn)), ip))
}

/// One round: publish, look, move seats.
async fn round(cl: &Cluster, client: &Client, mem: &mut Memory, held: &mut grants::Held) -> Result<(), String> {
    let class = cl.settings.lock_class();
    let budget = cl.settings.max_server_connections;
    let me = Published {
        id: cl.id.clone(),
        in_use: cl.root.usage().used,
        idle: cl.root.idle(),
        waiting: cl.root.waiting(),
        weight: cl.weight().max(1),
        addr: mem.addr.clone(),
    };
    let name = me.name();
    if name != mem.published {
        set_name(client, &name).await?;
        mem.published = name;
    }
    let snap = Snapshot::take(client, class).await.map_err(|e| e.to_string())?;
    watch_peers(cl, &snap, mem);
    lease::adopt(cl, client, snap.unleased(&cl.table)).await?;
    let free = snap.free(budget);
    let takeable: Vec<i32> = if Instant::now() >= mem.quiet_until {
        free.intersection(&mem.free).copied().collect()
    } else {
        Vec::new()
    };
    mem.free = free;
    let peers = peers(&snap, mem.pid, &me);
    cl.set_routes(routes(&peers, &snap));
    let targets = targets(&peers, budget as usize);
    let mine = peers.iter().position(|p| p.me).unwrap_or(0);
    let goal = targets.get(mine).copied().unwrap_or(1).saturating_sub(1);
    let leased = cl.table.leased();
    let moved = if goal > leased {
        let got = lease::acquire(client, class, &takeable, goal - leased).await?;
        for i in &got {
            cl.table.lease(*i);
            cl.root.grow();
        }
        cl.root.ask_back(0);
        Cluster::count(&cl.counters.leased, got.len());
        !got.is_empty()
    } else {
        let short: usize = peers
            .iter()
            .zip(&targets)
            .filter(|(p, _)| !p.me)
            .map(|(p, t)| t.saturating_sub(p.held))
            .sum();
        release(cl, client, leased - goal, short.saturating_sub(takeable.len())).await?
    };
    if moved {
        Cluster::count(&cl.counters.rebalances, 1);
    }
    if let Some(g) = cl.grants() {
        let quiet = Instant::now() < mem.quiet_until;
        grants::round(g, client, (class, mem.pid), &snap.grants, held, quiet).await?;
    }
    cl.set_view(View {
        peers,
        last_round: Some(SystemTime::now()),
        connected: true,
    });
    Ok(())
}

/// Gives back up to `excess` leases no connection sits on; of what is left, asks the pools
/// to close connections as they come back, as many as others are short of (`short`).
async fn release(cl: &Cluster, client: &Client, excess: usize, short: usize) -> Result<bool, String> {
    let mut gone = Vec::new();
    while gone.len() < excess && cl.root.try_shrink() {
        match cl.table.unlease_one() {
            Some(i) => gone.push(i),
            None => break,
        }
    }
    let ask = (excess - gone.len()).min(short);
    cl.root.ask_back(ask);
    // Idle connections go now; busy ones as they come back to their pools.
    let mut closed = 0;
    while closed < ask.min(cl.root.idle()) && cl.root.close_idle() {
        closed += 1;
    }
    if gone.is_empty() {
        return Ok(false);
    }
    lease::unlease(client, cl.settings.lock_class(), &gone).await?;
    Cluster::count(&cl.counters.released, gone.len());
    Ok(true)
}

/// Logs instances joining and leaving; one leaving starts the quiet time (its connections
/// still being opened must be gone before its seats are taken).
fn watch_peers(cl: &Cluster, snap: &Snapshot, mem: &mut Memory) {
    let now: BTreeMap<i32, String> = snap
        .holders()
        .keys()
        .map(|p| {
            let id = snap.apps.get(p).and_then(|a| Published::parse(a)).map(|x| x.id);
            (*p, id.unwrap_or_else(|| "?".into()))
        })
        .collect();
    for (pid, id) in mem.peers.iter().filter(|(p, _)| !now.contains_key(p)) {
        tracing::warn!(cluster = %cl.settings.name, instance = %id, pid, "cluster: instance left or died; its free slots are taken after takeover_delay");
        mem.quiet_until = Instant::now() + cl.settings.takeover_delay;
    }
    for (pid, id) in now.iter().filter(|(p, _)| !mem.peers.contains_key(p) && **p != mem.pid) {
        tracing::warn!(cluster = %cl.settings.name, instance = %id, pid, "cluster: instance joined");
    }
    mem.peers = now;
}

/// Every instance holding seats, this one with its numbers of now.
fn peers(snap: &Snapshot, me_pid: i32, me: &Published) -> Vec<Peer> {
    let mut out: Vec<Peer> = snap
        .holders()
        .into_iter()
        .map(|(pid, held)| {
            let p = if pid == me_pid {
                me.clone()
            } else {
                snap.apps
                    .get(&pid)
                    .and_then(|a| Published::parse(a))
                    .unwrap_or_default()
            };
            Peer {
                id: p.id,
                addr: p.addr,
                pid,
                held,
                in_use: p.in_use,
                idle: p.idle,
                waiting: p.waiting,
                weight: p.weight,
                me: pid == me_pid,
            }
        })
        .collect();
    if !out.iter().any(|p| p.me) {
        out.push(Peer {
            id: me.id.clone(),
            addr: me.addr.clone(),
            pid: me_pid,
            held: 0,
            in_use: me.in_use,
            idle: me.idle,
            waiting: me.waiting,
            weight: me.weight,
            me: true,
        });
    }
    out
}

/// Everyone's target (seats including its coordination connection's): when all of what
/// everyone uses and waits for fits, what it holds if that fits too (nobody is short: seats
/// leased a moment ago stay, so a pool's next connection does not wait two rounds for a seat
/// it just gave back), else what it uses and waits for; when it does not fit, max-min fair
/// shares of what it uses busy and waits for (idle connections are given back first).
fn targets(peers: &[Peer], budget: usize) -> Vec<usize> {
    let all: Vec<usize> = peers.iter().map(|p| 1 + p.in_use + p.waiting).collect();
    if all.iter().sum::<usize>() <= budget {
        let keep: Vec<usize> = peers.iter().zip(&all).map(|(p, d)| p.held.max(*d)).collect();
        return if keep.iter().sum::<usize>() <= budget {
            keep
        } else {
            all
        };
    }
    let busy: Vec<usize> = peers
        .iter()
        .map(|p| 1 + p.in_use.saturating_sub(p.idle) + p.waiting)
        .collect();
    let weights: Vec<usize> = peers.iter().map(|p| p.weight.max(1)).collect();
    share::weighted(&busy, &weights, budget)
}

/// Where the cancel keys of the other instances go, from this round's snapshot.
fn routes(peers: &[Peer], snap: &Snapshot) -> Routes {
    let instances = peers
        .iter()
        .filter(|p| !p.me)
        .filter_map(|p| Some((p.pid, (p.id.clone(), p.addr.as_ref()?.parse().ok()?))))
        .collect();
    Routes::build(&instances, &snap.leases, &snap.sitters)
}

/// Publishes `name` as the coordination connection's application_name.
async fn set_name(client: &Client, name: &str) -> Result<(), String> {
    client
        .batch_execute(&format!("SET application_name = '{name}'"))
        .await
        .map_err(|e| e.to_string())
}

/// The address this instance publishes: `advertise` resolved here; else the listener's
/// address, or for a wildcard listener the local address of the coordination connection
/// (`local_ip`, the address this host uses toward PostgreSQL) with the listener's port.
async fn advertised(cl: &Cluster, local_ip: Option<IpAddr>) -> Option<String> {
    let text = match (&cl.settings.advertise, cl.listen(), local_ip) {
        (Some(a), _, _) => a.clone(),
        (None, Some(l), _) if !l.ip().is_unspecified() => l.to_string(),
        (None, Some(l), Some(ip)) => SocketAddr::new(ip, l.port()).to_string(),
        _ => {
            tracing::info!(cluster = %cl.settings.name, "cluster: no address to publish (set [cluster] advertise): cancel requests sent to other instances cannot reach this one's sessions");
            return None;
        }
    };
    match tokio::net::lookup_host(&text).await.map(|mut a| a.next()) {
        Ok(Some(a)) => Some(a.to_string()),
        Ok(None) | Err(_) => {
            tracing::warn!(cluster = %cl.settings.name, advertise = %text, "cluster: the advertise address does not resolve; cancel requests sent to other instances cannot reach this one's sessions");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_name_carries_the_address_when_it_fits() {
        let mut p = Published {
            id: "0badcafe".into(),
            in_use: 3,
            idle: 1,
            waiting: 2,
            weight: 1,
            addr: Some("10.244.1.7:6432".into()),
        };
        assert_eq!(p.name(), "pgvalve:0badcafe:3:1:2:10.244.1.7:6432");
        assert_eq!(Published::parse(&p.name()), Some(p.clone()));
        // Three identities waiting: the weight rides on the waiting count.
        let w = Published { weight: 3, ..p.clone() };
        assert_eq!(w.name(), "pgvalve:0badcafe:3:1:2.3:10.244.1.7:6432");
        assert_eq!(Published::parse(&w.name()), Some(w));
        assert_eq!(
            Published::parse("pgvalve:0badcafe:3:1:2").map(|x| x.addr),
            Some(None),
            "older format"
        );
        p.addr = Some("[2001:db8:85a3:1234:5678:8a2e:370:7334]:6432".into());
        p.in_use = 5_000_000;
        let name = p.name();
        assert!(name.len() <= MAX_APP_NAME && !name.contains("2001"), "{name}");
        assert_eq!(
            Published::parse(&name).map(|x| (x.in_use, x.addr)),
            Some((999_999, None))
        );
    }
}

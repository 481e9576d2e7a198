//! One budget of server connections across every pgvalve instance of a cluster, coordinated
//! through PostgreSQL itself (issue 23; the protocol, its invariant and its failure cases are
//! in docs/cluster.md).
//!
//! Beside the server side, under the pools: the instance's lease of the cluster is a leased
//! [`Budget`] at the root of the chain pool budget -> server budget -> cluster lease, so every
//! server connection (pools, lock monitor, auth_query) holds one of its slots, and each slot a
//! numbered seat ([`table`]). The coordinator ([`coord`]) keeps one connection to PostgreSQL,
//! leases seats with advisory locks on it, publishes this instance's demand in its
//! application_name, reads everyone's from pg_locks and pg_stat_activity, and moves seats to
//! where clients wait ([`share`]). Slots are taken when connections open and close, never per
//! transaction.

mod coord;
pub mod grants;
mod lease;
pub mod routes;
pub mod share;
mod table;

#[cfg(test)]
#[path = "sim_tests.rs"]
mod sim;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

pub use coord::run;

use crate::config::ClusterSettings;
use crate::server::budget::{Budget, Scale};

/// One instance as the coordinator last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its instance id (random per process start).
    pub id: String,
    /// Where its listener takes forwarded CancelRequests (None: not published).
    pub addr: Option<String>,
    /// Backend pid of its coordination connection.
    pub pid: i32,
    /// Slots it holds: its coordination connection's and its leases.
    pub held: usize,
    /// Server connections it has open.
    pub in_use: usize,
    /// Of those, idle.
    pub idle: usize,
    /// Slots it wants beyond those it uses (connections waiting for one).
    pub waiting: usize,
    /// Identities with clients waiting there (its share's weight; 1 when none or one).
    pub weight: usize,
    /// This instance.
    pub me: bool,
}

/// What `SHOW CLUSTER` and the metrics read.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Every instance seen in the last round.
    pub peers: Vec<Peer>,
    /// When the last round ended.
    pub last_round: Option<SystemTime>,
    /// Whether the coordination connection is up.
    pub connected: bool,
}

/// Counters of the coordination.
#[derive(Debug, Default)]
pub struct Counters {
    /// Slots leased.
    pub leased: AtomicU64,
    /// Slots given back to the cluster.
    pub released: AtomicU64,
    /// Coordination errors (connection lost, queries failed).
    pub errors: AtomicU64,
    /// Rounds that moved at least one slot.
    pub rebalances: AtomicU64,
}

/// This instance's membership of a cluster.
#[derive(Debug)]
pub struct Cluster {
    settings: ClusterSettings,
    id: String,
    table: Arc<table::Table>,
    root: Arc<Budget>,
    view: Mutex<View>,
    /// The listener's address (set once when the proxy binds it).
    listen: OnceLock<SocketAddr>,
    /// Where other instances' cancel keys go (rebuilt every round).
    routes: Mutex<routes::Routes>,
    /// Identities with clients waiting now (see [`Cluster::set_weight`]).
    weight: AtomicUsize,
    /// Admission's per-identity caps, for cluster-wide identity caps (set once by the proxy).
    grants: OnceLock<Arc<dyn grants::IdentityGrants>>,
    /// Counters.
    pub counters: Counters,
}

impl Cluster {
    /// Membership of the cluster `settings` names; nothing is leased until [`run`] connects.
    pub fn new(settings: &ClusterSettings) -> Arc<Cluster> {
        let table = table::Table::new(settings.lock_class());
        let root = Budget::leased(Scale::Cluster, table.clone());
        Arc::new(Cluster {
            settings: settings.clone(),
            id: instance_id(),
            table,
            root,
            view: Mutex::default(),
            listen: OnceLock::new(),
            routes: Mutex::default(),
            weight: AtomicUsize::new(0),
            grants: OnceLock::new(),
            counters: Counters::default(),
        })
    }

    /// The instance's lease: the root budget of every server connection.
    pub fn root(&self) -> &Arc<Budget> {
        &self.root
    }

    /// The settings it started with (a reload does not change them).
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The last round's view.
    pub fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many identities have clients waiting here (the proxy tells it once a second): the
    /// weight of this instance's share when several want more than the budget has.
    pub fn set_weight(&self, identities_waiting: usize) {
        self.weight.store(identities_waiting, Ordering::Relaxed);
    }

    /// Attaches admission, whose identities' cluster-wide caps the coordinator leases.
    pub fn attach_grants(&self, gate: Arc<dyn grants::IdentityGrants>) {
        let _ = self.grants.set(gate);
    }

    fn grants(&self) -> Option<&dyn grants::IdentityGrants> {
        self.grants.get().map(|g| &**g)
    }

    fn weight(&self) -> usize {
        self.weight.load(Ordering::Relaxed)
    }

    fn set_view(&self, v: View) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    /// The listener's bound address (the default address published for forwarded cancels).
    pub fn set_listen(&self, addr: SocketAddr) {
        let _ = self.listen.set(addr);
    }

    fn listen(&self) -> Option<SocketAddr> {
        self.listen.get().copied()
    }

    /// This instance's tag: the high bits of the pids its transaction-mode cancel keys carry.
    pub fn tag(&self) -> u16 {
        routes::tag_of(&self.id).unwrap_or(routes::TAGS.start as u16)
    }

    /// Where a CancelRequest for another instance's session goes: the instances with tag
    /// `tag` (a transaction-mode key) or the one whose connection runs on backend `pid`.
    pub fn cancel_route(&self, tag: Option<u16>, pid: i32) -> Vec<SocketAddr> {
        let r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        match tag {
            Some(t) => r.by_tag(t),
            None => r.by_backend(pid).into_iter().collect(),
        }
    }

    fn set_routes(&self, r: routes::Routes) {
        *self.routes.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    fn count(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Eight hex digits, random per start.
fn instance_id() -> String {
    format!("{:08x}", fastrand::u32(..))
}

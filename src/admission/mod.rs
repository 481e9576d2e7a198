//! Admission: whether a client may connect, and when it gets a server connection.
//!
//! Third step of the flow, in three places:
//! 1. the listener takes a [`ClientPermit`] (proxy-wide `max_client_connections`) for every
//!    accepted socket; without one the session refuses the client right after its startup
//!    packet;
//! 2. after the startup packet and *before* authentication, [`Admission::login`] names the
//!    client's identity ([`identity`]) and applies its client cap and login rate ([`rate`]),
//!    and counts the login for surge detection ([`surge`]); it returns a [`Member`];
//! 3. before every pool checkout, [`Admission::request`] takes a [`ServerGrant`] from the fair
//!    queue ([`queue`]) or queues the client ([`Queued`]), which then waits up to the
//!    identity's `queue_timeout`; an identity holding connections for whole sessions beyond
//!    its share leaves the last ones of a pool to others ([`headroom`]; a pinned
//!    transaction-mode session tells it so through its [`Pinning`]).
//!
//! Logins are decided under admission's lock; grants under the lock of the session's core
//! ([`cores`]: each core's gates have their own fair queue, and what spans cores, the whole
//! pool's view and each identity's caps, is exchanged between them every few milliseconds
//! off the transaction path), so limits hold exactly under several event loops; refusals
//! are [`Refusal`]s (SQLSTATE 53300). [`Admission::tick`] runs once a second
//! for surge detection and cleanup; [`Admission::queue_clock`] runs beside it and tells
//! queued clients when their NOTICE and their timeout are due (one timer for the whole
//! queue, none per wait); [`Admission::reload`] applies new limits to everyone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod cores;
pub mod headroom;
pub mod identity;
pub mod limits;
mod names;
pub mod queue;
pub mod rate;
mod refusal;
mod rejoin;
pub mod surge;
mod tick;
mod wait;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use headroom::{Hold, Pinning};
pub use limits::{AdmissionSettings, Headroom, LimitOverrides, Limits, LockAction};
pub(crate) use refusal::Refusal;
pub(crate) use surge::SurgeEvent;

use cores::Core;
use identity::{ClientFacts, Rule};
use queue::{Due, Request, ShareLimits};
pub use tick::IdentityStatus;
pub use wait::{Acquired, Queued, Waited};

/// Surge episodes kept for SHOW SURGES.
const SURGE_HISTORY: usize = 256;

/// Held by a session for its whole life; returns its proxy-wide slot when dropped.
#[derive(Debug)]
pub struct ClientPermit {
    _permit: OwnedSemaphorePermit,
}

/// Counters of one identity, for SHOW LIMITS and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Logins admitted.
    pub admitted: u64,
    /// Refusals by reason (see [`Refusal::reason`]).
    pub refused: HashMap<&'static str, u64>,
    /// Server grants taken, and how many of them had to wait.
    pub(crate) grants: u64,
    /// Grants that waited in the queue.
    pub queued: u64,
    /// Surge episodes so far.
    pub surges: u64,
}

#[derive(Debug)]
struct Ident {
    limits: Limits,
    /// The template of the rule that named it (None: default identity).
    rule: Option<String>,
    clients: u32,
    bucket: rate::Bucket,
    surge: surge::SurgeTrack,
    counters: Counters,
    last_seen: Instant,
    /// Its clients waiting on every core (for `max_queue` with several cores).
    queue: Arc<AtomicU32>,
}

impl Ident {
    /// The identity as its first client finds it, under `limits` (named by `rule`).
    fn first(limits: Limits, rule: Option<&Rule>, now: Instant) -> Self {
        Ident {
            bucket: rate::Bucket::new(limits.connect_burst, now),
            limits,
            rule: rule.map(|r| r.template().to_string()),
            clients: 0,
            surge: Default::default(),
            counters: Default::default(),
            last_seen: now,
            queue: Arc::default(),
        }
    }
}

#[derive(Debug)]
struct State {
    settings: AdmissionSettings,
    rules: Arc<Vec<Rule>>,
    query_wait_timeout: Duration,
    login_wait: Duration,
    ids: names::NameMap<Ident>,
    surges: VecDeque<SurgeEvent>,
}

#[derive(Debug)]
struct Inner {
    events: crate::observe::Events,
    clients: Arc<Semaphore>,
    max_clients: u32,
    state: Mutex<State>,
    /// Each core's part (one with one core).
    cores: Box<[Arc<Core>]>,
    /// Rung when a client is queued with a due time before the queue clock's next look.
    clock_bell: tokio::sync::Notify,
    /// Rung when a client is queued: the proxy's lease loop, idling while nobody waits,
    /// looks at once.
    queued_bell: tokio::sync::Notify,
}

/// Admission control of one proxy (cheap to clone).
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// What admission needs from the config.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Proxy-wide client cap.
    pub(crate) max_clients: u32,
    /// `[admission]`.
    pub settings: AdmissionSettings,
    /// `[[identity]]` rules.
    pub rules: Vec<Rule>,
    /// Default queue_timeout.
    pub query_wait_timeout: Duration,
    /// Longest a login may be delayed by the rate limit (a part of client_login_timeout).
    pub(crate) login_wait: Duration,
}

impl AdmissionConfig {
    /// The admission part of a config.
    pub(crate) fn from_config(c: &crate::config::Config) -> Self {
        Self {
            max_clients: c.proxy.max_client_connections,
            settings: c.admission.clone(),
            rules: c.identities.clone(),
            query_wait_timeout: c.pool.query_wait_timeout,
            login_wait: c.proxy.client_login_timeout / 2,
        }
    }
}

fn share_limits(l: &Limits) -> ShareLimits {
    ShareLimits {
        max_servers: l.max_servers,
        cluster_max: l.cluster_max_servers,
        min_servers: l.min_servers,
        weight: l.weight,
        max_queue: l.max_queue,
        max_lock_holders: l.max_lock_holders,
        headroom: l.headroom,
        queue_timeout: l.queue_timeout,
    }
}

/// The login rate and burst an identity runs under now, and whether a surge damps them: during
/// a surge `surge_damping` of its connect rate (of `surge_min_rate` when it has none).
fn login_rate(l: &Limits, surging: bool, surge_min_rate: f64) -> (f64, u32, bool) {
    let damped = surging && l.surge_damping > 0.0;
    let (rate, burst) = if damped {
        let base = if l.connect_rate > 0.0 {
            l.connect_rate
        } else {
            surge_min_rate
        };
        let r = base * l.surge_damping;
        (r, (r.ceil() as u32).max(1))
    } else {
        (l.connect_rate, l.connect_burst)
    };
    (rate, burst, damped)
}

impl State {
    /// The identity `facts` fall under, known from now on (its limits resolved at its first
    /// client, and again only on reload), seen `now`, its limits told to every core's
    /// scheduler.
    fn identify(&mut self, facts: &ClientFacts<'_>, now: Instant, cores: &[Arc<Core>]) -> Arc<str> {
        let rules = self.rules.clone();
        let (name, rule) = identity::identify_with_rule(&rules, facts);
        let id: Arc<str> = match self.ids.get_key_value(name.as_str()) {
            Some((k, _)) => k.clone(),
            None => name.into(),
        };
        let (settings, query_wait_timeout) = (&self.settings, self.query_wait_timeout);
        let ident = self.ids.entry(id.clone()).or_insert_with(|| {
            let limits = Limits::resolve(
                settings,
                &rule.map(|r| r.limits.clone()).unwrap_or_default(),
                query_wait_timeout,
            );
            Ident::first(limits, rule, now)
        });
        ident.last_seen = now;
        tell_cores(cores, &id, ident);
        id
    }
}

/// Tells every core's scheduler `ident`'s limits (each core keeps a name of its own).
fn tell_cores(cores: &[Arc<Core>], id: &Arc<str>, ident: &Ident) {
    let limits = share_limits(&ident.limits);
    for c in cores {
        let mut c = c.lock();
        let key = c.sched.share_key(id).unwrap_or_else(|| Arc::from(&**id));
        c.sched.set_limits(&key, limits);
        if cores.len() > 1 {
            c.sched.share_queue(id, &ident.queue);
        }
    }
}

impl Admission {
    /// Admission under `c` for a proxy of one core, reporting queue waits to `events`.
    pub fn new(c: AdmissionConfig, events: crate::observe::Events) -> Self {
        Self::with_cores(c, events, 1)
    }

    /// Admission under `c` with a fair queue per core of `cores` (each pool has one gate per
    /// core, see `pool::shards`).
    pub fn with_cores(c: AdmissionConfig, events: crate::observe::Events, cores: usize) -> Self {
        let cores = cores.max(1);
        Self {
            inner: Arc::new(Inner {
                events,
                clients: Arc::new(Semaphore::new(c.max_clients as usize)),
                max_clients: c.max_clients,
                state: Mutex::new(State {
                    settings: c.settings,
                    rules: Arc::new(c.rules),
                    query_wait_timeout: c.query_wait_timeout,
                    login_wait: c.login_wait,
                    ids: Default::default(),
                    surges: VecDeque::new(),
                }),
                cores: (0..cores).map(|_| Arc::new(Core::new(cores))).collect(),
                clock_bell: tokio::sync::Notify::new(),
                queued_bell: tokio::sync::Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit for a new client, or None when `max_client_connections` are connected.
    pub(crate) fn admit_client(&self) -> Option<ClientPermit> {
        self.inner
            .clients
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| ClientPermit { _permit: p })
    }

    /// Connected clients (proxy-wide).
    pub fn clients(&self) -> usize {
        self.inner.max_clients as usize - self.inner.clients.available_permits()
    }

    /// Names the client's identity and admits it under the identity's client cap and login
    /// rate (waiting for a login token when one is due soon enough).
    ///
    /// # Errors
    /// [`Refusal::ClientCap`] or [`Refusal::ConnectRate`].
    pub async fn login(&self, facts: &ClientFacts<'_>) -> Result<Member, Refusal> {
        let (member, wait) = self.login_now(facts, Instant::now())?;
        if !wait.is_zero() {
            tracing::debug!(identity = %member.identity, ?wait, "login delayed by max_connect_rate");
            tokio::time::sleep(wait).await;
        }
        Ok(member)
    }

    fn login_now(&self, facts: &ClientFacts<'_>, now: Instant) -> Result<(Member, Duration), Refusal> {
        let mut st = self.state();
        let st = &mut *st;
        let id = st.identify(facts, now, &self.inner.cores);
        self.lease_identity(&id);
        let ident = st.ids.get_mut(&id).expect("invariant: identify made the entry");
        ident.surge.login();
        let l = &ident.limits;
        let refuse = |ident: &mut Ident, r: Refusal| {
            *ident.counters.refused.entry(r.reason()).or_default() += 1;
            Err(r)
        };
        if l.max_clients > 0 && ident.clients >= l.max_clients {
            let r = Refusal::ClientCap {
                identity: id.to_string(),
                clients: ident.clients,
                max: l.max_clients,
            };
            return refuse(ident, r);
        }
        let (rate, burst, damped) = login_rate(l, ident.surge.active(), st.settings.surge_min_rate);
        let max_wait = l.queue_timeout.min(st.login_wait);
        let wait = match ident.bucket.take(now, rate, burst, max_wait) {
            Ok(w) => w,
            Err(_) => {
                let r = Refusal::ConnectRate {
                    identity: id.to_string(),
                    rate: (rate * 100.0).round() / 100.0,
                    burst,
                    damped,
                };
                return refuse(ident, r);
            }
        };
        ident.clients += 1;
        ident.counters.admitted += 1;
        Ok((
            Member {
                admission: self.clone(),
                identity: id,
                local: None,
                notice_after: ident.limits.queue_notice_after,
            },
            wait,
        ))
    }

    /// Takes a server grant for `pool` (size `pool_size`) for `member`'s identity, waiting in
    /// the fair queue up to its `queue_timeout` (the queue clock must run). Cancel-safe:
    /// dropping the future leaves the queue (or gives back a grant that arrived meanwhile).
    /// The tests' shorthand for [`Self::request`] and its wait (`Seat::queued` in sessions).
    ///
    /// # Errors
    /// [`Refusal::QueueFull`], [`Refusal::ServerCap`] or [`Refusal::QueueTimeout`].
    #[cfg(test)]
    pub(crate) async fn acquire(
        &self,
        member: &Member,
        pool: &Arc<str>,
        pool_size: u32,
        hold: Hold,
    ) -> Result<ServerGrant, Refusal> {
        match self.request(member, pool, pool_size, hold)? {
            Acquired::Granted(g) => Ok(g),
            Acquired::Queued(mut q) => loop {
                if let Waited::Granted(g, _) = q.next().await? {
                    return Ok(g);
                }
            },
        }
    }

    /// A server grant for `pool` (size `pool_size`) for `member`'s identity, to be held as
    /// `hold` says, without waiting: a grant now, or a place in the fair queue that the caller
    /// waits on ([`Queued::next`]). The tests' way in: a gate of the first core.
    ///
    /// # Errors
    /// [`Refusal::QueueFull`].
    pub fn request<'a>(
        &'a self,
        member: &'a Member,
        pool: &'a Arc<str>,
        pool_size: u32,
        hold: Hold,
    ) -> Result<Acquired<'a>, Refusal> {
        self.request_in(member, (pool, 0), (pool_size, pool_size), hold)
    }

    /// [`Admission::request`] in one core's gate of a pool ([`gate_name`]): the gate and the
    /// core whose scheduler holds it, `capacity` the core's lease of the pool (what the gate
    /// hands out), `pool_size` the pool's (what messages name). Locks that core's state only.
    ///
    /// # Errors
    /// [`Refusal::QueueFull`].
    pub fn request_in<'a>(
        &'a self,
        member: &'a Member,
        (pool, core): (&'a Arc<str>, usize),
        (capacity, pool_size): (u32, u32),
        hold: Hold,
    ) -> Result<Acquired<'a>, Refusal> {
        let core = self.core(core);
        let id = member.name_on(core);
        let mut guard = core.lock();
        let st = &mut *guard;
        // When the client would be due, should it have to wait (worked out only then).
        let mut queued_at = None;
        let sched = &mut st.sched;
        let when = |timeout: Duration| {
            let now = Instant::now();
            let notice = member.notice_after;
            let due = Due {
                notice: (!notice.is_zero() && notice < timeout).then(|| now + notice),
                deadline: now + timeout,
            };
            queued_at = Some((now, timeout, due));
            (now, due)
        };
        match sched.request(pool, capacity, id, hold, when) {
            Request::Granted => {
                st.count_grant(id, false);
                drop(guard);
                Ok(Acquired::Granted(ServerGrant {
                    core: core.clone(),
                    pool: pool.clone(),
                    identity: id.clone(),
                    hold,
                }))
            }
            Request::QueueFull(waiting) => {
                drop(guard);
                Err(self.queue_full(&member.identity, waiting))
            }
            Request::Queued(ticket, rx) => {
                let (now, timeout, due) = queued_at.expect("invariant: a queued request asked when");
                if due.next() < st.clock_at {
                    st.clock_at = due.next();
                    self.inner.clock_bell.notify_one();
                }
                drop(guard);
                self.inner.queued_bell.notify_one();
                Ok(Acquired::Queued(Queued {
                    admission: self,
                    core,
                    pool,
                    identity: id,
                    ticket,
                    rx,
                    pool_size,
                    hold,
                    timeout,
                    since: now,
                    armed: true,
                }))
            }
        }
    }

    /// The refusal of a client whose identity has `max_queue` clients (`waiting`) queued.
    fn queue_full(&self, id: &Arc<str>, waiting: u32) -> Refusal {
        let mut st = self.state();
        let max = st.ids.get(&names::Same(id)).map_or(0, |i| i.limits.max_queue);
        let r = Refusal::QueueFull {
            identity: id.to_string(),
            waiting,
            max,
        };
        count(&mut st, id, |c| *c.refused.entry(r.reason()).or_default() += 1);
        r
    }
}

/// The admission gate of one core's part of a pool labelled `label` (see `pool::shards`):
/// the label itself when the proxy has one core, else the label and `#core`.
pub fn gate_name(label: &str, core: usize, cores: usize) -> String {
    if cores <= 1 {
        label.to_string()
    } else {
        format!("{label}#{core}")
    }
}

/// The core whose scheduler holds `gate` (its `#n`; the first core's for a pool's only gate).
pub fn gate_core(gate: &str) -> usize {
    match gate.rfind('#') {
        Some(i) if gate[..i].ends_with('"') => gate[i + 1..].parse().unwrap_or(0),
        _ => 0,
    }
}

/// A gate's pool as clients are told it: the label without a core's `#n`.
pub fn shown(gate: &str) -> &str {
    match gate.rfind('#') {
        Some(i) if gate[..i].ends_with('"') && gate[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &gate[..i],
        _ => gate,
    }
}

fn count(st: &mut State, id: &Arc<str>, f: impl FnOnce(&mut Counters)) {
    if let Some(i) = st.ids.get_mut(&names::Same(id)) {
        f(&mut i.counters);
    }
}

/// A client admitted under its identity; leaves the identity's client count when dropped.
#[derive(Debug)]
pub struct Member {
    admission: Admission,
    identity: Arc<str>,
    /// The core the session runs on, and the identity's name as that core's scheduler keeps
    /// it (see [`Member::settle`]).
    local: Option<(Arc<Core>, Arc<str>)>,
    notice_after: Duration,
}

impl Member {
    /// The client's identity.
    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    /// The session runs on core `core` from now on: its grants there use that core's name
    /// of its identity (cloning it touches no reference count another core touches).
    pub fn settle(&mut self, core: usize) {
        let c = self.admission.core(core).clone();
        let name = c.lock().local_name(&self.identity);
        self.local = Some((c, name));
    }

    /// The identity's name to use in `core`'s scheduler.
    pub(crate) fn name_on(&self, core: &Arc<Core>) -> &Arc<str> {
        match &self.local {
            Some((c, name)) if Arc::ptr_eq(c, core) => name,
            _ => &self.identity,
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        if let Some(i) = st.ids.get_mut(&self.identity) {
            i.clients = i.clients.saturating_sub(1);
            i.last_seen = Instant::now();
        }
    }
}

/// One server connection's worth of an identity's share in one pool; given back on drop.
#[derive(Debug)]
pub struct ServerGrant {
    core: Arc<Core>,
    pool: Arc<str>,
    identity: Arc<str>,
    hold: Hold,
}

impl Drop for ServerGrant {
    fn drop(&mut self) {
        self.core.lock().sched.release(&self.pool, &self.identity, self.hold);
    }
}

#[cfg(test)]
mod tests;

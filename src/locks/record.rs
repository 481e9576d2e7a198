//! What the lock monitor keeps: the current lock holders and waiters, attributed to pgvalve
//! sessions (or marked external), lock episodes with their history, and the policy actions
//! that are due.
//!
//! Part of the lock monitor; plain data, no I/O: [`Recorder::update`] takes one poll's rows
//! and says which actions to take.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::admission::LockAction;
use crate::error::PgError;
use crate::sessions::SessionInfo;

/// One row of the poll: a lock of a backend, with the backend's activity.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Backend pid.
    pub pid: i32,
    /// Role.
    pub user: String,
    /// application_name PostgreSQL sees.
    pub application_name: String,
    /// Address PostgreSQL sees.
    pub addr: String,
    /// active, idle in transaction, ...
    pub state: String,
    /// Seconds since the transaction began.
    pub(crate) xact_age: Option<f64>,
    /// Current or last query, truncated.
    pub query: String,
    /// relation, tuple, transactionid, ...
    pub locktype: String,
    /// Lock mode.
    pub mode: String,
    /// Held (true) or waited for (false).
    pub(crate) granted: bool,
    /// Relation name when the lock is on one.
    pub relation: Option<String>,
    /// For a waiting lock: the backends it waits for.
    pub(crate) blocked_by: Vec<i32>,
    /// The query's last 1024 characters when it is longer than `query` shows.
    pub(crate) query_tail: String,
    /// The query's sqlcommenter tags.
    pub tags: crate::protocol::sqlcomment::Tags,
}

/// A lock as SHOW LOCKS shows it.
#[derive(Debug, Clone)]
pub struct LockView {
    /// The row.
    pub row: Row,
    /// The pgvalve session the backend serves (None: external).
    pub session: Option<Arc<SessionInfo>>,
    /// Dangerous mode, or blocking others.
    pub dangerous: bool,
    /// Since the monitor first saw it.
    pub held: Duration,
    /// Backends waiting directly on this backend.
    pub blocks: usize,
    /// Backends waiting on it directly or through others.
    pub(crate) blocks_total: usize,
    /// The session's transaction count before the poll (see `SessionInfo::ends`).
    ends: u64,
}

/// One lock episode: a dangerous lock held from first to last sight.
#[derive(Debug, Clone)]
pub struct Episode {
    /// Backend pid.
    pub pid: i32,
    /// Client identity, or "external".
    pub identity: String,
    /// pgvalve session id.
    pub(crate) session_id: Option<u64>,
    /// Client address (the pgvalve client's, or the one PostgreSQL sees).
    pub addr: String,
    /// Relation.
    pub relation: String,
    /// Mode.
    pub mode: String,
    /// First seen.
    pub started: SystemTime,
    since: Instant,
    /// Last seen, once ended.
    pub ended: Option<SystemTime>,
    /// Most backends it blocked at once (transitively).
    pub max_blocked: usize,
    /// released, or what pgvalve did.
    pub ended_by: String,
    warned: bool,
    acted: Option<LockAction>,
    /// The session and its transaction count when the episode began.
    txn: Option<(Arc<SessionInfo>, u64)>,
    /// The holder's statement when first seen with sqlcommenter tags (or else when first seen).
    pub query: String,
    /// That statement's sqlcommenter tags.
    pub tags: crate::protocol::sqlcomment::Tags,
}

impl Episode {
    /// How long it was (or has been) held.
    pub fn held(&self) -> Duration {
        self.since.elapsed()
    }

    /// The episode of `row`'s lock on `relation`, first seen now; `session` (None: an
    /// external backend) was at transaction count `ends`.
    fn begin(row: &Row, session: Option<&Arc<SessionInfo>>, relation: String, ends: u64) -> Self {
        Episode {
            pid: row.pid,
            identity: session.map_or("external".into(), |s| s.client.identity.to_string()),
            session_id: session.map(|s| s.id),
            addr: session.map_or(row.addr.clone(), |s| s.client.addr.to_string()),
            relation,
            mode: row.mode.clone(),
            started: SystemTime::now(),
            since: Instant::now(),
            ended: None,
            max_blocked: 0,
            ended_by: String::new(),
            warned: false,
            acted: None,
            txn: session.map(|s| (s.clone(), ends)),
            query: row.query.clone(),
            tags: row.tags.clone(),
        }
    }

    /// A later poll's `row` of the same lock: its statement's tags, when the first had none.
    fn note_statement(&mut self, row: &Row) {
        if self.tags.is_empty() && !row.tags.is_empty() {
            self.query = row.query.clone();
            self.tags = row.tags.clone();
        }
    }

    /// " from route \"/x\"" when the holder's statement named its route, else nothing.
    fn route_phrase(&self) -> String {
        self.tags
            .route
            .as_ref()
            .map_or_else(String::new, |r| format!(" from route {r:?}"))
    }

    /// Logs "lock held" once, when the lock has been held `warn_after`.
    fn warn_once(&mut self, row: &Row, held: Duration, blocked: usize, warn_after: Duration) {
        if !self.warned && held >= warn_after {
            self.warned = true;
            tracing::warn!(
                identity = %self.identity, session = ?self.session_id, pid = self.pid, client = %self.addr,
                relation = %self.relation, mode = %self.mode, held_seconds = held.as_secs(), blocked,
                state = %row.state, query = %row.query, route = self.tags.route.as_deref().unwrap_or(""),
                controller = self.tags.controller.as_deref().unwrap_or(""), "lock held"
            );
        }
    }
}

/// An action the monitor must take now.
#[derive(Debug)]
pub(crate) enum Act {
    /// pg_cancel_backend(pid); the session is told why instead of PostgreSQL's text.
    Cancel(i32, Arc<SessionInfo>, PgError),
    /// End the session's transaction: the verdict is delivered to the session; the pid is
    /// terminated from the monitor if it still holds the lock at the next poll.
    Terminate(i32, Option<Arc<SessionInfo>>, PgError),
}

/// Monitor settings the recorder needs.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// Dangerous lock modes.
    pub(crate) dangerous_modes: Vec<String>,
    /// WARN after.
    pub(crate) warn_after: Duration,
    /// History bound.
    pub history: usize,
}

/// Current locks, open episodes, history, counters.
#[derive(Debug, Default)]
pub struct Recorder {
    open: HashMap<(i32, String, String), Episode>,
    /// Ended episodes, oldest first.
    pub history: VecDeque<Episode>,
    /// The last poll's locks.
    pub current: Vec<LockView>,
    /// Episodes so far per identity.
    pub(crate) episodes: HashMap<String, u64>,
    /// Policy actions so far per (identity, action).
    pub(crate) actions: HashMap<(String, String), u64>,
    /// Backends ordered ended by pgvalve, terminated from the monitor if still there.
    pending_terminate: HashSet<i32>,
}

/// What tells one lock episode from another: backend, relation (or lock type), mode.
fn episode_key(row: &Row) -> (i32, String, String) {
    let relation = row.relation.clone().unwrap_or_else(|| row.locktype.clone());
    (row.pid, relation, row.mode.clone())
}

/// Backends blocked by each pid: (direct, transitive).
fn blocking(rows: &[Row]) -> HashMap<i32, (usize, usize)> {
    let mut edges: HashMap<i32, HashSet<i32>> = HashMap::new();
    for r in rows.iter().filter(|r| !r.granted) {
        for b in &r.blocked_by {
            edges.entry(*b).or_default().insert(r.pid);
        }
    }
    edges
        .keys()
        .map(|&p| {
            let mut seen = HashSet::new();
            let mut todo = vec![p];
            while let Some(x) = todo.pop() {
                for &y in edges.get(&x).into_iter().flatten() {
                    if y != p && seen.insert(y) {
                        todo.push(y);
                    }
                }
            }
            (p, (edges[&p].len(), seen.len()))
        })
        .collect()
}

impl Recorder {
    /// Takes one poll. `sessions` maps backend pids to pgvalve sessions; `ends_before` has
    /// each session's transaction count from before the poll query ran (rows of a session
    /// whose transaction ended since are dropped: those locks are gone); `policy` gives an
    /// identity's (max_lock_hold, lock_action). Returns the actions due.
    pub(crate) fn update(
        &mut self,
        rows: Vec<Row>,
        sessions: &HashMap<i32, Arc<SessionInfo>>,
        ends_before: &HashMap<u64, u64>,
        rules: &Rules,
        policy: impl Fn(&str) -> Option<(Duration, LockAction)>,
    ) -> Vec<Act> {
        let blocks = blocking(&rows);
        let mut acts = self.terminate_still_holding(&rows);
        let mut seen = HashSet::new();
        self.current.clear();
        for row in rows {
            let (b, bt) = blocks.get(&row.pid).copied().unwrap_or((0, 0));
            let session = sessions.get(&row.pid).cloned();
            let ends = session
                .as_ref()
                .map_or(0, |s| ends_before.get(&s.id).copied().unwrap_or_else(|| s.ends()));
            let dangerous = row.granted && (rules.dangerous_modes.contains(&row.mode) || b > 0);
            if let Some(s) = session.as_ref().filter(|_| row.granted) {
                // Watched between polls; a transaction that ended since the poll read is gone.
                if !s.mark_holding(ends) {
                    continue;
                }
            }
            let mut held = Duration::ZERO;
            if dangerous {
                let key = episode_key(&row);
                let relation = key.1.clone();
                seen.insert(key.clone());
                let ep = self
                    .open
                    .entry(key)
                    .or_insert_with(|| Episode::begin(&row, session.as_ref(), relation, ends));
                ep.max_blocked = ep.max_blocked.max(bt);
                ep.note_statement(&row);
                held = ep.held();
                ep.warn_once(&row, held, bt, rules.warn_after);
                if let Some(s) = &session {
                    acts.extend(enforce(ep, s, &row, held, &policy, &mut self.actions));
                }
            }
            self.current.push(LockView {
                row,
                session,
                dangerous,
                held,
                blocks: b,
                blocks_total: bt,
                ends,
            });
        }
        self.close_unseen(&seen, rules.history);
        for a in &acts {
            if let Act::Terminate(pid, Some(_), _) = a {
                self.pending_terminate.insert(*pid);
            }
        }
        acts
    }

    /// Between polls: drops the locks of sessions whose transaction has ended since the poll
    /// that saw them (the relay saw ReadyForQuery 'I'), ending their episodes now. True when
    /// anything was dropped.
    pub(crate) fn release_ended(&mut self, history: usize) -> bool {
        let before = self.current.len();
        self.current
            .retain(|l| l.session.as_ref().is_none_or(|s| s.ends() == l.ends));
        if self.current.len() == before {
            return false;
        }
        let seen: HashSet<_> = self
            .current
            .iter()
            .filter(|l| l.dangerous)
            .map(|l| episode_key(&l.row))
            .collect();
        self.close_unseen(&seen, history);
        true
    }

    /// Sessions holding a dangerous lock now, per identity (pgvalve sessions only).
    pub(crate) fn holders_per_identity(&self) -> HashMap<String, u32> {
        let mut seen = HashSet::new();
        let mut out: HashMap<String, u32> = HashMap::new();
        for l in self.current.iter().filter(|l| l.dangerous) {
            if let Some(s) = &l.session {
                if seen.insert(s.id) {
                    *out.entry(s.client.identity.to_string()).or_default() += 1;
                }
            }
        }
        out
    }

    /// Backends ordered ended at the last poll that still show in this one's `rows`: they are
    /// terminated from the monitor now.
    fn terminate_still_holding(&mut self, rows: &[Row]) -> Vec<Act> {
        self.pending_terminate
            .drain()
            .filter(|p| rows.iter().any(|r| r.pid == *p))
            .map(|pid| Act::Terminate(pid, None, PgError::fatal("57P01", "")))
            .collect()
    }

    fn close_unseen(&mut self, seen: &HashSet<(i32, String, String)>, bound: usize) {
        let ended: Vec<_> = self.open.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for k in ended {
            let mut ep = self.open.remove(&k).expect("invariant: listed above");
            ep.ended = Some(SystemTime::now());
            ep.ended_by = match (ep.acted, ep.txn.take()) {
                (Some(a), _) => format!("{a} by pgvalve"),
                (None, Some((s, ends))) if s.ends() != ends => "transaction ended".into(),
                _ => "released".into(),
            };
            *self.episodes.entry(ep.identity.clone()).or_default() += 1;
            if ep.warned || ep.acted.is_some() {
                tracing::info!(identity = %ep.identity, pid = ep.pid, relation = %ep.relation, mode = %ep.mode,
                    held_seconds = ep.held().as_secs(), ended_by = %ep.ended_by, "lock released");
            }
            while self.history.len() >= bound.max(1) {
                self.history.pop_front();
            }
            self.history.push_back(ep);
        }
    }
}

/// The identity's `policy` on a pgvalve session's episode, once: when the lock has been held
/// past its max_lock_hold, the action taken (counted in `actions` per identity and action).
fn enforce(
    ep: &mut Episode,
    s: &Arc<SessionInfo>,
    row: &Row,
    held: Duration,
    policy: impl Fn(&str) -> Option<(Duration, LockAction)>,
    actions: &mut HashMap<(String, String), u64>,
) -> Option<Act> {
    if ep.acted.is_some() {
        return None;
    }
    let (limit, action) = policy(&s.client.identity).filter(|(l, _)| !l.is_zero() && held >= *l)?;
    ep.acted = Some(action);
    let due = act(ep, s, row, limit, action, held);
    *actions.entry((ep.identity.clone(), action.to_string())).or_default() += 1;
    due
}

fn act(
    ep: &Episode,
    s: &Arc<SessionInfo>,
    row: &Row,
    limit: Duration,
    action: LockAction,
    held: Duration,
) -> Option<Act> {
    let human = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string();
    tracing::warn!(identity = %ep.identity, session = s.id, pid = ep.pid, relation = %ep.relation, mode = %ep.mode,
        held_seconds = held.as_secs(), %action, state = %row.state, route = ep.tags.route.as_deref().unwrap_or(""),
        controller = ep.tags.controller.as_deref().unwrap_or(""), "max_lock_hold reached");
    let what = format!(
        "client \"{}\"{} held {} on relation \"{}\" for {} (max_lock_hold={}, lock_action={action})",
        ep.identity,
        ep.route_phrase(),
        ep.mode,
        ep.relation,
        human(held),
        human(limit)
    );
    match action {
        LockAction::Warn => None,
        LockAction::Cancel if row.state == "active" => {
            let e = PgError::error("57014", format!("pgvalve: canceling statement: {what}"))
                .with_hint("Keep transactions that take strong locks short; roll back and retry.");
            Some(Act::Cancel(ep.pid, s.clone(), e))
        }
        LockAction::Cancel | LockAction::Terminate => {
            let e = PgError::fatal("57P01", format!("pgvalve: terminating connection: {what}"))
                .with_hint("Keep transactions that take strong locks short; the transaction was rolled back.");
            Some(Act::Terminate(ep.pid, Some(s.clone()), e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: i32, mode: &str, granted: bool, rel: &str, blocked_by: &[i32]) -> Row {
        Row {
            pid,
            state: "idle in transaction".into(),
            locktype: "relation".into(),
            mode: mode.into(),
            granted,
            relation: Some(rel.into()),
            blocked_by: blocked_by.to_vec(),
            ..Default::default()
        }
    }

    fn rules() -> Rules {
        Rules {
            dangerous_modes: vec!["AccessExclusiveLock".into()],
            warn_after: Duration::from_secs(10),
            history: 2,
        }
    }

    #[test]
    fn blocking_counts_are_direct_and_transitive() {
        // 1 blocks 2 and 3; 3 blocks 4.
        let rows = vec![
            row(1, "AccessExclusiveLock", true, "t", &[]),
            row(2, "AccessShareLock", false, "t", &[1]),
            row(3, "RowExclusiveLock", false, "t", &[1]),
            row(4, "AccessShareLock", false, "u", &[3]),
        ];
        let b = blocking(&rows);
        assert_eq!(b[&1], (2, 3));
        assert_eq!(b[&3], (1, 1));
        assert!(!b.contains_key(&2));
    }

    #[test]
    fn episodes_open_close_and_are_bounded() {
        let mut r = Recorder::default();
        let none = HashMap::new();
        let policy = |_: &str| None;
        // A RowExclusiveLock that blocks nobody is shown but is no episode.
        r.update(
            vec![row(7, "RowExclusiveLock", true, "a", &[])],
            &none,
            &HashMap::new(),
            &rules(),
            policy,
        );
        assert_eq!((r.current.len(), r.current[0].dangerous), (1, false));
        for (pid, rel) in [(1, "t"), (2, "u"), (3, "v")] {
            r.update(
                vec![row(pid, "AccessExclusiveLock", true, rel, &[])],
                &none,
                &HashMap::new(),
                &rules(),
                policy,
            );
        }
        r.update(vec![], &none, &HashMap::new(), &rules(), policy);
        let h: Vec<_> = r
            .history
            .iter()
            .map(|e| (e.pid, e.relation.as_str(), e.identity.as_str()))
            .collect();
        assert_eq!(
            h,
            vec![(2, "u", "external"), (3, "v", "external")],
            "bounded to 2, oldest dropped"
        );
        assert_eq!(r.episodes["external"], 3);
        assert!(r.current.is_empty());
    }

    #[test]
    fn the_policy_message_names_the_route_of_the_holders_statement() {
        use crate::sessions::{SessionClient, Sessions};
        let registry = Arc::new(Sessions::default());
        let s = registry.register(SessionClient {
            identity: Arc::from("migr"),
            user: "app".into(),
            database: "app".into(),
            application_name: "migr".into(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            local: None,
        });
        let mut held = row(1, "AccessExclusiveLock", true, "t", &[]);
        held.query = "LOCK TABLE t /*route='%2Fadmin%2Fmigrate'*/".into();
        held.tags = crate::protocol::sqlcomment::Tags::parse(&held.query);
        let by_pid = HashMap::from([(1, s.info.clone())]);
        let mut r = Recorder::default();
        let policy = |_: &str| Some((Duration::from_millis(1), LockAction::Terminate));
        let mut acts = r.update(vec![held.clone()], &by_pid, &registry.ends(), &rules(), policy);
        std::thread::sleep(Duration::from_millis(5));
        acts.extend(r.update(vec![held], &by_pid, &registry.ends(), &rules(), policy));
        let Some(Act::Terminate(1, Some(_), e)) = acts.into_iter().next() else {
            panic!("terminate due")
        };
        assert!(
            e.message
                .contains("client \"migr\" from route \"/admin/migrate\" held AccessExclusiveLock"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_transaction_end_seen_by_the_relay_releases_at_once() {
        use crate::sessions::{SessionClient, Sessions};
        let registry = Arc::new(Sessions::default());
        let s = registry.register(SessionClient {
            identity: Arc::from("web"),
            user: "app".into(),
            database: "app".into(),
            application_name: "web".into(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            local: None,
        });
        let by_pid = HashMap::from([(1, s.info.clone())]);
        let before = registry.ends();
        let lock = || vec![row(1, "AccessExclusiveLock", true, "t", &[])];
        let mut r = Recorder::default();
        r.update(lock(), &by_pid, &before, &rules(), |_| None);
        assert_eq!(r.holders_per_identity()["web"], 1);
        assert!(!r.release_ended(10), "nothing ended yet");
        s.info.transactions_ended(1);
        assert!(r.release_ended(10));
        assert!(r.holders_per_identity().is_empty() && r.current.is_empty());
        assert_eq!(r.history.back().map(|e| e.ended_by.as_str()), Some("transaction ended"));
        // A poll that read the lock before the transaction ended does not bring it back.
        r.update(lock(), &by_pid, &before, &rules(), |_| None);
        assert!(r.current.is_empty() && r.holders_per_identity().is_empty());
    }
}

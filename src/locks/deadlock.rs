//! Deadlock episodes, both sides: what SHOW DEADLOCKS shows and `pgvalve_deadlocks_total`
//! counts.
//!
//! Part of the lock monitor, off the relay's path. The relay reports a 40P01 to the session
//! registry with the sessions using the cycle's backends at that moment
//! ([`DeadlockReport`]); the monitor's task takes the reports here, finds each other side's
//! statement in its last poll or with one look-up in pg_stat_activity, records the episode
//! (bounded by `[locks] history`), logs it (WARN) and counts it for every identity in the
//! cycle. A DETAIL of an unexpected shape still makes an episode, of the losing side alone.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use crate::protocol::sqlcomment::Tags;
use crate::sessions::DeadlockReport;

/// What is known of a backend from PostgreSQL (a poll row or the look-up).
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// application_name PostgreSQL sees.
    pub(crate) application_name: String,
    /// Address PostgreSQL sees.
    pub(crate) addr: String,
    /// Its current or last statement (bounded).
    pub(crate) query: String,
}

/// The one-off look-up of the backends a poll did not show: by pid, statement bounded like
/// the relay's (head and tail, where sqlcommenter puts its comment).
pub(crate) const LOOKUP_SQL: &str = "
SELECT pid, coalesce(application_name, ''),
       coalesce(host(client_addr) || ':' || client_port, 'local'),
       CASE WHEN length(query) <= 1024 THEN coalesce(query, '')
            ELSE left(query, 512) || ' ... ' || right(query, 512) END
FROM pg_stat_activity WHERE pid = ANY($1)";

/// One backend of a deadlock's cycle.
#[derive(Debug, Clone)]
pub struct Party {
    /// Backend pid.
    pub pid: i32,
    /// The pgvalve session that used it then (None: external).
    pub session_id: Option<u64>,
    /// Client identity, or "external".
    pub identity: String,
    /// application_name (the pgvalve client's, or the one PostgreSQL saw).
    pub application_name: String,
    /// Client address (the pgvalve client's, or the one PostgreSQL saw).
    pub addr: String,
    /// The lock it waited for ("ShareLock on transaction 456"; empty when not named).
    pub waited_for: String,
    /// The backend it waited on.
    pub blocked_by: Option<i32>,
    /// Its statement, where known (bounded).
    pub statement: String,
    /// The statement's sqlcommenter tags.
    pub tags: Tags,
    /// PostgreSQL chose it to fail (it got the 40P01).
    pub loser: bool,
}

/// One deadlock.
#[derive(Debug, Clone)]
pub struct Episode {
    /// When the relay saw the error.
    pub at: SystemTime,
    /// The backends of the cycle, the losing one first.
    pub parties: Vec<Party>,
    /// The DETAIL named the cycle (false: an unexpected shape; only the loser is known).
    pub cycle_known: bool,
}

/// Deadlocks so far.
#[derive(Debug, Default)]
pub struct Deadlocks {
    /// Recent episodes, oldest first.
    pub history: VecDeque<Episode>,
    /// Deadlocks so far per identity in the cycle.
    pub counts: HashMap<String, u64>,
}

impl Deadlocks {
    /// Records `e` (keeping at most `bound`), counts it once for every identity in it and
    /// logs it.
    pub(crate) fn record(&mut self, e: Episode, bound: usize) {
        let mut ids: Vec<&str> = e.parties.iter().map(|p| p.identity.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in &ids {
            *self.counts.entry((*id).to_string()).or_default() += 1;
        }
        let sides: Vec<String> = e
            .parties
            .iter()
            .map(|p| {
                format!(
                    "pid {} identity={:?} application_name={:?} client={} route={:?} waits for {:?} statement={:?}{}",
                    p.pid,
                    p.identity,
                    p.application_name,
                    p.addr,
                    p.tags.route.as_deref().unwrap_or(""),
                    p.waited_for,
                    p.statement,
                    if p.loser { " (rolled back)" } else { "" }
                )
            })
            .collect();
        tracing::warn!(identities = ?ids, cycle = %sides.join("; "), "deadlock");
        while self.history.len() >= bound.max(1) {
            self.history.pop_front();
        }
        self.history.push_back(e);
    }
}

/// The episode of `r`: every backend of the cycle with its session (or as PostgreSQL saw it
/// in `seen`) and statement (the loser's from the relay, the others' from `seen`).
pub(crate) fn episode(r: &DeadlockReport, seen: &HashMap<i32, Seen>) -> Episode {
    let parties = r
        .parties
        .iter()
        .map(|(pid, session)| {
            let pg = seen.get(pid).cloned().unwrap_or_default();
            let loser = *pid == r.loser_pid;
            let wait = r.waits.iter().find(|w| w.pid == *pid);
            let statement = if loser && !r.statement.is_empty() {
                r.statement.clone()
            } else {
                pg.query.clone()
            };
            Party {
                pid: *pid,
                session_id: session.as_ref().map(|s| s.id),
                identity: session
                    .as_ref()
                    .map_or("external".into(), |s| s.client.identity.to_string()),
                application_name: session
                    .as_ref()
                    .map_or(pg.application_name, |s| s.client.application_name.clone()),
                addr: session.as_ref().map_or(pg.addr, |s| s.client.addr.to_string()),
                waited_for: wait.map(|w| w.lock.clone()).unwrap_or_default(),
                blocked_by: wait.map(|w| w.blocked_by),
                tags: Tags::parse(&statement),
                statement,
                loser,
            }
        })
        .collect();
    Episode {
        at: r.at,
        parties,
        cycle_known: !r.waits.is_empty(),
    }
}

/// The pids of `reports` that `seen` lacks a statement for (to look up).
pub(crate) fn missing(reports: &[DeadlockReport], seen: &HashMap<i32, Seen>) -> Vec<i32> {
    let mut out: Vec<i32> = reports
        .iter()
        .flat_map(|r| r.parties.iter().map(|(p, _)| *p))
        .filter(|p| seen.get(p).is_none_or(|s| s.query.is_empty()))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::deadlock::parse_detail;
    use crate::sessions::{SessionClient, Sessions};
    use std::sync::Arc;

    #[test]
    fn both_sides_are_named_and_counted() {
        let registry = Arc::new(Sessions::default());
        let client = |identity: &str| SessionClient {
            identity: Arc::from(identity),
            user: "app".into(),
            database: "app".into(),
            application_name: identity.into(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            local: None,
        };
        let (a, b) = (registry.register(client("web")), registry.register(client("worker")));
        let r = DeadlockReport {
            at: SystemTime::now(),
            loser_pid: 10,
            loser: Some(a.info.clone()),
            statement: "UPDATE t SET n = 1 WHERE id = 2 /*route='%2Fpay'*/".into(),
            waits: parse_detail(
                "Process 10 waits for ShareLock on transaction 5; blocked by process 11.\nProcess 11 waits for ShareLock on transaction 6; blocked by process 10.",
            ),
            parties: vec![(10, Some(a.info.clone())), (11, Some(b.info.clone()))],
        };
        let seen = HashMap::from([(
            11,
            Seen {
                query: "UPDATE t SET n = 1 WHERE id = 1".into(),
                ..Default::default()
            },
        )]);
        assert!(missing(std::slice::from_ref(&r), &seen) == vec![10]);
        let e = episode(&r, &seen);
        assert!(e.cycle_known);
        assert_eq!(e.parties[0].tags.route.as_deref(), Some("/pay"));
        assert_eq!(e.parties[1].statement, "UPDATE t SET n = 1 WHERE id = 1");
        assert_eq!(e.parties[1].waited_for, "ShareLock on transaction 6");
        let mut d = Deadlocks::default();
        d.record(e.clone(), 1);
        d.record(e, 1);
        assert_eq!((d.counts["web"], d.counts["worker"], d.history.len()), (2, 2, 1));
    }
}

//! Long transactions: those open longer than `[locks] long_transaction_after`, attributed to
//! the pgvalve session (identity, route) that keeps them open, before any timeout fires.
//!
//! Part of the lock monitor: each poll also reads pg_stat_activity for transactions older
//! than the setting ([`LONG_SQL`]); [`LongTransactions::update`] keeps those open now and the
//! recently ended ones (SHOW LONG_TRANSACTIONS, bounded by `[locks] history`), and counts
//! each once per identity (`pgvalve_long_transactions_total`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::protocol::sqlcomment::Tags;
use crate::sessions::SessionInfo;

/// Transactions of the database older than `$1` seconds (the monitor's own aside).
pub(crate) const LONG_SQL: &str = "
SELECT pid, coalesce(state, ''), extract(epoch FROM now() - xact_start)::float8,
       extract(epoch FROM xact_start)::float8, left(coalesce(query, ''), 200),
       CASE WHEN length(query) > 200 THEN right(query, 1024) ELSE '' END,
       coalesce(application_name, ''), coalesce(host(client_addr) || ':' || client_port, 'local')
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND xact_start < now() - make_interval(secs => $1)";

/// One row of [`LONG_SQL`].
#[derive(Debug, Clone, Default)]
pub(crate) struct LongRow {
    pub(crate) pid: i32,
    pub(crate) state: String,
    pub(crate) age: f64,
    /// When it began (unix seconds): with the pid, what tells one transaction from another.
    pub(crate) began: f64,
    pub(crate) query: String,
    pub(crate) query_tail: String,
    pub(crate) application_name: String,
    pub(crate) addr: String,
}

impl LongRow {
    /// Reads a row of [`LONG_SQL`].
    pub(crate) fn from_row(r: &tokio_postgres::Row) -> Self {
        LongRow {
            pid: r.get(0),
            state: r.get(1),
            age: r.get::<_, Option<f64>>(2).unwrap_or_default(),
            began: r.get::<_, Option<f64>>(3).unwrap_or_default(),
            query: r.get(4),
            query_tail: r.get(5),
            application_name: r.get(6),
            addr: r.get(7),
        }
    }
}

/// The transactions older than `after` in the database of `client` (none when the query
/// fails: the lock poll reports such failures).
pub(crate) async fn poll(client: &tokio_postgres::Client, after: Duration) -> Vec<LongRow> {
    match client.query(LONG_SQL, &[&after.as_secs_f64()]).await {
        Ok(rows) => rows.iter().map(LongRow::from_row).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "long transaction poll failed");
            Vec::new()
        }
    }
}

/// One long transaction.
#[derive(Debug, Clone)]
pub struct LongTxn {
    /// Backend pid.
    pub pid: i32,
    /// The pgvalve session keeping it open (None: external).
    pub session_id: Option<u64>,
    /// Client identity, or "external".
    pub identity: String,
    /// application_name (the pgvalve client's, or the one PostgreSQL sees).
    pub application_name: String,
    /// Client address.
    pub addr: String,
    /// When it began.
    pub began: SystemTime,
    /// How long it had been open at the last poll that saw it.
    pub open_for: Duration,
    /// active, idle in transaction, ...
    pub state: String,
    /// Its last statement (bounded).
    pub query: String,
    /// The last statement's sqlcommenter tags.
    pub tags: Tags,
    /// When a poll first no longer saw it.
    pub ended: Option<SystemTime>,
    key: (i32, u64),
}

/// Long transactions open now and recently ended, with counts.
#[derive(Debug, Default)]
pub struct LongTransactions {
    /// Open now.
    pub open: Vec<LongTxn>,
    /// Ended, oldest first.
    pub history: VecDeque<LongTxn>,
    /// Long transactions so far per identity.
    pub counts: HashMap<String, u64>,
}

impl LongTransactions {
    /// Takes one poll's `rows` (`sessions`: backends to sessions now); keeps at most `bound`
    /// ended ones.
    pub(crate) fn update(&mut self, rows: Vec<LongRow>, sessions: &HashMap<i32, Arc<SessionInfo>>, bound: usize) {
        let mut open = Vec::with_capacity(rows.len());
        for r in rows {
            let key = (r.pid, r.began.to_bits());
            let session = sessions.get(&r.pid);
            let tail = if r.query_tail.is_empty() {
                r.query.clone()
            } else {
                format!("{} ... {}", r.query, r.query_tail)
            };
            let tags = Tags::parse(&tail);
            let began = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(r.began.max(0.0));
            let t = LongTxn {
                pid: r.pid,
                session_id: session.map(|s| s.id),
                identity: session.map_or("external".into(), |s| s.client.identity.to_string()),
                application_name: session.map_or(r.application_name, |s| s.client.application_name.clone()),
                addr: session.map_or(r.addr, |s| s.client.addr.to_string()),
                began,
                open_for: Duration::from_secs_f64(r.age.max(0.0)),
                state: r.state,
                query: r.query,
                tags,
                ended: None,
                key,
            };
            if !self.open.iter().any(|o| o.key == key) {
                *self.counts.entry(t.identity.clone()).or_default() += 1;
                tracing::warn!(identity = %t.identity, session = ?t.session_id, pid = t.pid, client = %t.addr,
                    open_seconds = t.open_for.as_secs(), state = %t.state, route = t.tags.route.as_deref().unwrap_or(""),
                    query = %t.query, "long transaction");
            }
            open.push(t);
        }
        let now = SystemTime::now();
        for mut gone in std::mem::replace(&mut self.open, open) {
            if !self.open.iter().any(|o| o.key == gone.key) {
                gone.ended = Some(now);
                while self.history.len() >= bound.max(1) {
                    self.history.pop_front();
                }
                self.history.push_back(gone);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_counted_once_and_ends_when_no_longer_seen() {
        let row = |pid, began| LongRow {
            pid,
            began,
            age: 31.0,
            state: "idle in transaction".into(),
            query: "SELECT 1 /*route='%2Fslow'*/".into(),
            ..Default::default()
        };
        let mut l = LongTransactions::default();
        let none = HashMap::new();
        l.update(vec![row(1, 100.0)], &none, 10);
        l.update(vec![row(1, 100.0)], &none, 10);
        assert_eq!((l.open.len(), l.counts["external"]), (1, 1));
        assert_eq!(l.open[0].tags.route.as_deref(), Some("/slow"));
        // The same backend, a new transaction: the first ended.
        l.update(vec![row(1, 200.0)], &none, 10);
        assert_eq!((l.open.len(), l.history.len(), l.counts["external"]), (1, 1, 2));
        l.update(vec![], &none, 10);
        assert!(l.open.is_empty() && l.history.len() == 2);
    }
}

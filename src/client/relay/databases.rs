//! The relay's part in statements that need a database to themselves (`DROP DATABASE x`,
//! `ALTER DATABASE x RENAME`, `CREATE DATABASE ... TEMPLATE x`; see
//! `client::database_sql`): the tracker finds them in whole Query messages, and in Binds of
//! statements whose Parse was one (named or not: a client may prepare first and execute
//! later). Before such a message goes to the server a hold is raised on x through the
//! session's server gate (pgvalve's own idle connections to x close, new ones wait; see
//! [`crate::dbgate`]). A hold is dropped when the ReadyForQuery that answers its statement
//! comes back, when nothing is outstanding any more, or when the relay ends.

use crate::client::database_sql::{database_needed, might_need_database, DatabaseNeed};
use crate::dbgate::{Hold, ServerGate};
use crate::protocol::tags::{frontend, read_cstr, split_cstr};

use super::tracker::Tracker;

/// Most prepared statements remembered per session as needing a database (the oldest is
/// forgotten beyond).
const MAX_PREPARED: usize = 32;

/// The database a whole Query or Parse message (`msg`, with its header) needs to itself.
#[inline]
pub(super) fn need(tag: u8, msg: &[u8]) -> Option<DatabaseNeed> {
    let body = msg.get(5..)?;
    let sql = match tag {
        frontend::QUERY => body,
        frontend::PARSE => split_cstr(body)?.1,
        _ => return None,
    };
    if !might_need_database(sql) {
        return None;
    }
    database_needed(&read_cstr(sql)?.0)
}

/// A session's prepared statements (by the client's name) that need a database to
/// themselves. Nearly always empty.
#[derive(Debug, Default)]
pub(crate) struct Prepared(Vec<(Box<[u8]>, DatabaseNeed)>);

impl Prepared {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Notes what a whole client message means for holds: a Query that needs a database (its
/// hold is due now), a Parse that prepares one or replaces one, a Bind of one (its hold is
/// due now). Holds end with the ReadyForQuery after this Query, or after the next Sync.
#[inline]
pub(super) fn note(t: &mut Tracker, tag: u8, msg: &[u8]) {
    let due = t.answered + u64::from(t.pending) + 1;
    match tag {
        frontend::QUERY => {
            if let Some(n) = need(tag, msg) {
                t.needs.push((due, n));
            }
        }
        frontend::PARSE => {
            let n = need(tag, msg);
            if n.is_none() && t.prepared.is_empty() {
                return;
            }
            let Some((name, _)) = msg.get(5..).and_then(split_cstr) else {
                return;
            };
            let list = &mut t.prepared.0;
            list.retain(|(s, _)| **s != *name);
            if let Some(n) = n {
                if list.len() >= MAX_PREPARED {
                    list.remove(0);
                }
                list.push((name.into(), n));
            }
        }
        frontend::BIND if !t.prepared.is_empty() => {
            let statement = msg
                .get(5..)
                .and_then(split_cstr)
                .and_then(|(_portal, rest)| split_cstr(rest));
            let Some((statement, _)) = statement else {
                return;
            };
            if let Some((_, n)) = t.prepared.0.iter().find(|(s, _)| **s == *statement) {
                let n = n.clone();
                t.needs.push((due, n));
            }
        }
        _ => {}
    }
}

/// The holds a relay has raised, each with the count of ReadyForQuery after which its
/// statement is done.
pub(super) struct Databases<'m> {
    /// The gate of the session's server (None: no gates, as in the fuzz harness).
    gate: Option<&'m ServerGate>,
    holds: Vec<(u64, Hold)>,
    /// Where the session keeps its prepared statements that need a database, between relays.
    keep: &'m mut Prepared,
}

impl<'m> Databases<'m> {
    /// The relay's part, with the session's `gate` and `prepared` statements (moved into the
    /// tracker `t` while the relay runs).
    pub(super) fn new(gate: Option<&'m ServerGate>, prepared: &'m mut Prepared, t: &mut Tracker) -> Self {
        t.prepared = std::mem::take(prepared);
        Databases {
            gate,
            holds: Vec::new(),
            keep: prepared,
        }
    }

    /// Raises a hold for every statement the tracker found (before they are forwarded).
    #[cold]
    pub(super) fn raise(&mut self, t: &mut Tracker) {
        for (due, n) in t.needs.drain(..) {
            if let Some(g) = self.gate {
                self.holds.push((due, g.hold(&n.dbname, n.statement)));
            }
        }
    }

    /// Drops the holds whose statements have been answered (or all, once nothing is
    /// outstanding: neither a request nor extended-protocol messages before their Sync).
    #[inline]
    pub(super) fn answered(&mut self, t: &Tracker) {
        if !self.holds.is_empty() {
            let outstanding = t.pending > 0 || t.unsynced;
            self.holds.retain(|(due, _)| outstanding && *due > t.answered);
        }
    }

    /// The relay ends: the prepared statements go back to the session (the holds are dropped
    /// with the relay).
    pub(super) fn finish(&mut self, t: &mut Tracker) {
        *self.keep = std::mem::take(&mut t.prepared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbgate::DbGates;
    use crate::protocol::frame::{MessageWalker, Seen};
    use crate::protocol::tags::{backend, status};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn query_and_parse_name_the_database() {
        let q = msg(frontend::QUERY, b"DROP DATABASE \"test_app\"\0");
        assert_eq!(need(frontend::QUERY, &q).map(|n| n.dbname).as_deref(), Some("test_app"));
        let p = msg(frontend::PARSE, b"s1\0create database c template t\0\0\0");
        assert_eq!(need(frontend::PARSE, &p).map(|n| n.dbname).as_deref(), Some("t"));
        let s = msg(frontend::QUERY, b"SELECT 1\0");
        assert_eq!(need(frontend::QUERY, &s), None);
        assert_eq!(need(frontend::PARSE, &msg(frontend::PARSE, b"no nul")), None);
    }

    /// The hold is up from before the statement is forwarded until its own ReadyForQuery,
    /// also behind earlier requests of a pipeline.
    #[test]
    fn a_hold_lasts_until_its_statement_is_answered() {
        let gates = DbGates::default();
        let gate = gates.server("h", 1);
        let mut t = Tracker::new(status::IDLE, false, None, true);
        let mut kept = Prepared::default();
        let mut dbs = Databases::new(Some(&gate), &mut kept, &mut t);
        let mut walk = MessageWalker::new(1 << 16);
        let pipeline = [
            msg(frontend::QUERY, b"SELECT 1\0"),
            msg(frontend::PARSE, b"\0DROP DATABASE x\0\0\0"),
            msg(frontend::BIND, b"\0\0\0\0\0\0\0"),
            msg(frontend::EXECUTE, b"\0\0\0\0\0"),
            msg(frontend::SYNC, b""),
        ]
        .concat();
        assert_eq!(t.scan_client(&mut walk, &pipeline), Ok(pipeline.len()));
        assert_eq!(t.needs.len(), 1);
        dbs.raise(&mut t);
        assert!(t.needs.is_empty());
        assert!(gates.is_held("h", 1, "x"));
        let rfq = msg(backend::READY_FOR_QUERY, b"I");
        let seen = Seen {
            tag: backend::READY_FOR_QUERY,
            start: 0,
            len: rfq.len(),
            complete: true,
        };
        t.on_server(&seen, &rfq);
        dbs.answered(&t);
        assert!(gates.is_held("h", 1, "x"), "the SELECT's answer does not end the hold");
        t.on_server(&seen, &rfq);
        dbs.answered(&t);
        assert!(!gates.is_held("h", 1, "x"), "the DROP's answer does");
        drop(dbs);
        // Without a gate (fuzz harness) nothing is held, and nothing piles up.
        let mut kept = Prepared::default();
        let mut none = Databases::new(None, &mut kept, &mut t);
        t.needs.push((
            9,
            need(frontend::QUERY, &msg(frontend::QUERY, b"DROP DATABASE y\0")).unwrap(),
        ));
        none.raise(&mut t);
        assert!(t.needs.is_empty() && none.holds.is_empty());
    }

    fn ready(t: &mut Tracker) {
        let rfq = msg(backend::READY_FOR_QUERY, b"I");
        let seen = Seen {
            tag: backend::READY_FOR_QUERY,
            start: 0,
            len: rfq.len(),
            complete: true,
        };
        t.on_server(&seen, &rfq);
    }

    /// A client that prepares first and executes later (tokio-postgres, in two round trips
    /// and, in transaction mode, two relays): the hold is raised at the Bind, for that
    /// statement; a Parse that reuses the name for other SQL forgets it.
    #[test]
    fn a_prepared_statement_is_held_when_it_is_bound() {
        let gates = DbGates::default();
        let gate = gates.server("h", 1);
        let mut kept = Prepared::default();
        let prepare = [
            msg(frontend::PARSE, b"s0\0drop database \"x\"\0\0\0"),
            msg(frontend::DESCRIBE, b"Ss0\0"),
            msg(frontend::SYNC, b""),
        ]
        .concat();
        let execute = [
            msg(frontend::BIND, b"\0s0\0\0\0\0\0\0\0"),
            msg(frontend::EXECUTE, b"\0\0\0\0\0"),
            msg(frontend::SYNC, b""),
        ]
        .concat();
        // First relay: the Parse is remembered, nothing is held past it.
        let mut t = Tracker::new(status::IDLE, false, None, true);
        let mut dbs = Databases::new(Some(&gate), &mut kept, &mut t);
        let mut walk = MessageWalker::new(1 << 16);
        assert_eq!(t.scan_client(&mut walk, &prepare), Ok(prepare.len()));
        assert!(t.needs.is_empty(), "preparing is not running it");
        ready(&mut t);
        dbs.finish(&mut t);
        drop(dbs);
        assert!(!kept.is_empty());
        // Second relay: the Bind raises the hold until its Sync is answered.
        let mut t = Tracker::new(status::IDLE, false, None, true);
        let mut dbs = Databases::new(Some(&gate), &mut kept, &mut t);
        assert_eq!(t.scan_client(&mut walk, &execute), Ok(execute.len()));
        dbs.raise(&mut t);
        assert!(gates.is_held("h", 1, "x"));
        ready(&mut t);
        dbs.answered(&t);
        assert!(!gates.is_held("h", 1, "x"));
        // The name is reused for other SQL: a Bind of it holds nothing.
        let reparse = msg(frontend::PARSE, b"s0\0SELECT 1\0\0\0");
        assert_eq!(t.scan_client(&mut walk, &reparse), Ok(reparse.len()));
        assert!(t.prepared.is_empty());
        assert_eq!(t.scan_client(&mut walk, &execute), Ok(execute.len()));
        assert!(t.needs.is_empty());
    }
}

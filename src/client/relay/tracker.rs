//! What the relay knows of a server connection from message headers alone: requests
//! outstanding, the last ReadyForQuery status, pins, statements that need a database to
//! themselves, and the session's traffic tally (transactions, queries, bytes, times) for
//! SHOW STATS.

use std::time::Instant;

use super::databases::{self, Prepared};
use super::txn::{note_reported, pin_reason};
use crate::client::database_sql::DatabaseNeed;
use crate::pool::stats::Totals;
use crate::protocol::frame::{FrameError, MessageWalker, Seen, Walk};
use crate::protocol::tags::{backend, frontend, status};

/// What the session knows of the server connection's state, from headers alone.
#[derive(Debug)]
pub(super) struct Tracker {
    /// Queries, Syncs and FunctionCalls sent and not yet answered by ReadyForQuery.
    pub(super) pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub(super) unsynced: bool,
    /// Last ReadyForQuery status.
    pub(super) status: u8,
    /// The client sent Terminate.
    pub(super) terminate: bool,
    /// Type of the last message from the server.
    pub(super) last_server_tag: u8,
    /// Transaction mode and not (yet) pinned: Query and Parse are inspected.
    pub(super) inspect: bool,
    /// Why the session got pinned.
    pub(super) pin: Option<&'static str>,
    /// Named Parse pins (statements are not tracked).
    pub(super) named_pins: bool,
    /// ReadyForQuery 'I' seen since the session was last told.
    pub(super) ends: u64,
    /// Traffic since the last fold into `Mode::stats`.
    pub(super) tally: Totals,
    /// When the outstanding requests began (none outstanding: None).
    pub(super) busy_since: Option<Instant>,
    /// When the current transaction's first request was sent.
    pub(super) xact_since: Option<Instant>,
    /// Inside COPY IN or COPY BOTH (the server waits for the client's data).
    pub(super) copy: bool,
    /// When the last answer to all outstanding requests came (the clock the stats use).
    pub(super) answered_at: Option<Instant>,
    /// ReadyForQuery messages seen.
    pub(super) answered: u64,
    /// Statements that need a database to themselves, found in the client's messages and not
    /// yet taken by the relay (which raises their holds before forwarding them), each with
    /// the `answered` count at which it is done.
    pub(super) needs: Vec<(u64, DatabaseNeed)>,
    /// The client's prepared statements that need a database to themselves (kept in the
    /// session's `Mode` between relays): a Bind of one is such a statement.
    pub(super) prepared: Prepared,
}

impl Tracker {
    /// A tracker for a server connection last seen in `status`.
    pub(super) fn new(status: u8, inspect: bool, pin: Option<&'static str>, named_pins: bool) -> Self {
        Tracker {
            pending: 0,
            unsynced: false,
            status,
            terminate: false,
            last_server_tag: 0,
            inspect,
            pin,
            named_pins,
            ends: 0,
            tally: Totals::default(),
            busy_since: None,
            xact_since: None,
            copy: false,
            answered_at: None,
            answered: 0,
            needs: Vec::new(),
            prepared: Prepared::default(),
        }
    }

    /// Walks the client's bytes in `buf` (Query and Parse seen whole: for pins, and for
    /// statements that need a database to themselves; Bind too while a prepared statement
    /// needs one); the count that may be forwarded.
    #[inline]
    pub(super) fn scan_client(&mut self, walk: &mut MessageWalker, buf: &[u8]) -> Result<usize, FrameError> {
        let binds = std::cell::Cell::new(!self.prepared.is_empty());
        walk.scan(
            buf,
            |tag| tag == frontend::QUERY || tag == frontend::PARSE || (tag == frontend::BIND && binds.get()),
            |s, m| {
                let walk = self.on_client(s, m);
                binds.set(!self.prepared.is_empty());
                walk
            },
        )
    }

    /// Walks the server's bytes in `buf`: ReadyForQuery whole; ParameterStatus whole and
    /// recorded in `reported` (transaction mode); ErrorResponse whole while a cancel
    /// explanation waits (`explain`). The count that may be forwarded.
    #[inline]
    pub(super) fn scan_server(
        &mut self,
        walk: &mut MessageWalker,
        buf: &[u8],
        mut reported: Option<&mut Vec<(String, String)>>,
        explain: bool,
    ) -> Result<usize, FrameError> {
        let txn = reported.is_some();
        walk.scan(
            buf,
            |tag| {
                tag == backend::READY_FOR_QUERY
                    || (txn && tag == backend::PARAMETER_STATUS)
                    || (explain && tag == backend::ERROR_RESPONSE)
            },
            |s, m| {
                if let (backend::PARAMETER_STATUS, Some(r)) = (s.tag, reported.as_mut()) {
                    note_reported(m, r);
                }
                self.on_server(s, m)
            },
        )
    }

    pub(super) fn on_client(&mut self, s: &Seen, msg: &[u8]) -> Walk {
        if self.inspect && s.complete {
            if let Some(reason) = pin_reason(s.tag, msg, self.named_pins) {
                self.pin = Some(reason);
                self.inspect = false;
            }
        }
        if s.complete {
            databases::note(self, s.tag, msg);
        }
        match s.tag {
            frontend::TERMINATE => {
                self.terminate = true;
                return Walk::StopBefore;
            }
            frontend::QUERY | frontend::FUNCTION_CALL => self.request(),
            frontend::SYNC => {
                self.request();
                self.unsynced = false;
            }
            frontend::PARSE => {
                self.unsynced = true;
                self.tally.parses += 1;
            }
            frontend::BIND => {
                self.unsynced = true;
                self.tally.binds += 1;
            }
            frontend::DESCRIBE | frontend::EXECUTE | frontend::CLOSE | frontend::FLUSH => self.unsynced = true,
            frontend::COPY_DONE | frontend::COPY_FAIL => self.copy = false,
            _ => {}
        }
        Walk::Continue
    }

    /// A request that ReadyForQuery will answer; starts the query (and transaction) clocks.
    fn request(&mut self) {
        if self.pending == 0 {
            let now = Instant::now();
            self.busy_since = Some(now);
            if self.status == status::IDLE && self.xact_since.is_none() {
                self.xact_since = Some(now);
            }
        }
        self.pending += 1;
    }

    pub(super) fn on_server(&mut self, s: &Seen, msg: &[u8]) -> Walk {
        match s.tag {
            backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE => self.copy = true,
            backend::ERROR_RESPONSE => self.copy = false,
            _ => {}
        }
        if s.tag == backend::READY_FOR_QUERY {
            self.answered += 1;
            self.status = msg.get(5).copied().unwrap_or(b'?');
            self.pending = self.pending.saturating_sub(1);
            self.tally.queries += 1;
            if self.pending == 0 {
                let now = Instant::now();
                self.answered_at = Some(now);
                if let Some(t) = self.busy_since.take() {
                    self.tally.query_us += now.duration_since(t).as_micros() as u64;
                }
                if self.status == status::IDLE {
                    if let Some(t) = self.xact_since.take() {
                        self.tally.xact_us += now.duration_since(t).as_micros() as u64;
                    }
                }
            }
            if self.status == status::IDLE {
                self.ends += 1;
                self.tally.xacts += 1;
            }
        }
        self.last_server_tag = s.tag;
        Walk::Continue
    }
}

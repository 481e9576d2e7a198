//! What the relay knows of a server connection from message headers alone: requests
//! outstanding, the last ReadyForQuery status, pins, statements that need a database to
//! themselves, and the session's traffic tally (transactions, queries, bytes, times) for
//! SHOW STATS. Also the last statement's text (bounded; Query and Parse are seen whole
//! anyway) and, on the cold path, a deadlock error (40P01) for the lock monitor.

use std::time::Instant;

use super::databases::{self, Prepared};
use super::txn::{effect, note_reported};
use crate::client::database_sql::DatabaseNeed;
use crate::client::tracked::Readback;
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
    /// `track_parameters` in upper case (None: only `search_path` is read back).
    pub(super) extra: Option<std::sync::Arc<[String]>>,
    /// Tracked parameters the statements inspected may have changed.
    pub(super) readback: Readback,
    /// Named Parse pins (statements are not tracked).
    pub(super) named_pins: bool,
    /// ReadyForQuery 'I' seen since the session was last told.
    pub(super) ends: u64,
    /// Traffic since the last fold into `Mode::stats`.
    pub(super) tally: Totals,
    /// Query and transaction times since the last fold into `Mode::stats`.
    pub(super) latency: crate::pool::latency::Tally,
    /// When the outstanding requests began (none outstanding: None).
    pub(super) busy_since: Option<Instant>,
    /// When the current transaction's first request was sent.
    pub(super) xact_since: Option<Instant>,
    /// Inside COPY IN or COPY BOTH (the server waits for the client's data).
    pub(super) copy: bool,
    /// When the last answer to all outstanding requests came (the clock the stats use).
    pub(super) answered_at: Option<Instant>,
    /// Transaction mode: (the server's pid, the pid the client was given). A notification
    /// from the server's own pid was caused by this client (only it uses the connection
    /// while it listens: LISTEN pins), so the client sees its given pid there.
    pub(super) notify: Option<(i32, i32)>,
    /// Where the first NotificationResponse of the bytes scanned last begins.
    first_notify: Option<usize>,
    /// ReadyForQuery messages seen.
    pub(super) answered: u64,
    /// Statements that need a database to themselves, found in the client's messages and not
    /// yet taken by the relay (which raises their holds before forwarding them), each with
    /// the `answered` count at which it is done.
    pub(super) needs: Vec<(u64, DatabaseNeed)>,
    /// The client's prepared statements that need a database to themselves (kept in the
    /// session's `Mode` between relays): a Bind of one is such a statement.
    pub(super) prepared: Prepared,
    /// The server connection's backend pid.
    pub(super) server_pid: i32,
    /// The last Query's or Parse's text, bounded (see [`capture`]); kept between relays.
    pub(super) last_sql: Vec<u8>,
    /// A deadlock error (40P01) just seen: its DETAIL, for the session to report.
    pub(super) deadlock: Option<String>,
}

/// Statement text kept whole up to this length; a longer one keeps its head and its tail
/// (where sqlcommenter puts its comment), each half of it.
pub(super) const LAST_SQL: usize = 1024;

/// Keeps the text of a Query or Parse message `msg` in `into`, bounded by [`LAST_SQL`].
#[inline]
fn capture(tag: u8, msg: &[u8], into: &mut Vec<u8>) {
    let body = msg.get(5..).unwrap_or_default();
    let text = if tag == frontend::PARSE {
        match memchr::memchr(0, body) {
            Some(i) => &body[i + 1..],
            None => return,
        }
    } else {
        body
    };
    let text = &text[..memchr::memchr(0, text).unwrap_or(text.len())];
    into.clear();
    if text.len() <= LAST_SQL {
        into.extend_from_slice(text);
    } else {
        into.extend_from_slice(&text[..LAST_SQL / 2]);
        into.extend_from_slice(b" ... ");
        into.extend_from_slice(&text[text.len() - LAST_SQL / 2..]);
    }
}

/// The DETAIL of an ErrorResponse `msg` when its SQLSTATE is 40P01 (deadlock detected);
/// `Some("")` when it has none. Cold: called for ErrorResponses only.
#[cold]
fn deadlock_detail(msg: &[u8]) -> Option<String> {
    let mut fields = msg.get(5..)?;
    let mut detail = None;
    let mut deadlock = false;
    while let Some((&kind, rest)) = fields.split_first() {
        if kind == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0)?;
        match kind {
            b'C' => deadlock = &rest[..end] == b"40P01",
            b'D' => detail = Some(String::from_utf8_lossy(&rest[..end]).into_owned()),
            _ => {}
        }
        fields = &rest[end + 1..];
    }
    deadlock.then(|| detail.unwrap_or_default())
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
            extra: None,
            readback: Readback::default(),
            named_pins,
            ends: 0,
            tally: Totals::default(),
            latency: Default::default(),
            busy_since: None,
            xact_since: None,
            copy: false,
            answered_at: None,
            notify: None,
            first_notify: None,
            answered: 0,
            needs: Vec::new(),
            prepared: Prepared::default(),
            server_pid: 0,
            last_sql: Vec::new(),
            deadlock: None,
        }
    }

    /// Gives the client its own pid in the notifications its own NOTIFY caused, in `buf` (the
    /// bytes just scanned, whole messages from the first notification on). Nothing to do
    /// unless a notification was seen.
    #[inline]
    pub(super) fn own_notifications(&mut self, buf: &mut [u8]) {
        if let (Some(start), Some((server, given))) = (self.first_notify.take(), self.notify) {
            let start = start.min(buf.len());
            rewrite_notification_pids(&mut buf[start..], server, given);
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

    /// Walks the server's bytes in `buf`: ReadyForQuery and ErrorResponse whole (an error is
    /// rare, and a deadlock's is reported); ParameterStatus whole and recorded in `reported`
    /// (transaction mode). The count that may be forwarded.
    #[inline]
    pub(super) fn scan_server(
        &mut self,
        walk: &mut MessageWalker,
        buf: &[u8],
        mut reported: Option<&mut Vec<(String, String)>>,
    ) -> Result<usize, FrameError> {
        let txn = reported.is_some();
        let notify = self.notify.is_some();
        walk.scan(
            buf,
            |tag| {
                tag == backend::READY_FOR_QUERY
                    || (txn && tag == backend::PARAMETER_STATUS)
                    || (notify && tag == backend::NOTIFICATION_RESPONSE)
                    || tag == backend::ERROR_RESPONSE
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
            let (e, named) = effect(s.tag, msg, self.named_pins, self.extra.as_deref().unwrap_or_default());
            self.readback.note(&e, named);
            if let Some(reason) = e.pin {
                self.pin = Some(reason);
                self.inspect = false;
            }
        }
        if s.complete {
            databases::note(self, s.tag, msg);
            if s.tag == frontend::QUERY || s.tag == frontend::PARSE {
                capture(s.tag, msg, &mut self.last_sql);
            }
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
            backend::ERROR_RESPONSE => {
                self.copy = false;
                if s.complete {
                    self.deadlock = deadlock_detail(msg);
                }
            }
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
                    let us = now.duration_since(t).as_micros() as u64;
                    self.tally.query_us += us;
                    self.latency.query.record(us);
                }
                if self.status == status::IDLE {
                    if let Some(t) = self.xact_since.take() {
                        let us = now.duration_since(t).as_micros() as u64;
                        self.tally.xact_us += us;
                        self.latency.xact.record(us);
                    }
                }
            }
            if self.status == status::IDLE {
                self.ends += 1;
                self.tally.xacts += 1;
            }
        }
        if s.tag == backend::NOTIFICATION_RESPONSE && self.notify.is_some() && self.first_notify.is_none() {
            self.first_notify = Some(s.start);
        }
        self.last_server_tag = s.tag;
        Walk::Continue
    }
}

/// Rewrites the pid of every whole NotificationResponse in `buf` (which starts at a message)
/// that came from `server` to `given`.
fn rewrite_notification_pids(buf: &mut [u8], server: i32, given: i32) {
    let mut pos = 0;
    while buf.len() >= pos + 5 {
        let len = u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]) as usize;
        let end = pos.saturating_add(1).saturating_add(len);
        if len < 4 || end > buf.len() {
            return;
        }
        if buf[pos] == backend::NOTIFICATION_RESPONSE && len >= 8 && buf[pos + 5..pos + 9] == server.to_be_bytes() {
            buf[pos + 5..pos + 9].copy_from_slice(&given.to_be_bytes());
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(pid: i32, channel: &str) -> Vec<u8> {
        let body_len = 4 + channel.len() + 1 + 1;
        let mut m = vec![backend::NOTIFICATION_RESPONSE];
        m.extend_from_slice(&((4 + body_len) as u32).to_be_bytes());
        m.extend_from_slice(&pid.to_be_bytes());
        m.extend_from_slice(channel.as_bytes());
        m.extend_from_slice(&[0, 0]);
        m
    }

    #[test]
    fn only_the_servers_own_notifications_get_the_given_pid() {
        let mut buf = notification(77, "own");
        buf.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        buf.extend(notification(78, "other"));
        buf.extend(notification(77, "own again"));
        let mut want = notification(4_200_000, "own");
        want.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        want.extend(notification(78, "other"));
        want.extend(notification(4_200_000, "own again"));
        rewrite_notification_pids(&mut buf, 77, 4_200_000);
        assert_eq!(buf, want);
    }

    #[test]
    fn a_cut_or_malformed_message_ends_the_rewrite() {
        let whole = notification(77, "c");
        let mut cut = whole[..whole.len() - 1].to_vec();
        rewrite_notification_pids(&mut cut, 77, 1);
        assert_eq!(cut, whole[..whole.len() - 1]);
        let mut bad = vec![backend::NOTIFICATION_RESPONSE, 0, 0, 0, 2, 0, 0, 0, 77];
        let before = bad.clone();
        rewrite_notification_pids(&mut bad, 77, 1);
        assert_eq!(bad, before);
    }
}

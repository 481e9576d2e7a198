//! The relay's ties to the session that runs it: pins logged, counted and told to admission
//! (headroom), transaction ends told to the session registry (for the lock monitor), traffic
//! folded into the pool's SHOW STATS, tracked parameters the server reported, and the lock
//! monitor's explanation put in place of the server's "query canceled". The parts of [`Mode`](super::Mode) these need, borrowed
//! apart once when the relay starts.

use std::time::Instant;

use bytes::BytesMut;

use super::tracker::Tracker;
use super::MAX_SERVER_MESSAGE;
use crate::admission::Pinning;
use crate::error::sqlstate;
use crate::pool::stats::{Local, Totals};
use crate::protocol::frame::{peek_header, Frame};
use crate::protocol::tags::backend;
use crate::sessions::{Pins, SessionInfo};

/// What the relay reads and updates of its session: the fields of [`Mode`](super::Mode) but
/// the statements, the limits and the reuse buffers, which the relay's other parts borrow.
pub(super) struct Session<'m> {
    /// Transaction pooling ([`Mode::transaction`](super::Mode::transaction)).
    pub(super) transaction: bool,
    /// Why the session is pinned ([`Mode::pinned`](super::Mode::pinned)): set when the
    /// tracker finds a pin.
    pub(super) pinned: &'m mut Option<&'static str>,
    /// Who the client is, for the log line of a pin.
    pub(super) who: &'m str,
    /// Counts pins.
    pub(super) pins: &'m Pins,
    /// Where tracked parameters the server reported go: in transaction mode, and whenever
    /// statements are tracked.
    pub(super) reported: Option<&'m mut Vec<(String, String)>>,
    /// Where the tracker's [`Readback`](crate::client::tracked::Readback) goes back at the end.
    pub(super) readback: &'m mut crate::client::tracked::Readback,
    /// The session in the registry.
    pub(super) info: Option<&'m SessionInfo>,
    /// The session's tally for SHOW STATS.
    pub(super) stats: Option<&'m mut Local>,
    /// Tells admission of a pin (transaction mode).
    pub(super) pinning: Option<&'m mut Pinning>,
}

impl Session<'_> {
    /// Logs and counts a pin the tracker just found.
    #[inline]
    pub(super) fn note_pin(&mut self, t: &Tracker) {
        if let (Some(reason), None) = (t.pin, &*self.pinned) {
            *self.pinned = Some(reason);
            self.pins.add(reason);
            if let Some(p) = self.pinning.as_deref_mut() {
                p.pinned();
            }
            tracing::info!(reason, client = %self.who, "session pinned to its server connection until it disconnects");
        }
    }

    /// Transactions ended (ReadyForQuery 'I'): tells the registry, and folds the traffic
    /// since the last fold into SHOW STATS.
    #[inline]
    pub(super) fn transactions_ended(&mut self, t: &mut Tracker) {
        if t.ends == 0 {
            return;
        }
        if let Some(s) = self.info {
            if s.transactions_ended(t.ends) && !t.last_sql.is_empty() {
                s.sample_statement(&t.last_sql);
            }
        }
        t.ends = 0;
        if let Some(l) = self.stats.as_deref_mut() {
            l.add_latency(&t.latency);
            t.latency = Default::default();
            l.add(&t.tally, t.answered_at.unwrap_or_else(Instant::now));
            t.tally = Totals::default();
        }
    }

    /// While the lock monitor's explanation of a cancel waits (one atomic load per server
    /// read), puts it in place of the server's "query canceled" in `s_in` (past the first
    /// `skip` bytes, the rest of a message already forwarded; the relay holds ErrorResponses
    /// back until whole).
    #[inline]
    pub(super) fn explain_cancel(&self, s_in: &mut BytesMut, skip: usize) {
        if let Some(s) = self.info.filter(|s| s.cancel_pending()) {
            explain_cancel(s_in, skip, s);
        }
    }

    /// PostgreSQL told the session it lost a deadlock (40P01, seen by the tracker): reported
    /// to the registry with the session's last statement (cold path).
    #[cold]
    pub(super) fn deadlock(&self, t: &mut Tracker) {
        let detail = t.deadlock.take().unwrap_or_default();
        let statement = String::from_utf8_lossy(&t.last_sql).into_owned();
        tracing::debug!(client = %self.who, pid = t.server_pid, "deadlock reported by the server");
        if let Some(s) = self.info {
            s.deadlock(t.server_pid, &detail, statement);
        }
    }

    /// The relay ends: the traffic not yet folded in is kept for the next fold.
    pub(super) fn finish(&mut self, t: &Tracker) {
        *self.readback = t.readback;
        if let Some(l) = self.stats.as_deref_mut() {
            l.pending.add(&t.tally);
            if !t.latency.is_empty() {
                l.add_latency(&t.latency);
            }
        }
    }
}

/// The lock monitor cancelled this session's query: replaces the first whole "query
/// canceled" ErrorResponse (57014) in `s_in` after the first `skip` bytes (the rest of a
/// message already forwarded) with the monitor's explanation. Runs only while one waits.
fn explain_cancel(s_in: &mut BytesMut, skip: usize, session: &SessionInfo) {
    let mut pos = skip.min(s_in.len());
    while let Ok(Some((tag, total))) = peek_header(&s_in[pos..], MAX_SERVER_MESSAGE) {
        if s_in.len() - pos < total {
            return;
        }
        let frame = Frame {
            tag,
            bytes: BytesMut::from(&s_in[pos..pos + total]),
        };
        if tag == backend::ERROR_RESPONSE
            && crate::protocol::messages::parse_server_error(&frame).is_some_and(|e| e.code == sqlstate::QUERY_CANCELED)
        {
            if let Some(e) = session.take_cancel_note() {
                let tail = s_in.split_off(pos + total);
                s_in.truncate(pos);
                crate::protocol::messages::error_response(&e, s_in);
                s_in.unsplit(tail);
            }
            return;
        }
        pos += total;
    }
}

//! The relay's statement step: how the client's bytes reach the server and the server's
//! answers come back. Either they pass as they came, only their headers walked (session mode,
//! or transaction mode without statement tracking), or, with named prepared statements
//! tracked, whole client messages are renamed for the server ([`ClientStatements`]) and the
//! answers to what the proxy injected are dropped while its own answers are put in order
//! ([`Responses`]); a client message that uses a shared statement the server connection
//! lacks waits for one round trip while its copy is prepared and checked. The relay runs one
//! path for both; this is the step that differs.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::tracker::Tracker;
use super::txn::note_reported;
use super::write::move_ready;
use super::{Reuse, REUSE_MAX};
use crate::client::prepared::{ClientStatements, OnServer, Outputs, Responses, ServerStatements};
use crate::client::sql::{code_part, deallocates_all, might_deallocate, query_text};
use crate::client::SessionError;
use crate::protocol::frame::{split_frame, Frame, MessageWalker, Seen, Walk};
use crate::protocol::tags::{backend, frontend, read_cstr, split_cstr};

/// How the relay treats statements.
pub(super) enum Statements<'m> {
    /// Bytes pass as they came.
    Plain,
    /// Named prepared statements are renamed for the server.
    Tracked(Tracked<'m>),
}

/// Where the client's bytes that may go on to the server are.
pub(super) enum ToServer<'a> {
    /// The first n bytes of the client's buffer, as they came.
    Scanned(usize),
    /// Renamed into this buffer (emptied when sent); the proxy's own answers to the client
    /// may be waiting too.
    Renamed(&'a mut BytesMut),
}

/// Where the server's bytes that may go on to the client are.
pub(super) enum ToClient {
    /// The first n bytes of the server's buffer, as they came.
    Scanned(usize),
    /// Already queued for the client, with the proxy's own answers in order.
    Queued,
}

impl Statements<'_> {
    /// Takes in the client's new bytes in `c_in` (a partial message stays there); what may go
    /// on to the server. Answers the proxy gives itself go to `to_client`.
    ///
    /// # Errors
    /// A malformed client message.
    #[inline]
    pub(super) fn client(
        &mut self,
        c_in: &mut BytesMut,
        walk: &mut MessageWalker,
        t: &mut Tracker,
        to_client: &mut BytesMut,
    ) -> Result<ToServer<'_>, SessionError> {
        match self {
            Statements::Plain => t
                .scan_client(walk, c_in)
                .map(ToServer::Scanned)
                .map_err(SessionError::Frame),
            Statements::Tracked(tr) => {
                tr.client_frames(c_in, t, to_client)?;
                Ok(ToServer::Renamed(&mut tr.scratch))
            }
        }
    }

    /// Takes in the server's new bytes in `s_in`; what may go on to the client. Tracked
    /// parameters the server reports go to `reported`; ErrorResponses are held back until
    /// whole.
    ///
    /// # Errors
    /// A malformed server message.
    #[inline]
    pub(super) fn server(
        &mut self,
        s_in: &mut BytesMut,
        s_out: &mut BytesMut,
        walk: &mut MessageWalker,
        t: &mut Tracker,
        reported: Option<&mut Vec<(String, String)>>,
    ) -> Result<ToClient, SessionError> {
        match self {
            Statements::Plain => t
                .scan_server(walk, s_in, reported)
                .map(ToClient::Scanned)
                .map_err(SessionError::ServerProtocol),
            Statements::Tracked(tr) => {
                tr.server_messages(s_in, s_out, walk, t, reported)?;
                Ok(ToClient::Queued)
            }
        }
    }

    /// Syncs the server ignored (sent during COPY IN) will get no ReadyForQuery: they are
    /// no longer outstanding. (Only tracked statements tell them apart.)
    #[inline]
    pub(super) fn ignored_syncs(&mut self, t: &mut Tracker) {
        if let Statements::Tracked(tr) = self {
            let r = &mut tr.reuse.responses;
            if r.ignored_syncs > 0 {
                t.pending = t.pending.saturating_sub(r.ignored_syncs);
                r.ignored_syncs = 0;
            }
        }
    }

    /// Nothing renamed waits to be sent, and no client message is held back.
    #[inline]
    pub(super) fn all_sent(&self) -> bool {
        match self {
            Statements::Plain => true,
            Statements::Tracked(tr) => tr.scratch.is_empty() && tr.held.is_none(),
        }
    }

    /// A client message held back can go on now (its statement was checked): the relay
    /// passes the client's bytes on without waiting for more.
    #[inline]
    pub(super) fn resumable(&self) -> bool {
        matches!(self, Statements::Tracked(tr) if tr.held.is_some() && !tr.verifying)
    }
}

/// Statement tracking's state for one relay.
pub(super) struct Tracked<'m> {
    /// The client's statements.
    pub(super) st: &'m mut ClientStatements,
    /// Where `scratch` is kept between relays, and the answers outstanding (in place).
    reuse: &'m mut Reuse,
    /// The server connection's statements (moved in and out).
    conn: ServerStatements,
    /// Renamed client messages, until sent.
    scratch: BytesMut,
    /// Make statements that change session state fail instead of pinning.
    reject: bool,
    /// Largest client message.
    max: usize,
    /// Statements no client uses any more were looked for (at the relay's first request).
    tidied: bool,
    /// A client message held back while its statement is checked on this connection (see
    /// [`ClientStatements::verify_first`]).
    held: Option<Frame>,
    /// The check's answer is still due.
    verifying: bool,
}

impl<'m> Tracked<'m> {
    /// Tracking for one relay on a server connection with statements `conn`, taking the
    /// buffers kept in `reuse`.
    pub(super) fn new(
        st: &'m mut ClientStatements,
        reuse: &'m mut Reuse,
        conn: ServerStatements,
        reject: bool,
        max: usize,
    ) -> Self {
        if !reuse.responses.is_idle() {
            reuse.responses = Responses::default();
        }
        Tracked {
            st,
            scratch: std::mem::take(&mut reuse.scratch),
            reuse,
            conn,
            reject,
            max,
            tidied: false,
            held: None,
            verifying: false,
        }
    }

    /// The relay ends: statements the server described are settled (see
    /// [`ClientStatements::settle`]), the buffers kept while small and idle; the server
    /// connection's statements are handed back.
    pub(super) fn finish(mut self) -> ServerStatements {
        self.st.settle(&mut self.reuse.responses, &mut self.conn);
        self.st.relay_ended();
        if !self.reuse.responses.is_idle() {
            self.reuse.responses = Responses::default();
        }
        if self.scratch.capacity() <= REUSE_MAX {
            self.scratch.clear();
            self.reuse.scratch = self.scratch;
        }
        self.conn
    }

    /// Handles every whole client message in `c_in` (a partial one stays there), renaming
    /// statements for the server into `scratch`.
    fn client_frames(
        &mut self,
        c_in: &mut BytesMut,
        t: &mut Tracker,
        to_client: &mut BytesMut,
    ) -> Result<(), SessionError> {
        let mut out = Outputs {
            server: &mut self.scratch,
            client: to_client,
            responses: &mut self.reuse.responses,
            conn: &mut self.conn,
        };
        if self.verifying {
            return Ok(());
        }
        let mut resumed = self.held.take();
        loop {
            let checked = resumed.is_some();
            let f = match resumed.take() {
                Some(f) => f,
                None => match split_frame(c_in, self.max).map_err(SessionError::Frame)? {
                    Some(f) => f,
                    None => break,
                },
            };
            if !self.tidied && answered(f.tag) {
                // Before the client's first request, so its answers come after these.
                self.tidied = true;
                self.st.tidy(&mut out);
            }
            if !checked && self.st.verify_first(&f.bytes, &mut out) {
                self.held = Some(f);
                self.verifying = true;
                break;
            }
            let seen = Seen {
                tag: f.tag,
                start: 0,
                len: f.bytes.len(),
                complete: true,
            };
            let was_pinned = t.pin.is_some();
            if t.on_client(&seen, &f.bytes) == Walk::StopBefore {
                break; // Terminate: not forwarded
            }
            // DEALLOCATE ALL / DISCARD ALL matter only when statements are known on either
            // side (the client's or the server connection's): the scan is skipped otherwise.
            if f.tag == frontend::QUERY
                && !(self.st.by_name.is_empty() && out.conn.is_empty())
                && might_deallocate(code_part(query_text(f.tag, &f.bytes[5..])))
                && read_cstr(&f.bytes[5..]).is_some_and(|(sql, _)| deallocates_all(&sql))
            {
                self.st.forget_all(out.conn);
            }
            match (self.reject, was_pinned, t.pin) {
                (true, false, Some(reason)) => {
                    t.pin = None;
                    t.inspect = true;
                    tracing::info!(reason, "session state change rejected (session_state = \"reject\")");
                    self.st.on_client(rejection(&f.bytes, reason), &mut out);
                }
                _ => self.st.on_client(f.bytes.freeze(), &mut out),
            }
        }
        Ok(())
    }

    /// Moves the server's messages in `s_in` to `s_out`, dropping answers to injected
    /// messages and adding the proxy's own answers in order.
    fn server_messages(
        &mut self,
        s_in: &mut BytesMut,
        s_out: &mut BytesMut,
        walk: &mut MessageWalker,
        t: &mut Tracker,
        mut reported: Option<&mut Vec<(String, String)>>,
    ) -> Result<(), SessionError> {
        let (responses, conn) = (&mut self.reuse.responses, &mut self.conn);
        loop {
            let (mut after, mut swallow, mut stop_next) = (Vec::new(), 0usize, false);
            let n = walk
                .scan(s_in, seen_whole, |seen, msg| {
                    if stop_next {
                        return Walk::StopBefore;
                    }
                    t.on_server(seen, msg);
                    if let (backend::PARAMETER_STATUS, Some(r)) = (seen.tag, reported.as_deref_mut()) {
                        note_reported(msg, r);
                    }
                    let stale = seen.tag == backend::ERROR_RESPONSE && is_stale_plan(msg);
                    match responses.on_server(seen.tag, msg, stale, conn) {
                        OnServer::Forward(due) => {
                            stop_next = !due.is_empty();
                            after = due;
                            Walk::Continue
                        }
                        OnServer::Swallow(due) => {
                            after = due;
                            swallow = seen.len;
                            Walk::StopBefore
                        }
                    }
                })
                .map_err(SessionError::ServerProtocol)?;
            t.own_notifications(&mut s_in[..n]);
            move_ready(s_in, s_out, n);
            s_in.advance(swallow);
            for b in &after {
                s_out.extend_from_slice(b);
            }
            if swallow == 0 && !stop_next {
                break;
            }
        }
        if self.reuse.responses.learnt() {
            // Everything answered (a pinned session's relay lasts long): settle now.
            self.st.settle(&mut self.reuse.responses, &mut self.conn);
        }
        if self.verifying && self.reuse.responses.drained() {
            self.verifying = false; // the held message can go on
        }
        Ok(())
    }
}

/// Client messages the server answers, or that keep the server connection from going back
/// until a Sync is answered: proxy requests sent before one are answered before the relay
/// can end.
fn answered(tag: u8) -> bool {
    use frontend::*;
    matches!(
        tag,
        PARSE | BIND | DESCRIBE | EXECUTE | CLOSE | SYNC | FLUSH | QUERY | FUNCTION_CALL
    )
}

/// Server messages looked at whole when statements are tracked: those that end a request,
/// ParameterStatus and NotificationResponse (all small); rows stream.
#[inline]
fn seen_whole(tag: u8) -> bool {
    use backend::*;
    matches!(
        tag,
        PARSE_COMPLETE
            | BIND_COMPLETE
            | CLOSE_COMPLETE
            | NO_DATA
            | COMMAND_COMPLETE
            | EMPTY_QUERY_RESPONSE
            | PORTAL_SUSPENDED
            | READY_FOR_QUERY
            | ERROR_RESPONSE
            | ROW_DESCRIPTION
            | PARAMETER_DESCRIPTION
            | PARAMETER_STATUS
            | NOTIFICATION_RESPONSE
    )
}

/// The message that replaces one changing session state under `session_state = "reject"`:
/// the same request, failing on the server with pgvalve's error, so PostgreSQL itself keeps
/// the transaction state and the answers in order. (A Parse fails when it is executed.)
fn rejection(msg: &[u8], reason: &str) -> Bytes {
    let message = format!("pgvalve: {reason} is not allowed in transaction pooling mode (session_state = \"reject\")");
    let hint = "Use SET LOCAL or pg_advisory_xact_lock inside a transaction, or connect to a session-mode pool.";
    let sql = format!(
        "DO $pgvalve$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}, HINT = {}; END $pgvalve$",
        crate::server::quote_literal(&message),
        crate::server::quote_literal(hint)
    );
    let mut b = BytesMut::new();
    match msg[0] {
        frontend::PARSE => {
            let name = split_cstr(&msg[5..]).map(|(n, _)| n.to_vec()).unwrap_or_default();
            b.put_u8(frontend::PARSE);
            b.put_i32((4 + name.len() + 1 + sql.len() + 1 + 2) as i32);
            b.put_slice(&name);
            b.put_u8(0);
        }
        _ => {
            b.put_u8(frontend::QUERY);
            b.put_i32((4 + sql.len() + 1) as i32);
        }
    }
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    if msg[0] == frontend::PARSE {
        b.put_i16(0);
    }
    b.freeze()
}

/// Whether an ErrorResponse says a cached plan changed its result type (SQLSTATE 0A000).
fn is_stale_plan(msg: &[u8]) -> bool {
    let f = Frame {
        tag: backend::ERROR_RESPONSE,
        bytes: BytesMut::from(msg),
    };
    crate::protocol::messages::parse_server_error(&f)
        .is_some_and(|e| e.code == "0A000" && e.message.contains("cached plan must not change result type"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::prepared::{Registry, CLOSE_COMPLETE, PARSE_COMPLETE};
    use crate::protocol::tags::status;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn plain_leaves_the_bytes_in_place_and_counts_whole_queries() {
        let query = msg(frontend::QUERY, b"SELECT 1\0");
        let mut c_in = BytesMut::from(&[&query[..], &query[..7]].concat()[..]);
        let (mut walk, mut to_client) = (MessageWalker::new(1 << 16), BytesMut::new());
        let mut t = Tracker::new(status::IDLE, true, None, true);
        let mut plain = Statements::Plain;
        let ready = plain.client(&mut c_in, &mut walk, &mut t, &mut to_client);
        // A Query is looked at whole (for pins): the cut one waits for the rest.
        assert!(matches!(ready, Ok(ToServer::Scanned(n)) if n == query.len()));
        assert_eq!(c_in.len(), query.len() + 7);
        assert_eq!(t.pending, 1);
        assert!(to_client.is_empty());
    }

    #[test]
    fn tracked_renames_and_puts_the_proxy_answers_in_order() {
        let mut st = ClientStatements::new(std::sync::Arc::new(Registry::default()), 10, 0);
        let mut reuse = Reuse::default();
        let mut statements = Statements::Tracked(Tracked::new(
            &mut st,
            &mut reuse,
            ServerStatements::default(),
            false,
            1 << 16,
        ));
        let (parse, close, sync) = (
            msg(frontend::PARSE, b"s1\0SELECT 1\0\0\0"),
            msg(frontend::CLOSE, b"Ss1\0"),
            msg(frontend::SYNC, b""),
        );
        let mut c_in = BytesMut::from(&[parse, close, sync.clone()].concat()[..]);
        let (mut walk, mut s_out) = (MessageWalker::new(1 << 16), BytesMut::new());
        let mut t = Tracker::new(status::IDLE, true, None, false);
        let Ok(ToServer::Renamed(scratch)) = statements.client(&mut c_in, &mut walk, &mut t, &mut s_out) else {
            panic!("statements are tracked");
        };
        // The Parse goes under the proxy-wide name, with a Describe of the proxy's own (its
        // answer says what the statement is); the Close is the proxy's to answer.
        let mut expected = BytesMut::new();
        crate::client::prepared::parse_message(1, b"SELECT 1\0\0\0", &mut expected);
        expected.extend_from_slice(&msg(frontend::DESCRIBE, b"Spgv_1\0"));
        expected.extend_from_slice(&sync);
        assert_eq!(&scratch[..], &expected[..]);
        scratch.clear();
        assert!(
            c_in.is_empty() && s_out.is_empty(),
            "CloseComplete waits for ParseComplete"
        );

        let ready_idle = msg(backend::READY_FOR_QUERY, &[status::IDLE]);
        let params = msg(backend::PARAMETER_DESCRIPTION, b"\0\0");
        let row = msg(
            backend::ROW_DESCRIPTION,
            b"\0\x01?column?\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        let mut s_in = BytesMut::from(&[PARSE_COMPLETE, &params, &row, &ready_idle[..]].concat()[..]);
        let ready = statements.server(&mut s_in, &mut s_out, &mut walk, &mut t, None);
        assert!(matches!(ready, Ok(ToClient::Queued)));
        assert_eq!(
            &s_out[..],
            &[PARSE_COMPLETE, CLOSE_COMPLETE, &ready_idle[..]].concat()[..]
        );
        assert!(s_in.is_empty());
        assert_eq!((t.pending, t.status), (0, status::IDLE));
        assert!(statements.all_sent());
        let Statements::Tracked(tracked) = statements else {
            unreachable!()
        };
        let mut conn = tracked.finish();
        assert_eq!(
            conn.take_closing(),
            vec![1],
            "closed by its client: closed on the server later"
        );
        assert!(reuse.responses.is_idle());
    }
}

//! Protocol-level named prepared statements in transaction mode.
//!
//! Part of the client session's relay. A client's statement names are its own; the server
//! side knows each distinct statement (query text + parameter types) under one proxy-wide name
//! `pgv_<id>` ([`Registry`]). Each server connection remembers which it has prepared
//! ([`ServerStatements`], LRU-bounded by `max_prepared_statements`). When a client's Bind or
//! Describe reaches a server connection that lacks the statement, a Parse is injected before
//! it and its ParseComplete swallowed; a client's Parse of a statement the connection already
//! has, and every client Close of a statement, are answered by the proxy itself, in order.
//! [`Responses`] keeps the order: one entry per request, popped as the server answers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::tags::{backend, frontend, split_cstr, status, target};

pub(crate) use crate::server::statements::ServerStatements;

/// ParseComplete.
pub(crate) const PARSE_COMPLETE: &[u8] = &[backend::PARSE_COMPLETE, 0, 0, 0, 4];
/// CloseComplete.
pub(crate) const CLOSE_COMPLETE: &[u8] = &[backend::CLOSE_COMPLETE, 0, 0, 0, 4];
/// ReadyForQuery, idle.
const READY_IDLE: &[u8] = &[backend::READY_FOR_QUERY, 0, 0, 0, 5, status::IDLE];

/// Proxy-wide: statement definition (everything in a Parse after its name) → id, and which
/// definitions a server has accepted.
#[derive(Debug, Default)]
pub struct Registry {
    ids: Mutex<crate::FastMap<Bytes, (u64, bool)>>,
}

impl Registry {
    /// The id of a definition, assigning the next one if new.
    pub(crate) fn id_for(&self, def: &Bytes) -> u64 {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        let next = ids.len() as u64 + 1;
        ids.entry(def.clone()).or_insert((next, false)).0
    }

    /// The id of a definition some server has accepted (ParseComplete), if any.
    pub fn accepted(&self, def: &[u8]) -> Option<u64> {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.get(def).filter(|(_, ok)| *ok).map(|(id, _)| *id)
    }

    fn mark_accepted(&self, id: u64) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = ids.values_mut().find(|(i, _)| *i == id) {
            v.1 = true;
        }
    }
}

/// The server-side name of statement `id`.
pub(crate) fn server_name(id: u64) -> String {
    format!("pgv_{id}")
}

/// A statement a client prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StmtDef {
    /// Proxy-wide id.
    pub id: u64,
    /// Query text, parameter count and types, as in the Parse message after its name.
    pub(crate) def: Bytes,
}

/// What the server will answer to one request, or what the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Query or FunctionCall: ends at ReadyForQuery.
    Query,
    /// Parse (of statement `id`, when named): ParseComplete.
    Parse(Option<u64>),
    /// Bind (of statement `id`, when named): BindComplete.
    Bind(Option<u64>),
    /// Describe statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// Describe portal: RowDescription or NoData.
    DescribePortal,
    /// Execute: rows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute(Option<u64>),
    /// Close of a portal: CloseComplete.
    Close,
    /// Sync: ReadyForQuery.
    Sync,
    /// An answer the proxy sends itself when its turn comes.
    Synthetic(&'static [u8]),
    /// A Parse the proxy injected: its ParseComplete is not forwarded.
    SwallowParse(u64),
    /// A Close the proxy injected: its CloseComplete is not forwarded.
    SwallowClose,
    /// Where the client ended a COPY IN (CopyDone or CopyFail): no answer of its own.
    CopyEnd,
}

/// What to do with one server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OnServer {
    /// Forward it, then send these proxy answers (possibly none).
    Forward(Vec<&'static [u8]>),
    /// Drop it (the answer to an injected message), then send these.
    Swallow(Vec<&'static [u8]>),
}

/// Outstanding requests of one relay, in order.
#[derive(Debug, Default)]
pub(crate) struct Responses {
    q: VecDeque<Expect>,
    /// Statements whose Parse the server accepted (to record in the registry).
    pub accepted: Vec<u64>,
    /// In COPY IN started by Execute: the server ignores Sync until CopyDone/CopyFail.
    copy_in: bool,
    /// Syncs the server ignored (sent during COPY IN), not yet taken by the relay.
    pub(crate) ignored_syncs: u32,
}

impl Responses {
    /// Nothing outstanding and no COPY under way: it can serve the next relay as it is.
    pub(crate) fn is_idle(&self) -> bool {
        self.q.is_empty() && self.accepted.is_empty() && !self.copy_in && self.ignored_syncs == 0
    }

    /// Adds a request; returns the proxy answers due now (when nothing is ahead of them).
    pub(crate) fn push(&mut self, e: Expect) -> Vec<&'static [u8]> {
        match e {
            Expect::Sync if self.copy_in => {
                self.ignored_syncs += 1;
                return Vec::new();
            }
            Expect::CopyEnd => self.copy_in = false,
            _ => {}
        }
        self.q.push_back(e);
        self.due()
    }

    /// The server started COPY IN for the Execute at the head: PostgreSQL ignores every Sync
    /// the client sent after it until CopyDone/CopyFail (the protocol allows clients to send
    /// Sync right after Execute without knowing the statement is a COPY).
    fn start_copy_in(&mut self) {
        let end = self
            .q
            .iter()
            .position(|e| *e == Expect::CopyEnd)
            .unwrap_or(self.q.len());
        let before = self.q.len();
        let mut i = 0;
        self.q.retain(|e| {
            let drop = i > 0 && i < end && *e == Expect::Sync;
            i += 1;
            !drop
        });
        self.ignored_syncs += (before - self.q.len()) as u32;
        self.copy_in = end == before;
    }

    /// True when nothing is outstanding.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    fn due(&mut self) -> Vec<&'static [u8]> {
        let mut out = Vec::new();
        loop {
            match self.q.front() {
                Some(Expect::Synthetic(b)) => out.push(*b),
                Some(Expect::CopyEnd) => {}
                _ => return out,
            }
            self.q.pop_front();
        }
    }

    /// Accounts for one server message of type `tag` (`stale_plan` for an ErrorResponse
    /// saying a cached plan changed its result type), updating `conn`'s statements.
    pub(crate) fn on_server(&mut self, tag: u8, stale_plan: bool, conn: &mut ServerStatements) -> OnServer {
        if matches!(
            tag,
            backend::NOTICE_RESPONSE | backend::PARAMETER_STATUS | backend::NOTIFICATION_RESPONSE
        ) {
            return OnServer::Forward(Vec::new());
        }
        let Some(&head) = self.q.front() else {
            return OnServer::Forward(Vec::new());
        };
        if tag == backend::ERROR_RESPONSE {
            return self.on_error(head, stale_plan, conn);
        }
        if let (Expect::Execute(_), backend::COPY_IN_RESPONSE) = (head, tag) {
            self.start_copy_in();
        }
        let (done, swallow) = match (head, tag) {
            (Expect::Query | Expect::Sync, backend::READY_FOR_QUERY) => (true, false),
            (Expect::Parse(_), backend::PARSE_COMPLETE)
            | (Expect::Bind(_), backend::BIND_COMPLETE)
            | (Expect::Close, backend::CLOSE_COMPLETE) => (true, false),
            (Expect::DescribeStatement | Expect::DescribePortal, backend::ROW_DESCRIPTION | backend::NO_DATA) => {
                (true, false)
            }
            (
                Expect::Execute(_),
                backend::COMMAND_COMPLETE | backend::EMPTY_QUERY_RESPONSE | backend::PORTAL_SUSPENDED,
            ) => (true, false),
            (Expect::SwallowParse(_), backend::PARSE_COMPLETE) | (Expect::SwallowClose, backend::CLOSE_COMPLETE) => {
                (true, true)
            }
            _ => (false, false),
        };
        if done {
            self.q.pop_front();
            if let (Expect::Parse(Some(id)) | Expect::SwallowParse(id), backend::PARSE_COMPLETE) = (head, tag) {
                self.accepted.push(id);
            }
        }
        let due = self.due();
        if swallow {
            OnServer::Swallow(due)
        } else {
            OnServer::Forward(due)
        }
    }

    /// An ErrorResponse ends the head request. In the extended protocol the server then skips
    /// everything up to the next Sync, so the requests in between get no answer: statements
    /// they would have prepared are not prepared, and the proxy's own answers are dropped.
    fn on_error(&mut self, head: Expect, stale_plan: bool, conn: &mut ServerStatements) -> OnServer {
        self.q.pop_front();
        let mut forget = |e: Expect| match e {
            Expect::Parse(Some(id)) | Expect::SwallowParse(id) => conn.remove(id),
            Expect::Bind(Some(id)) | Expect::Execute(Some(id)) if stale_plan => conn.mark_stale(id),
            _ => {}
        };
        forget(head);
        // An injected Parse failing means the client's Bind/Describe after it fails too,
        // but the error is forwarded: the client sees the server's reason.
        if !matches!(head, Expect::Query | Expect::Sync) {
            while let Some(&e) = self.q.front() {
                if e == Expect::Sync {
                    break;
                }
                forget(e);
                self.q.pop_front();
            }
        }
        OnServer::Forward(self.due())
    }
}

/// Builds a Parse of statement `id` under its server name.
pub(crate) fn parse_message(id: u64, def: &[u8], out: &mut BytesMut) {
    let name = server_name(id);
    out.put_u8(frontend::PARSE);
    out.put_i32((4 + name.len() + 1 + def.len()) as i32);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(def);
}

/// Builds a Close of statement `id`.
pub(crate) fn close_message(id: u64, out: &mut BytesMut) {
    let name = server_name(id);
    out.put_u8(frontend::CLOSE);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(target::STATEMENT);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

/// A client's statements, and what it needs to rewrite its messages.
#[derive(Debug)]
pub(crate) struct ClientStatements {
    /// By the client's name.
    pub(crate) by_name: crate::FastMap<Vec<u8>, StmtDef>,
    /// The statement last bound to the unnamed portal (for Execute).
    unnamed_portal: Option<u64>,
    /// Proxy-wide ids.
    registry: Arc<Registry>,
    /// `max_prepared_statements` per server connection.
    cap: usize,
}

/// Where the handling of one client message sends bytes.
#[derive(Debug)]
pub(crate) struct Outputs<'a> {
    /// To the server.
    pub server: &'a mut BytesMut,
    /// To the client (the proxy's own answers, when due).
    pub client: &'a mut BytesMut,
    /// Outstanding requests.
    pub(crate) responses: &'a mut Responses,
    /// The server connection's statements.
    pub conn: &'a mut ServerStatements,
}

impl Outputs<'_> {
    fn expect(&mut self, e: Expect) {
        for b in self.responses.push(e) {
            self.client.put_slice(b);
        }
    }
}

impl ClientStatements {
    /// Statements of a new client session.
    pub(crate) fn new(registry: Arc<Registry>, cap: usize) -> Self {
        Self {
            by_name: Default::default(),
            unnamed_portal: None,
            registry,
            cap,
        }
    }

    /// Makes sure the server connection has `def` prepared, injecting Close/Parse as needed.
    fn ensure(&self, def: &StmtDef, out: &mut Outputs<'_>) {
        if !out.conn.touch(def.id) {
            self.prepare(def, Expect::SwallowParse(def.id), out);
        }
    }

    /// Sends a Parse of `def` (closing a stale copy and the least recently used statement
    /// first, when needed), expecting `expect` for it.
    fn prepare(&self, def: &StmtDef, expect: Expect, out: &mut Outputs<'_>) {
        if out.conn.take_stale(def.id) {
            close_message(def.id, out.server);
            out.expect(Expect::SwallowClose);
        }
        if let Some(evicted) = out.conn.insert(def.id, self.cap) {
            close_message(evicted, out.server);
            out.expect(Expect::SwallowClose);
        }
        parse_message(def.id, &def.def, out.server);
        out.expect(expect);
    }

    /// Handles one whole client message (header included) in transaction mode.
    pub(crate) fn on_client(&mut self, msg: Bytes, out: &mut Outputs<'_>) {
        let body = &msg[5..];
        let statement = body.first() == Some(&target::STATEMENT);
        match msg[0] {
            frontend::PARSE => self.on_parse(msg.clone(), body, out),
            frontend::BIND => self.on_bind(msg.clone(), body, out),
            frontend::DESCRIBE => self.on_describe(&msg, body, out),
            frontend::CLOSE if statement && body.len() > 2 => {
                if let Some((name, _)) = split_cstr(&body[1..]) {
                    self.by_name.remove(name);
                }
                out.expect(Expect::Synthetic(CLOSE_COMPLETE));
            }
            tag => {
                out.server.put_slice(&msg);
                match tag {
                    frontend::CLOSE => out.expect(Expect::Close),
                    frontend::EXECUTE => {
                        let unnamed = body.first() == Some(&0);
                        out.expect(Expect::Execute(if unnamed { self.unnamed_portal } else { None }));
                    }
                    frontend::SYNC => out.expect(Expect::Sync),
                    frontend::COPY_DONE | frontend::COPY_FAIL => out.expect(Expect::CopyEnd),
                    frontend::QUERY | frontend::FUNCTION_CALL => out.expect(Expect::Query),
                    _ => {}
                }
            }
        }
    }

    fn on_describe(&mut self, msg: &[u8], body: &[u8], out: &mut Outputs<'_>) {
        let statement = body.first() == Some(&target::STATEMENT);
        let def = (statement && body.len() > 2)
            .then(|| split_cstr(&body[1..]).and_then(|(n, _)| self.by_name.get(n)))
            .flatten()
            .cloned();
        let Some(def) = def else {
            out.server.put_slice(msg);
            out.expect(if statement {
                Expect::DescribeStatement
            } else {
                Expect::DescribePortal
            });
            return;
        };
        self.ensure(&def, out);
        let name = server_name(def.id);
        out.server.put_u8(frontend::DESCRIBE);
        out.server.put_i32((4 + 1 + name.len() + 1) as i32);
        out.server.put_u8(target::STATEMENT);
        out.server.put_slice(name.as_bytes());
        out.server.put_u8(0);
        out.expect(Expect::DescribeStatement);
    }

    fn on_parse(&mut self, msg: Bytes, body: &[u8], out: &mut Outputs<'_>) {
        let Some((name, def)) = split_cstr(body) else {
            out.server.put_slice(&msg);
            out.expect(Expect::Parse(None));
            return;
        };
        if name.is_empty() {
            out.server.put_slice(&msg);
            out.expect(Expect::Parse(None));
            return;
        }
        let def = msg.slice_ref(def);
        let stmt = StmtDef {
            id: self.registry.id_for(&def),
            def,
        };
        self.by_name.insert(name.to_vec(), stmt.clone());
        if out.conn.touch(stmt.id) {
            out.expect(Expect::Synthetic(PARSE_COMPLETE));
        } else {
            self.prepare(&stmt, Expect::Parse(Some(stmt.id)), out);
        }
    }

    fn on_bind(&mut self, msg: Bytes, body: &[u8], out: &mut Outputs<'_>) {
        let parsed = split_cstr(body).and_then(|(portal, rest)| Some((portal, split_cstr(rest)?)));
        let Some((portal, (stmt, rest))) = parsed else {
            out.server.put_slice(&msg);
            out.expect(Expect::Bind(None));
            return;
        };
        let def = (!stmt.is_empty()).then(|| self.by_name.get(stmt)).flatten().cloned();
        let Some(def) = def else {
            // Unnamed, or unknown (the server says it does not exist).
            if portal.is_empty() {
                self.unnamed_portal = None;
            }
            out.server.put_slice(&msg);
            out.expect(Expect::Bind(None));
            return;
        };
        self.ensure(&def, out);
        let name = server_name(def.id);
        out.server.put_u8(frontend::BIND);
        out.server
            .put_i32((4 + portal.len() + 1 + name.len() + 1 + rest.len()) as i32);
        out.server.put_slice(portal);
        out.server.put_u8(0);
        out.server.put_slice(name.as_bytes());
        out.server.put_u8(0);
        out.server.put_slice(rest);
        if portal.is_empty() {
            self.unnamed_portal = Some(def.id);
        }
        out.expect(Expect::Bind(Some(def.id)));
    }

    /// Records statements the server accepted during this relay.
    pub(crate) fn note_accepted(&self, responses: &mut Responses) {
        for id in responses.accepted.drain(..) {
            self.registry.mark_accepted(id);
        }
    }

    /// Answers, without a server connection, a batch that only prepares statements a server
    /// has already accepted: one or more named Parse messages, then Sync. `buf` holds the
    /// client's unread bytes; on success the batch is consumed and the answers (ParseComplete
    /// each, then ReadyForQuery 'I') are written to `answer`.
    pub(crate) fn answer_known_parses(&mut self, buf: &mut BytesMut, answer: &mut BytesMut) -> bool {
        let mut pos = 0;
        let mut found = Vec::new();
        loop {
            let Some(head) = buf.get(pos..pos + 5) else {
                return false;
            };
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            if len < 4 || buf.len() < pos + 1 + len as usize {
                return false;
            }
            let end = pos + 1 + len as usize;
            match head[0] {
                frontend::PARSE => {
                    let Some((name, def)) = split_cstr(&buf[pos + 5..end]) else {
                        return false;
                    };
                    let Some(id) = (!name.is_empty()).then(|| self.registry.accepted(def)).flatten() else {
                        return false;
                    };
                    found.push((name.to_vec(), id, Bytes::copy_from_slice(def)));
                }
                frontend::SYNC if !found.is_empty() => {
                    for (name, id, def) in found {
                        self.by_name.insert(name, StmtDef { id, def });
                        answer.put_slice(PARSE_COMPLETE);
                    }
                    answer.put_slice(READY_IDLE);
                    let _ = buf.split_to(end);
                    return true;
                }
                _ => return false,
            }
            pos = end;
        }
    }

    /// The client ran DEALLOCATE ALL or DISCARD ALL: its statements are gone, and so is
    /// everything the server connection had prepared.
    pub(crate) fn forget_all(&mut self, conn: &mut ServerStatements) {
        self.by_name.clear();
        conn.clear();
    }
}

#[cfg(test)]
#[path = "prepared_tests.rs"]
mod tests;

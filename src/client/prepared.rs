//! Protocol-level named prepared statements in transaction mode.
//!
//! Part of the client session's relay. A client's statement names are its own; on the server
//! side statements are shared under proxy-wide names `pgv_<n>` ([`Registry`]), prepared on
//! whichever server connection a client gets ([`ServerStatements`], LRU-bounded by
//! `max_prepared_statements`).
//!
//! A client's Parse gets what a fresh connection to PostgreSQL would give it, whatever DDL
//! ran since another client parsed the same text: the Parse always reaches the server, under
//! a new name, followed by a Describe (the client's own when it sends one next, else the
//! proxy's, whose answers are dropped). The description (parameter types and result columns)
//! then decides which shared statement the client uses from its next transaction on: one of
//! the same text that describes the same, or a new one. A statement a client prepared
//! before a schema change keeps the parameter types it was described with on every server
//! connection (as PostgreSQL keeps them for a prepared statement).
//!
//! When a client's Bind or Describe of a shared statement reaches a server connection that
//! lacks it, a Parse, a Describe and a Flush are injected and the client's message held back
//! until the copy is seen to describe as the statement did ([`ClientStatements::verify_first`]);
//! a copy that does not, or that fails with 0A000 itself, marks the statement changed, and its
//! clients get 0A000 where no older copy exists, as PostgreSQL would answer them. Client
//! Closes are answered by the proxy itself, in order ([`Responses`]). A shared statement no
//! client uses any more is closed on each server connection at the start of its next relay.

mod carry;
mod registry;
mod responses;

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

pub(crate) use self::registry::{scope, Registry};
pub(crate) use self::responses::{Expect, OnServer, Responses};
use crate::protocol::tags::{backend, frontend, split_cstr, status, target};
pub(crate) use crate::server::statements::ServerStatements;

/// ParseComplete.
pub(crate) const PARSE_COMPLETE: &[u8] = &[backend::PARSE_COMPLETE, 0, 0, 0, 4];
/// CloseComplete.
pub(crate) const CLOSE_COMPLETE: &[u8] = &[backend::CLOSE_COMPLETE, 0, 0, 0, 4];
/// ReadyForQuery, idle.
const READY_IDLE: &[u8] = &[backend::READY_FOR_QUERY, 0, 0, 0, 5, status::IDLE];
/// Flush.
const FLUSH: &[u8] = &[frontend::FLUSH, 0, 0, 0, 4];

/// The server-side name of statement `id`.
pub(crate) fn server_name(id: u64) -> String {
    format!("pgv_{id}")
}

/// A statement a client prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StmtDef {
    /// The shared statement, or (until the server described it) the client's fresh Parse.
    pub id: u64,
    /// Query text, parameter count and types, as in the Parse message after its name.
    pub(crate) def: Bytes,
    /// The definition every server Parse of the shared statement uses (parameter types as
    /// described); None until described.
    server_def: Option<Bytes>,
}

/// A client's statements, and what it needs to rewrite its messages.
#[derive(Debug)]
pub(crate) struct ClientStatements {
    /// By the client's name.
    pub(crate) by_name: crate::FastMap<Vec<u8>, StmtDef>,
    /// The statement last bound to the unnamed portal (for Execute).
    unnamed_portal: Option<u64>,
    /// Proxy-wide shared statements.
    registry: Arc<Registry>,
    /// The client's pool (see [`scope`]): statements are shared within it.
    scope: u64,
    /// `max_prepared_statements` per server connection.
    cap: usize,
    /// The client's last message was a Parse of (client name, id): its Describe is due, the
    /// client's own if the next message is one.
    describe_due: Option<(Vec<u8>, u64)>,
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
        for b in self.responses.push(e, self.conn) {
            self.client.put_slice(b);
        }
    }
}

/// Where a statement is on the server connection.
enum Placed {
    /// Prepared before, under this name.
    Ready(u64),
    /// Parse just injected under this name: a Describe must follow.
    Parsed(u64),
    /// Not prepared here, and its plan changed result type: the client is told so.
    Changed,
}

/// A server name no statement has (ids start at 1): a Bind or Describe of it fails.
const NO_STATEMENT: u64 = 0;

impl ClientStatements {
    /// Statements of a new client session of pool `scope`.
    pub(crate) fn new(registry: Arc<Registry>, cap: usize, scope: u64) -> Self {
        Self {
            by_name: Default::default(),
            unnamed_portal: None,
            registry,
            scope,
            cap,
            describe_due: None,
        }
    }

    /// Makes sure the server connection has `def` prepared, injecting Close/Parse as needed.
    fn ensure(&self, def: &StmtDef, out: &mut Outputs<'_>) -> Placed {
        if let Some(name) = out.conn.touch(def.id) {
            return Placed::Ready(name);
        }
        if def.server_def.is_some() && self.registry.changed(def.id) {
            return Placed::Changed;
        }
        let text = def.server_def.as_ref().unwrap_or(&def.def);
        self.prepare(def.id, text, Expect::SwallowParse(def.id), out);
        Placed::Parsed(def.id)
    }

    /// Sends a Parse of `def` as statement `id` (closing a stale copy and the least recently
    /// used statement first, when needed), expecting `expect` for it.
    fn prepare(&self, id: u64, def: &[u8], expect: Expect, out: &mut Outputs<'_>) {
        if let Some(name) = out.conn.take_stale(id) {
            close_message(name, out.server);
            out.expect(Expect::SwallowClose(name));
        }
        if out.conn.unclose(id) {
            close_message(id, out.server);
            out.expect(Expect::SwallowClose(id));
        }
        if let Some(evicted) = out.conn.insert(id, self.cap) {
            close_message(evicted, out.server);
            out.expect(Expect::SwallowClose(evicted));
        }
        parse_message(id, def, out.server);
        out.expect(expect);
    }

    /// Whether client message `msg` (a Bind or Describe) uses a shared statement that must be
    /// prepared on this server connection first: if so, its Parse and a Describe are sent
    /// with a Flush, and the caller holds `msg` (and what follows) back until the answer says
    /// whether the copy describes as the statement did (see [`ClientStatements::settle`]):
    /// a client never gets rows of other columns than it was told.
    pub(crate) fn verify_first(&self, msg: &[u8], out: &mut Outputs<'_>) -> bool {
        let body = &msg[5..];
        let name = match msg[0] {
            frontend::BIND => split_cstr(body).and_then(|(_, rest)| split_cstr(rest)).map(|(n, _)| n),
            frontend::DESCRIBE if body.first() == Some(&target::STATEMENT) => split_cstr(&body[1..]).map(|(n, _)| n),
            _ => None,
        };
        let Some(def) = name.filter(|n| !n.is_empty()).and_then(|n| self.by_name.get(n)) else {
            return false;
        };
        let Some(server_def) = def.server_def.as_ref() else {
            return false; // parsed afresh where it is used: nothing to check
        };
        if out.conn.touch(def.id).is_some() || self.registry.changed(def.id) {
            return false;
        }
        self.prepare(def.id, server_def, Expect::SwallowParse(def.id), out);
        Self::probe(def.id, out);
        out.server.put_slice(FLUSH);
        true
    }

    /// A Describe of `id` (just parsed) the proxy sends itself, its answers dropped.
    fn probe(id: u64, out: &mut Outputs<'_>) {
        describe_message(id, out.server);
        out.expect(Expect::Probe { id, forward: false });
    }

    /// At the start of a relay (before the first client message that gets an answer): closes
    /// copies of statements no client uses any more, and names left to close.
    pub(crate) fn tidy(&self, out: &mut Outputs<'_>) {
        self.registry.sweep(out.conn);
        if out.conn.has_closing() {
            for name in out.conn.take_closing() {
                close_message(name, out.server);
                out.expect(Expect::SwallowClose(name));
            }
        }
    }

    /// Handles one whole client message (header included) in transaction mode.
    pub(crate) fn on_client(&mut self, msg: Bytes, out: &mut Outputs<'_>) {
        let body = &msg[5..];
        let statement = body.first() == Some(&target::STATEMENT);
        let mut observe = None;
        if let Some((name, id)) = self.describe_due.take() {
            let describes_it = msg[0] == frontend::DESCRIBE
                && statement
                && split_cstr(&body[1..]).is_some_and(|(n, _)| n == &name[..]);
            if describes_it {
                observe = Some(id);
            } else {
                Self::probe(id, out);
            }
        }
        match msg[0] {
            frontend::PARSE => self.on_parse(msg.clone(), body, out),
            frontend::BIND => self.on_bind(msg.clone(), body, out),
            frontend::DESCRIBE => self.on_describe(&msg, body, observe, out),
            frontend::CLOSE if statement && body.len() > 2 => {
                if let Some((name, _)) = split_cstr(&body[1..]) {
                    if let Some(old) = self.by_name.remove(name) {
                        self.release(old);
                    }
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

    /// A Describe: of a tracked statement, renamed (and the statement's shape learnt from the
    /// answer when it was just parsed: `observe`, or parsed here now).
    fn on_describe(&mut self, msg: &[u8], body: &[u8], observe: Option<u64>, out: &mut Outputs<'_>) {
        let statement = body.first() == Some(&target::STATEMENT);
        let def = (statement && body.len() > 2)
            .then(|| split_cstr(&body[1..]).and_then(|(n, _)| self.by_name.get(n)))
            .flatten()
            .cloned();
        let Some(def) = def else {
            out.server.put_slice(msg);
            out.expect(if statement {
                Expect::DescribeStatement(None)
            } else {
                Expect::DescribePortal
            });
            return;
        };
        let (name, expect) = match self.ensure(&def, out) {
            Placed::Ready(name) => match observe {
                Some(id) => (name, Expect::Probe { id, forward: true }),
                None => (name, Expect::DescribeStatement(Some(def.id))),
            },
            Placed::Parsed(name) => (
                name,
                Expect::Probe {
                    id: def.id,
                    forward: true,
                },
            ),
            Placed::Changed => (NO_STATEMENT, Expect::Fail),
        };
        describe_message(name, out.server);
        out.expect(expect);
    }

    /// A named Parse always reaches the server, as a new statement: what it describes as
    /// decides which shared statement the client gets (see the module doc).
    fn on_parse(&mut self, msg: Bytes, body: &[u8], out: &mut Outputs<'_>) {
        let Some((name, def)) = split_cstr(body).filter(|(name, _)| !name.is_empty()) else {
            out.server.put_slice(&msg);
            out.expect(Expect::Parse(None));
            return;
        };
        let def = msg.slice_ref(def);
        let id = self.registry.fresh_id();
        self.prepare(id, &def, Expect::Parse(Some(id)), out);
        let stmt = StmtDef {
            id,
            def,
            server_def: None,
        };
        if let Some(old) = self.by_name.insert(name.to_vec(), stmt) {
            self.release(old);
        }
        self.describe_due = Some((name.to_vec(), id));
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
        let (name, expect) = match self.ensure(&def, out) {
            Placed::Ready(name) => (name, Expect::Bind(Some(def.id))),
            Placed::Parsed(name) => {
                Self::probe(def.id, out);
                (name, Expect::Bind(Some(def.id)))
            }
            Placed::Changed => (NO_STATEMENT, Expect::Fail),
        };
        let name = server_name(name);
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
        out.expect(expect);
    }

    /// The client no longer uses `old`.
    fn release(&self, old: StmtDef) {
        if old.server_def.is_some() {
            self.registry.release([old.id]);
        }
    }

    /// The relay ends: each statement the server described after a fresh Parse joins a
    /// shared statement (the same text described the same) or becomes one; a copy prepared
    /// for a shared statement that described otherwise, or whose plan changed its result
    /// type, is not used again.
    pub(crate) fn settle(&mut self, responses: &mut Responses, conn: &mut ServerStatements) {
        for (id, shape) in responses.probed.drain(..) {
            let user = self.by_name.values().find(|s| s.id == id);
            match user.map(|s| (s.server_def.is_none(), s.def.clone())) {
                Some((true, def)) => {
                    let refs = self.by_name.values().filter(|s| s.id == id).count() as u32;
                    let (shared, server_def) = self.registry.resolve(self.scope, &def, id, shape, refs);
                    for s in self.by_name.values_mut().filter(|s| s.id == id) {
                        s.id = shared;
                        s.server_def = Some(server_def.clone());
                    }
                    if self.unnamed_portal == Some(id) {
                        self.unnamed_portal = Some(shared);
                    }
                    conn.resolve(id, shared);
                }
                _ => match self.registry.shape_matches(id, &shape) {
                    Some(true) => {}
                    Some(false) => {
                        tracing::debug!(id, "a copy of a shared statement described otherwise");
                        conn.mark_stale(id);
                        self.registry.mark_changed(id);
                    }
                    // Closed by its client meanwhile.
                    None => conn.discard(id),
                },
            }
        }
        for id in responses.stale.drain(..) {
            self.registry.mark_changed(id);
        }
    }

    /// The relay ended: a Describe due after a Parse is not sent on the next relay's server
    /// connection (the statement is parsed and described again where it is used).
    pub(crate) fn relay_ended(&mut self) {
        self.describe_due = None;
    }

    /// Answers, without a server connection, a batch that only prepares statements a server
    /// has already accepted: one or more named Parse messages, then Sync. `buf` holds the
    /// client's unread bytes; on success the batch is consumed and the answers (ParseComplete
    /// each, then ReadyForQuery 'I') are written to `answer`. Each such statement is parsed
    /// and described on the server when first used, as any client Parse is.
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
                    let def = Bytes::copy_from_slice(def);
                    if name.is_empty() || !self.registry.known(self.scope, &def) {
                        return false;
                    }
                    found.push((name.to_vec(), def));
                }
                frontend::SYNC if !found.is_empty() => {
                    for (name, def) in found {
                        let id = self.registry.fresh_id();
                        let stmt = StmtDef {
                            id,
                            def,
                            server_def: None,
                        };
                        if let Some(old) = self.by_name.insert(name, stmt) {
                            self.release(old);
                        }
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
        self.describe_due = None;
        self.release_all();
        conn.clear();
    }

    fn release_all(&mut self) {
        let ids: Vec<u64> = self
            .by_name
            .drain()
            .filter(|(_, s)| s.server_def.is_some())
            .map(|(_, s)| s.id)
            .collect();
        self.registry.release(ids);
    }
}

impl Drop for ClientStatements {
    /// The client is gone: the shared statements it used lose a user each.
    fn drop(&mut self) {
        self.release_all();
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

/// Builds a Close of server name `pgv_<name>`.
pub(crate) fn close_message(name: u64, out: &mut BytesMut) {
    named_message(frontend::CLOSE, name, out);
}

/// Builds a Describe of server name `pgv_<name>`.
fn describe_message(name: u64, out: &mut BytesMut) {
    named_message(frontend::DESCRIBE, name, out);
}

fn named_message(tag: u8, name: u64, out: &mut BytesMut) {
    let name = server_name(name);
    out.put_u8(tag);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(target::STATEMENT);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
#[path = "prepared_tests.rs"]
mod tests;

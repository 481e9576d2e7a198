//! The order of answers when statements are tracked (transaction mode): one [`Expect`] per
//! request sent to the server or answered by the proxy, popped as the server answers.
//!
//! Part of statement tracking (`client::prepared`). It drops the answers to what the proxy
//! injected, puts the proxy's own answers in their place, keeps the server connection's
//! statements true when a request fails, and collects the shapes the server described for
//! freshly parsed statements.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::registry::shape_of;
use crate::protocol::tags::backend;
use crate::server::statements::ServerStatements;

/// What the server will answer to one request, or what the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Query or FunctionCall: ends at ReadyForQuery.
    Query,
    /// Parse (of statement `id`, when named): ParseComplete.
    Parse(Option<u64>),
    /// Bind (of statement `id`, when named): BindComplete.
    Bind(Option<u64>),
    /// Describe statement (`id`, when tracked): ParameterDescription, then RowDescription or
    /// NoData.
    DescribeStatement(Option<u64>),
    /// Describe of statement `id` just parsed: its answers are the statement's shape,
    /// forwarded when the client asked for them (`forward`), dropped when the proxy did.
    Probe { id: u64, forward: bool },
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
    /// A Close of server name `pgv_<n>` the proxy injected: its CloseComplete is not
    /// forwarded.
    SwallowClose(u64),
    /// Where the client ended a COPY IN (CopyDone or CopyFail): no answer of its own.
    CopyEnd,
    /// A request sent to fail (a statement whose plan changed result type): the server's
    /// error is replaced by [`CACHED_PLAN_CHANGED`], and the server skips to Sync as it would.
    Fail,
}

/// ErrorResponse 0A000 "cached plan must not change result type", as PostgreSQL words it,
/// with the routine that raises it (drivers such as asyncpg recognise the error by it).
pub(crate) const CACHED_PLAN_CHANGED: &[u8] = b"E\0\0\0\x67SERROR\0VERROR\0C0A000\0\
    Mcached plan must not change result type\0Fplancache.c\0RRevalidateCachedQuery\0\0";

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
    /// Statements described after a fresh Parse: (id, shape), for the registry.
    pub(crate) probed: Vec<(u64, Bytes)>,
    /// Statements whose plan changed result type (0A000), not to be offered again.
    pub(crate) stale: Vec<u64>,
    /// The ParameterDescription of the Probe at the head, until its RowDescription comes.
    params: BytesMut,
    /// In COPY IN started by Execute: the server ignores Sync until CopyDone/CopyFail.
    copy_in: bool,
    /// An extended-protocol request failed and its Sync was not sent yet: the server skips
    /// every message until then, so those get no answer.
    skipping: bool,
    /// Syncs the server ignored (sent during COPY IN), not yet taken by the relay.
    pub(crate) ignored_syncs: u32,
}

impl Responses {
    /// Nothing outstanding and no COPY under way: it can serve the next relay as it is.
    pub(crate) fn is_idle(&self) -> bool {
        self.q.is_empty()
            && self.probed.is_empty()
            && self.stale.is_empty()
            && !self.copy_in
            && !self.skipping
            && self.ignored_syncs == 0
    }

    /// Nothing outstanding.
    #[inline]
    pub(crate) fn drained(&self) -> bool {
        self.q.is_empty()
    }

    /// Nothing outstanding, and statements described or gone stale to settle.
    #[inline]
    pub(crate) fn learnt(&self) -> bool {
        self.q.is_empty() && !(self.probed.is_empty() && self.stale.is_empty())
    }

    /// Adds a request; returns the proxy answers due now (when nothing is ahead of them).
    /// While the server skips to Sync, a request gets no answer: `conn` forgets what it
    /// would have prepared or closed.
    pub(crate) fn push(&mut self, e: Expect, conn: &mut ServerStatements) -> Vec<&'static [u8]> {
        match e {
            Expect::Sync if self.copy_in => {
                self.ignored_syncs += 1;
                return Vec::new();
            }
            Expect::Sync => self.skipping = false,
            Expect::CopyEnd => self.copy_in = false,
            _ if self.skipping => {
                skipped(e, conn);
                return Vec::new();
            }
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

    /// The proxy's own answers whose turn has come (taken off the queue).
    #[inline]
    fn due(&mut self) -> Vec<&'static [u8]> {
        // Runs for every server message and most have none due: no call then.
        if !matches!(self.q.front(), Some(Expect::Synthetic(_) | Expect::CopyEnd)) {
            return Vec::new();
        }
        self.due_now()
    }

    fn due_now(&mut self) -> Vec<&'static [u8]> {
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

    /// Accounts for one server message `msg` of type `tag` (`stale_plan` for an
    /// ErrorResponse saying a cached plan changed its result type), updating `conn`'s
    /// statements. `msg` is whole for the messages that end a request and for
    /// ParameterDescription.
    pub(crate) fn on_server(&mut self, tag: u8, msg: &[u8], stale_plan: bool, conn: &mut ServerStatements) -> OnServer {
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
            (Expect::DescribeStatement(_) | Expect::DescribePortal, backend::ROW_DESCRIPTION | backend::NO_DATA) => {
                (true, false)
            }
            (Expect::Probe { forward, .. }, backend::PARAMETER_DESCRIPTION) => {
                self.params.clear();
                self.params.extend_from_slice(msg);
                (false, !forward)
            }
            (Expect::Probe { id, forward }, backend::ROW_DESCRIPTION | backend::NO_DATA) => {
                self.probed.push((id, shape_of(&self.params, msg)));
                (true, !forward)
            }
            (
                Expect::Execute(_),
                backend::COMMAND_COMPLETE | backend::EMPTY_QUERY_RESPONSE | backend::PORTAL_SUSPENDED,
            ) => (true, false),
            (Expect::SwallowParse(_), backend::PARSE_COMPLETE) | (Expect::SwallowClose(_), backend::CLOSE_COMPLETE) => {
                (true, true)
            }
            // Not failing after all (a statement of that name was made by SQL PREPARE).
            (Expect::Fail, backend::BIND_COMPLETE | backend::ROW_DESCRIPTION | backend::NO_DATA) => (true, false),
            _ => (false, false),
        };
        if done {
            self.q.pop_front();
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
    /// When that Sync is not sent yet, requests added until it get no answer either.
    fn on_error(&mut self, head: Expect, stale_plan: bool, conn: &mut ServerStatements) -> OnServer {
        self.q.pop_front();
        let replaced = head == Expect::Fail;
        match head {
            Expect::Bind(Some(id)) | Expect::Execute(Some(id)) | Expect::DescribeStatement(Some(id)) if stale_plan => {
                conn.mark_stale(id);
                self.stale.push(id);
            }
            _ => skipped(head, conn),
        }
        // An injected Parse failing means the client's Bind/Describe after it fails too,
        // but the error is forwarded: the client sees the server's reason.
        if !matches!(head, Expect::Query | Expect::Sync) {
            loop {
                match self.q.front() {
                    Some(Expect::Sync) => break,
                    Some(&e) => {
                        skipped(e, conn);
                        self.q.pop_front();
                    }
                    None => {
                        self.skipping = true;
                        break;
                    }
                }
            }
        }
        let due = self.due();
        if replaced {
            OnServer::Swallow([&[CACHED_PLAN_CHANGED][..], &due].concat())
        } else {
            OnServer::Forward(due)
        }
    }
}

/// The server did not carry out request `e` (it failed, or was skipped after an error).
fn skipped(e: Expect, conn: &mut ServerStatements) {
    match e {
        Expect::Parse(Some(id)) | Expect::SwallowParse(id) => conn.remove(id),
        // The server still has it: closed before its name is used again.
        Expect::SwallowClose(name) => conn.close_later(name),
        _ => {}
    }
}

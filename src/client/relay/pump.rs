//! The relay's loop: one [`Relay`] per transaction (transaction mode) or session (session
//! mode), one path for every mode. Each round passes on what was read (client bytes to the
//! server, server bytes to the client, through the statement step), notes transaction ends,
//! re-arms the timeouts and checks whether the server connection can go back; then it waits
//! for whichever side is ready. The sockets are the loop's; everything else is the struct's.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::databases::Databases;
use super::session::Session;
use super::statements::{Statements, ToClient, ToServer, Tracked};
use super::timeouts::Timer;
use super::tracker::Tracker;
use super::write::{consumed, drain, ensure_space, forward, send, write_now};
use super::{Mode, RelayEnd, SessionError, HIGH_WATER, MAX_SERVER_MESSAGE};
use crate::client::conn::ClientConn;
use crate::error::PgError;
use crate::protocol::frame::MessageWalker;
use crate::protocol::tags::status;
use crate::server::stream::TryWrite;
use crate::server::{Recover, ServerConn};
use crate::shutdown::{Phase, PhaseWatch};

/// How the relay ended, or the error it ended with.
pub(super) type End = Result<RelayEnd, SessionError>;

/// One round's outcome: go on (`Ok`), or end the relay (`Err`).
type Round = Result<(), End>;

/// The state of one relay.
pub(super) struct Relay<'m> {
    /// Client bytes read and not yet passed on.
    c_in: BytesMut,
    /// Server bytes read and not yet passed on.
    s_in: BytesMut,
    /// Client bytes for the server, waiting for its socket.
    c_out: BytesMut,
    /// Server bytes (and the proxy's own answers) for the client, waiting for its socket.
    s_out: BytesMut,
    /// The client's message headers.
    cwalk: MessageWalker,
    /// The server's message headers.
    swalk: MessageWalker,
    /// What the headers say of the server connection's state.
    t: Tracker,
    /// Statements as they came, or renamed.
    statements: Statements<'m>,
    /// Pins, transaction ends, stats, reported parameters, cancel explanations.
    session: Session<'m>,
    /// Holds on databases that statements in flight need to themselves.
    databases: Databases<'m>,
    /// The timeouts, when any is set.
    timer: Option<Timer<'m>>,
    /// Shutdown.
    phase: &'m mut PhaseWatch,
    /// The shutdown phase last seen.
    now: Phase,
    /// A takeover's handoff (transaction mode): once begun, a pinned session ends at rest, as
    /// when draining (the phase bell rings when it begins).
    handoff: Option<&'m crate::client::Handoff>,
    /// The server connection failed.
    server_broken: bool,
    /// What to tell the client when a timeout or a verdict ended the relay.
    error: Option<PgError>,
    /// Where the last statement's text is kept between relays.
    last_sql: &'m mut Vec<u8>,
}

impl<'m> Relay<'m> {
    /// A relay between `client` and `server`, taking their unread bytes (and the server
    /// connection's statements); `mode` is borrowed apart here, once, for the relay's parts.
    pub(super) fn new(
        client: &mut ClientConn,
        server: &mut ServerConn,
        phase: &'m mut PhaseWatch,
        (max_client_message, cancel): (usize, &'m crate::cancel::CancelTarget),
        mode: &'m mut Mode,
    ) -> Self {
        let Mode {
            transaction,
            pinned,
            who,
            pins,
            timeouts,
            reject,
            reported,
            track,
            readback,
            statements,
            session,
            stats,
            reuse,
            given_pid,
            gate,
            db_statements,
            pinning,
            last_sql,
            handoff,
        } = mode;
        let who: &'m str = who;
        let mut t = Tracker::new(
            server.status,
            *transaction && pinned.is_none(),
            *pinned,
            statements.is_none(),
        );
        (t.tally.server_assignments, t.readback) = (1, std::mem::take(readback));
        t.extra.clone_from(track);
        (t.server_pid, t.last_sql) = (server.pid, std::mem::take(last_sql));
        t.notify = (*transaction && server.pid != *given_pid).then_some((server.pid, *given_pid));
        let databases = Databases::new(gate.as_deref(), db_statements, &mut t);
        let tracked = statements.is_some();
        let statements = match statements {
            Some(st) => {
                let conn = std::mem::take(&mut server.prepared);
                Statements::Tracked(Tracked::new(st, reuse, conn, *reject, max_client_message))
            }
            None => Statements::Plain,
        };
        Relay {
            c_in: std::mem::take(&mut client.rbuf),
            s_in: std::mem::take(&mut server.rbuf),
            c_out: BytesMut::new(),
            s_out: BytesMut::new(),
            cwalk: MessageWalker::new(max_client_message),
            swalk: MessageWalker::new(MAX_SERVER_MESSAGE),
            t,
            statements,
            session: Session {
                transaction: *transaction,
                pinned,
                who,
                pins,
                reported: (*transaction || tracked).then_some(reported),
                readback,
                info: session.as_deref(),
                stats: stats.as_mut(),
                pinning: pinning.as_mut(),
            },
            databases,
            timer: Timer::new(timeouts, Some(cancel), who),
            now: phase.now(),
            handoff: handoff.as_deref(),
            phase,
            server_broken: false,
            error: None,
            last_sql,
        }
    }

    /// Relays until one side ends, shutdown says so, a timeout or a verdict ends the session,
    /// or (transaction mode) the server connection is idle again.
    ///
    /// Per round trip the loop waits twice (client readable, server readable): what is read
    /// is written to the other side at once when the socket takes it, and only waits
    /// otherwise.
    pub(super) async fn run<CR, CW, SR, SW>(&mut self, (mut cr, mut cw): (CR, CW), (mut sr, mut sw): (SR, SW)) -> End
    where
        CR: AsyncRead + Unpin,
        CW: AsyncWrite + TryWrite + Unpin,
        SR: AsyncRead + Unpin,
        SW: AsyncWrite + TryWrite + Unpin,
    {
        let info = self.session.info;
        let mut verdict = std::pin::pin!(async move {
            match info {
                Some(s) => s.verdict.wait().await,
                None => std::future::pending().await,
            }
        });
        let (mut c_new, mut s_new) = (!self.c_in.is_empty(), !self.s_in.is_empty());
        loop {
            if let Err(end) = self.round(c_new, s_new, &cw, &sw) {
                return end;
            }
            (c_new, s_new) = (false, false);
            ensure_space(&mut self.c_in);
            ensure_space(&mut self.s_in);
            // TLS records written into a stream whose socket was full (never over plain sockets).
            let client_backlog = self.s_out.is_empty() && cw.backlog();
            let server_backlog = self.c_out.is_empty() && sw.backlog();
            tokio::select! {
                // Shutdown first, so a session that streams without pause still sees it.
                biased;
                p = self.phase.changed(), if self.now != Phase::Stopped => self.now = p,
                () = Timer::fired(&mut self.timer), if self.timer.as_ref().is_some_and(Timer::armed) => {
                    if let Some(e) = self.timer.as_mut().and_then(Timer::expired) {
                        return self.ended_by(e);
                    }
                },
                e = &mut verdict, if info.is_some() => return self.ended_by(e),
                r = cr.read_buf(&mut self.c_in), if !self.t.terminate && self.c_out.len() < HIGH_WATER => match r {
                    Ok(n) if n > 0 => {
                        c_new = true;
                        self.t.tally.received += n as u64;
                    }
                    _ => return Ok(RelayEnd::ClientDone),
                },
                r = sr.read_buf(&mut self.s_in), if self.s_out.len() < HIGH_WATER => match r {
                    Ok(n) if n > 0 => {
                        s_new = true;
                        self.t.tally.sent += n as u64;
                    }
                    _ => return self.server_gone(),
                },
                r = drain(&mut sw, &self.c_out), if !self.c_out.is_empty() || server_backlog => match r {
                    Ok(n) => consumed(&mut self.c_out, n),
                    Err(()) => return self.server_gone(),
                },
                r = drain(&mut cw, &self.s_out), if !self.s_out.is_empty() || client_backlog => match r {
                    Ok(n) => consumed(&mut self.s_out, n),
                    Err(()) => return Ok(RelayEnd::ClientDone),
                },
            }
        }
    }

    /// Everything between two waits: passes on what was read (`c_new`, `s_new`: the client,
    /// the server sent something), notes transaction ends, re-arms the timeouts, and ends the
    /// relay when the client left, shutdown says so or the server connection can go back.
    #[inline]
    fn round(&mut self, c_new: bool, s_new: bool, cw: &impl TryWrite, sw: &impl TryWrite) -> Round {
        if c_new {
            self.client_bytes(cw, sw)?;
        }
        if s_new {
            self.server_bytes(cw)?;
            if self.t.deadlock.is_some() {
                self.session.deadlock(&mut self.t);
            }
            self.databases.answered(&self.t);
            if self.statements.resumable() {
                self.client_bytes(cw, sw)?;
            }
        }
        self.session.transactions_ended(&mut self.t);
        self.statements.ignored_syncs(&mut self.t);
        if self.t.terminate && self.c_out.is_empty() {
            return Err(Ok(RelayEnd::ClientDone));
        }
        if let Some(timer) = self.timer.as_mut() {
            timer.rearm(&self.t, c_new);
        }
        match self.settled(cw, sw) {
            Some(end) => Err(Ok(end)),
            None => Ok(()),
        }
    }

    /// The client sent bytes: whole messages go on to the server as they came or renamed,
    /// pins are noted, and the proxy's own answers (renamed statements) go to the client.
    #[inline]
    fn client_bytes(&mut self, cw: &impl TryWrite, sw: &impl TryWrite) -> Round {
        let ready = self
            .statements
            .client(&mut self.c_in, &mut self.cwalk, &mut self.t, &mut self.s_out)
            .map_err(Err)?;
        self.session.note_pin(&self.t);
        if !self.t.needs.is_empty() {
            self.databases.raise(&mut self.t);
        }
        let (sent, renamed) = match ready {
            ToServer::Scanned(n) => (forward(&mut self.c_in, n, &mut self.c_out, sw), false),
            ToServer::Renamed(scratch) => (send(scratch, &mut self.c_out, sw), true),
        };
        if sent.is_err() {
            return Err(self.server_gone());
        }
        if renamed && write_now(cw, &mut self.s_out).is_err() {
            return Err(Ok(RelayEnd::ClientDone));
        }
        Ok(())
    }

    /// The server sent bytes: they go on to the client as they came, or with the answers to
    /// injected messages dropped and the proxy's own put in order (renamed statements).
    #[inline]
    fn server_bytes(&mut self, cw: &impl TryWrite) -> Round {
        self.session.explain_cancel(&mut self.s_in, self.swalk.pending());
        let ready = self.statements.server(
            &mut self.s_in,
            &mut self.s_out,
            &mut self.swalk,
            &mut self.t,
            self.session.reported.as_deref_mut(),
        );
        let sent = match ready {
            Ok(ToClient::Scanned(n)) => {
                self.t.own_notifications(&mut self.s_in[..n]);
                forward(&mut self.s_in, n, &mut self.s_out, cw)
            }
            Ok(ToClient::Queued) => write_now(cw, &mut self.s_out),
            Err(e) => {
                self.server_broken = true;
                return Err(Err(e));
            }
        };
        sent.map_err(|()| Ok(RelayEnd::ClientDone))
    }

    /// Whether the relay ends here: shutdown, or (transaction mode, not pinned) the
    /// transaction is over and the server connection at rest, so it can go back to the pool.
    #[inline]
    fn settled(&self, cw: &impl TryWrite, sw: &impl TryWrite) -> Option<RelayEnd> {
        let release_after_transaction = self.session.transaction && self.t.pin.is_none();
        // Pinned (it cannot move) during a takeover's handoff: it leaves as when draining. Only
        // a pinned transaction-mode session (handoff set, not released) looks.
        let leaving = !release_after_transaction && self.handoff.is_some_and(crate::client::Handoff::is_begun);
        if self.now == Phase::Running && !release_after_transaction && !leaving {
            return None;
        }
        let at_rest = self.at_rest(cw, sw);
        if self.now == Phase::Stopped || ((self.now == Phase::Draining || leaving) && at_rest) {
            return Some(RelayEnd::Shutdown);
        }
        (release_after_transaction && at_rest).then_some(RelayEnd::Idle)
    }

    /// Idle outside a transaction, nothing outstanding and nothing in flight either way.
    #[inline]
    fn at_rest(&self, cw: &impl TryWrite, sw: &impl TryWrite) -> bool {
        let t = &self.t;
        t.pending == 0
            && !t.unsynced
            && t.status == status::IDLE
            && self.s_out.is_empty()
            && self.s_in.is_empty()
            && self.c_in.is_empty()
            && self.c_out.is_empty()
            && self.statements.all_sent()
            && self.swalk.at_boundary()
            && self.cwalk.at_boundary()
            // The server waits for COPY data (the Syncs it ignores meanwhile do not count).
            && !t.copy
            // TLS records still held in a stream (never over plain sockets).
            && !cw.backlog()
            && !sw.backlog()
    }

    /// The server connection failed.
    fn server_gone(&mut self) -> End {
        self.server_broken = true;
        Ok(RelayEnd::ServerGone)
    }

    /// A timeout or a verdict ends the session with `e`.
    fn ended_by(&mut self, e: PgError) -> End {
        self.error = Some(e);
        Ok(RelayEnd::TimedOut)
    }

    /// Hands the unread bytes back (the relay keeps what is owed to the client), and what
    /// is known of the server connection: whether it may be reused as it is, or brought back
    /// to idle if the client is gone. Once, when the relay has ended.
    pub(super) fn finish(&mut self, client: &mut ClientConn, server: &mut ServerConn) {
        let t = &self.t;
        // Whole requests went to the server and whole answers came back: what is still due is
        // known, so a connection whose client left can be brought back to idle (transaction
        // mode). Its state is known outright ('?' otherwise) when nothing is due and nothing
        // unforwarded. (Renamed client messages not yet sent, after a protocol error, count
        // as unsent.)
        let framed = !t.unsynced
            && !t.copy
            && self.swalk.at_boundary()
            && self.cwalk.at_boundary()
            && self.c_out.is_empty()
            && self.statements.all_sent();
        let clean = framed && t.pending == 0 && self.s_out.is_empty() && self.s_in.is_empty();
        server.status = if clean { t.status } else { b'?' };
        // Idle since its last answer: check-in takes that time instead of reading the clock.
        server.answered_at = if clean { t.answered_at } else { None };
        server.recover = framed.then_some(Recover {
            answers_due: t.pending,
            status: t.status,
        });
        server.broken |= self.server_broken;
        self.session.finish(t);
        *self.last_sql = std::mem::take(&mut self.t.last_sql);
        self.databases.finish(&mut self.t);
        if let Statements::Tracked(tr) = std::mem::replace(&mut self.statements, Statements::Plain) {
            server.prepared = tr.finish();
        }
        server.rbuf = std::mem::take(&mut self.s_in);
        client.rbuf = std::mem::take(&mut self.c_in);
    }

    /// Server bytes read but not yet written to the client.
    pub(super) fn unsent(&self) -> &[u8] {
        &self.s_out
    }

    /// Type of the last message from the server.
    pub(super) fn last_server_tag(&self) -> u8 {
        self.t.last_server_tag
    }

    /// What a timeout or a verdict ended the relay with.
    pub(super) fn take_error(&mut self) -> Option<PgError> {
        self.error.take()
    }
}

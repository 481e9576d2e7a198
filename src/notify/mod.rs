//! LISTEN/NOTIFY for transaction-mode clients: one listening server connection per
//! (database, user), shared by every client listening there.
//!
//! Layer of `reload`/`locks` (uses `server` and the pool's budget; the client session uses
//! it). A transaction-mode client holds no server connection between transactions, so its
//! `LISTEN` cannot run on one. Instead the session subscribes here ([`Hub::join`],
//! [`Listener::listen`]): a task per (database, user) keeps one server connection outside the
//! pools, holding a lasting slot of the pool's budget (like the lock monitor's, see
//! `server::budget`), runs `LISTEN` when a channel's first subscriber comes and `UNLISTEN`
//! when its last one goes (channels are reference-counted), and hands every
//! NotificationResponse, in the order PostgreSQL sent them, to each subscriber of its channel
//! through a bounded queue. A subscriber whose queue is full (a client that does not read)
//! is dropped and told so ([`Listener::overflowed`]); the session then ends with an error.
//! With no channel left the connection is closed and its slot given back.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::protocol::tags::backend;
use crate::server::budget::{Budget, Hold};
use crate::server::{ServerConn, ServerTarget};

mod conn;

/// Notifications waiting for one client, at most.
pub(crate) const MAX_PENDING: usize = 1000;

/// Why a subscriber was dropped: 0 it was not, else one of the reasons below.
#[derive(Debug, Default)]
pub(crate) struct Overflow {
    why: AtomicU8,
    bell: Notify,
}

/// Its queue was full.
const FULL: u8 = 1;
/// The listening connection failed.
const LOST: u8 = 2;

impl Overflow {
    fn ring(&self, why: u8) {
        let _ = self.why.compare_exchange(0, why, Ordering::AcqRel, Ordering::Acquire);
        self.bell.notify_one();
    }
}

/// What the session asks the task of its (database, user).
enum Cmd {
    Listen {
        id: u64,
        channel: String,
        sub: Sub,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// One channel, or every one (None).
    Unlisten {
        id: u64,
        channel: Option<String>,
        reply: oneshot::Sender<()>,
    },
    Gone {
        id: u64,
    },
    /// A listening client (by the pid it was given) got the server connection of backend
    /// `pid`; after a barrier (see [`Listener::begin`]), answered then.
    Begin {
        pid: i32,
        given: i32,
        reply: oneshot::Sender<()>,
    },
    /// It is done with it (answered once recorded).
    End {
        pid: i32,
        given: i32,
        reply: oneshot::Sender<()>,
    },
}

/// A subscriber as the task sees it.
#[derive(Clone)]
struct Sub {
    tx: mpsc::Sender<Bytes>,
    overflow: Arc<Overflow>,
    /// The pid the client was given.
    given: i32,
}

/// The listening tasks, by (database, user) pool.
#[derive(Default)]
pub struct Hub {
    tasks: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Cmd>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hub")
    }
}

impl Hub {
    /// A listener for a session of the pool (`database`, `user`), whose connection is
    /// opened as `target` with a lasting slot of `budget` when it first listens.
    /// `given_pid`: the pid the client was given (its own notifications carry it).
    pub(crate) fn join(
        &self,
        database: &str,
        user: &str,
        target: ServerTarget,
        budget: Arc<Budget>,
        given_pid: i32,
    ) -> Listener {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let key = (database.to_string(), user.to_string());
        let cmds = match tasks.get(&key) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run(rx, target, budget));
                tasks.insert(key, tx.clone());
                tx
            }
        };
        let (tx, rx) = mpsc::channel(MAX_PENDING);
        Listener {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cmds,
            sub: Sub {
                tx,
                overflow: Arc::default(),
                given: given_pid,
            },
            rx,
            channels: BTreeSet::new(),
        }
    }
}

/// A session's subscriptions. Dropping it unsubscribes everything.
pub(crate) struct Listener {
    id: u64,
    cmds: mpsc::UnboundedSender<Cmd>,
    sub: Sub,
    rx: mpsc::Receiver<Bytes>,
    channels: BTreeSet<String>,
}

impl Listener {
    /// Subscribes to `channel` (nothing when already subscribed).
    ///
    /// # Errors
    /// PostgreSQL's or the connection's failure, as a message for the client.
    pub(crate) async fn listen(&mut self, channel: &str) -> Result<(), String> {
        if self.channels.contains(channel) {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Cmd::Listen {
            id: self.id,
            channel: channel.to_string(),
            sub: self.sub.clone(),
            reply,
        };
        self.cmds
            .send(cmd)
            .map_err(|_| "pgvalve is shutting down".to_string())?;
        answer
            .await
            .map_err(|_| "pgvalve's listening connection is gone".to_string())??;
        self.channels.insert(channel.to_string());
        Ok(())
    }

    /// Unsubscribes from `channel`, or from every channel (None).
    pub(crate) async fn unlisten(&mut self, channel: Option<&str>) {
        match channel {
            Some(c) if !self.channels.remove(c) => return,
            Some(_) => {}
            None if self.channels.is_empty() => return,
            None => self.channels.clear(),
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Cmd::Unlisten {
            id: self.id,
            channel: channel.map(str::to_string),
            reply,
        };
        if self.cmds.send(cmd).is_ok() {
            let _ = answer.await;
        }
    }

    /// The client got the server connection of backend `pid` and is about to use it: waits
    /// while the task sends a barrier (an empty query) on the listening connection, and from
    /// its answer on takes notifications from `pid` as this client's own. PostgreSQL signals
    /// listeners when a transaction commits, before it answers, and a listening backend sends
    /// what it was signalled for before it answers its next query: whatever comes after the
    /// barrier's answer was committed after the client got the connection. Costs listening
    /// clients one round trip on the listening connection per transaction; nothing for a
    /// client listening to nothing.
    pub(crate) async fn begin(&self, pid: i32) {
        if self.channels.is_empty() {
            return;
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Cmd::Begin {
            pid,
            given: self.sub.given,
            reply,
        };
        if self.cmds.send(cmd).is_ok() {
            let _ = answer.await;
        }
    }

    /// The client is done with backend `pid`: waits while the task sends another barrier
    /// (its notifications committed until now come, as the client's own) and stops taking
    /// `pid`'s as the client's, so they never name it once another client has the connection.
    pub(crate) async fn end(&self, pid: i32) {
        if self.channels.is_empty() {
            return;
        }
        let (reply, answer) = oneshot::channel();
        let cmd = Cmd::End {
            pid,
            given: self.sub.given,
            reply,
        };
        if self.cmds.send(cmd).is_ok() {
            let _ = answer.await;
        }
    }

    /// The next notification waiting, if any.
    pub(crate) fn try_next(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }

    /// Waits for the next notification (pending forever while it listens to nothing); None
    /// once it was dropped (see [`Listener::dropped`]).
    pub(crate) async fn next(&mut self) -> Option<Bytes> {
        if self.channels.is_empty() {
            return std::future::pending().await;
        }
        let Listener { rx, sub, .. } = self;
        tokio::select! {
            m = rx.recv() => m,
            () = until_dropped(&sub.overflow) => None,
        }
    }

    /// Why it was dropped (its queue was full, or the listening connection failed), if it was.
    pub(crate) fn dropped(&self) -> Option<String> {
        match self.sub.overflow.why.load(Ordering::Acquire) {
            0 => None,
            FULL => Some(format!(
                "pgvalve: more than {MAX_PENDING} notifications were waiting for this client (it does not read them); it is disconnected"
            )),
            _ => Some("pgvalve: the connection listening for this client's notifications was lost; it is disconnected so that it knows it may have missed some".into()),
        }
    }

    /// Waits until it is dropped (see [`Listener::dropped`]).
    pub(crate) async fn until_dropped(&self) {
        until_dropped(&self.sub.overflow).await;
    }
}

/// Waits until `o` rings.
async fn until_dropped(o: &Overflow) {
    loop {
        let rung = o.bell.notified();
        if o.why.load(Ordering::Acquire) != 0 {
            return;
        }
        rung.await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if !self.channels.is_empty() {
            let _ = self.cmds.send(Cmd::Gone { id: self.id });
        }
    }
}

/// Channels and their subscribers, the task's state.
#[derive(Default)]
struct Subscriptions {
    channels: HashMap<String, HashMap<u64, Sub>>,
    /// Backends (by pid) in use by a listening client (by its given pid), see
    /// [`Listener::begin`]: their notifications are that client's own.
    owners: HashMap<i32, i32>,
}

impl Subscriptions {
    /// Hands a NotificationResponse to every subscriber of its channel; drops those whose
    /// queue is full. The channels left without subscribers are returned.
    fn deliver(&mut self, msg: Bytes) -> Vec<String> {
        let Some(channel) = conn::channel_of(&msg) else {
            return Vec::new();
        };
        let Some(subs) = self.channels.get_mut(&channel) else {
            return Vec::new();
        };
        let pid = msg.get(5..9).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let owner = pid.and_then(|p| self.owners.get(&p)).copied();
        let mut full = Vec::new();
        for (id, s) in subs.iter() {
            let m = if owner == Some(s.given) {
                let mut own = bytes::BytesMut::from(&msg[..]);
                own[5..9].copy_from_slice(&s.given.to_be_bytes());
                own.freeze()
            } else {
                msg.clone()
            };
            if s.tx.try_send(m).is_err() {
                full.push(*id);
            }
        }
        let mut empty = Vec::new();
        for id in full {
            if let Some(s) = self.channels.values().find_map(|m| m.get(&id)) {
                s.overflow.ring(FULL);
            }
            empty.extend(self.remove(id, None));
        }
        empty
    }

    /// Removes subscriber `id` from `channel` (None: from every one); the channels left empty.
    fn remove(&mut self, id: u64, channel: Option<&str>) -> Vec<String> {
        let mut empty = Vec::new();
        self.channels.retain(|c, subs| {
            if channel.is_none_or(|x| x == c) {
                subs.remove(&id);
            }
            if subs.is_empty() {
                empty.push(c.clone());
                false
            } else {
                true
            }
        });
        empty
    }
}

/// The task of one (database, user): commands from sessions, notifications from the server.
async fn run(mut cmds: mpsc::UnboundedReceiver<Cmd>, target: ServerTarget, budget: Arc<Budget>) {
    let mut subs = Subscriptions::default();
    let mut server: Option<ServerConn> = None;
    loop {
        let cmd = tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(c) => c,
                None => return,
            },
            frame = conn::next_frame(server.as_mut()) => {
                match frame {
                    Ok(f) if f.tag == backend::NOTIFICATION_RESPONSE => {
                        let empty = subs.deliver(f.bytes.freeze());
                        unlisten(&mut server, &mut subs, &empty).await;
                    }
                    Ok(_) => {}
                    Err(e) => lost(&mut server, &mut subs, &e),
                }
                continue;
            }
        };
        handle(cmd, &mut server, &mut subs, &target, &budget).await;
    }
}

/// One session's command.
async fn handle(
    cmd: Cmd,
    server: &mut Option<ServerConn>,
    subs: &mut Subscriptions,
    target: &ServerTarget,
    budget: &Arc<Budget>,
) {
    match cmd {
        Cmd::Listen {
            id,
            channel,
            sub,
            reply,
        } => {
            if !subs.channels.contains_key(&channel) {
                if let Err(e) = listen(server, subs, target, budget, &channel).await {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
            subs.channels.entry(channel).or_default().insert(id, sub);
            let _ = reply.send(Ok(()));
        }
        Cmd::Unlisten { id, channel, reply } => {
            let empty = subs.remove(id, channel.as_deref());
            unlisten(server, subs, &empty).await;
            let _ = reply.send(());
        }
        Cmd::Gone { id } => {
            let empty = subs.remove(id, None);
            unlisten(server, subs, &empty).await;
        }
        Cmd::Begin { pid, given, reply } => {
            barrier(server, subs).await;
            subs.owners.insert(pid, given);
            let _ = reply.send(());
        }
        Cmd::End { pid, given, reply } => {
            barrier(server, subs).await;
            if subs.owners.get(&pid) == Some(&given) {
                subs.owners.remove(&pid);
            }
            let _ = reply.send(());
        }
    }
}

/// An empty query on the listening connection: every notification committed before it was
/// sent has come (and is delivered) when it returns.
async fn barrier(server: &mut Option<ServerConn>, subs: &mut Subscriptions) {
    let Some(c) = server.as_mut() else {
        return;
    };
    let mut later = Vec::new();
    match conn::run_query(c, "", |m| later.push(m)).await {
        Ok(_) => {
            for m in later {
                let empty = subs.deliver(m);
                unlisten(server, subs, &empty).await;
            }
        }
        Err(e) => lost(server, subs, &e),
    }
}

/// `LISTEN channel` on the connection, opened first when there is none.
async fn listen(
    server: &mut Option<ServerConn>,
    subs: &mut Subscriptions,
    target: &ServerTarget,
    budget: &Arc<Budget>,
    channel: &str,
) -> Result<(), String> {
    if server.is_none() {
        let slot = budget
            .claim(Hold::Lasting, Some(target.connect_timeout))
            .await
            .map_err(|e| format!("pgvalve cannot open its listening connection: {e}"))?;
        let mut c = crate::server::connect(target)
            .await
            .map_err(|e| format!("pgvalve cannot open its listening connection: {e}"))?;
        c.slot = Some(slot);
        *server = Some(c);
    }
    let c = server.as_mut().expect("opened above");
    let sql = format!("LISTEN {}", quote_ident(channel));
    match conn::run_query(c, &sql, |m| drop(subs.deliver(m))).await {
        Ok(None) => Ok(()),
        Ok(Some(error)) => Err(error),
        Err(e) => {
            lost(server, subs, &e);
            Err(format!("pgvalve's listening connection failed: {e}"))
        }
    }
}

/// `UNLISTEN` of the channels no one listens to any more; closes the connection when none is
/// left.
async fn unlisten(server: &mut Option<ServerConn>, subs: &mut Subscriptions, empty: &[String]) {
    if empty.is_empty() {
        return;
    }
    if subs.channels.is_empty() {
        if let Some(mut c) = server.take() {
            c.terminate().await;
        }
        return;
    }
    let Some(c) = server.as_mut() else {
        return;
    };
    let sql: String = empty
        .iter()
        .map(|ch| format!("UNLISTEN {};", quote_ident(ch)))
        .collect();
    let mut later = Vec::new();
    if let Err(e) = conn::run_query(c, &sql, |m| later.push(m)).await {
        lost(server, subs, &e);
        return;
    }
    for m in later {
        subs.deliver(m);
    }
}

/// The listening connection failed: every subscriber would miss notifications, so each is
/// dropped (and its session ended, as for a full queue).
fn lost(server: &mut Option<ServerConn>, subs: &mut Subscriptions, e: &crate::server::ServerError) {
    tracing::warn!(error = %e, "listening connection lost; its listeners are disconnected");
    *server = None;
    subs.owners.clear();
    for (_, s) in subs.channels.drain().flat_map(|(_, m)| m) {
        s.overflow.ring(LOST);
    }
}

/// `"name"`, quoted as an identifier.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

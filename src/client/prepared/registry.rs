//! The proxy-wide registry of shared prepared statements (transaction mode).
//!
//! Part of statement tracking (`client::prepared`). A shared statement is a definition (the
//! query text and parameter types of a Parse) in one pool (database and user) together with
//! its *shape*: the parameter types and result columns PostgreSQL described for it when a
//! client parsed it. Two client statements share a server-side statement only when their
//! pool, text and the shape a fresh Parse gave them are the same, so a schema change that
//! changes what a text means (other parameter types, other result columns) starts a new
//! shared statement instead of serving the old one. A statement whose plan was seen to change
//! its result type is marked *changed* until a fresh Parse describes as it did again. Each
//! shared statement counts the client statements that use it; when none is left it dies,
//! and server connections close their copies lazily (see [`Registry::sweep`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};

use crate::server::statements::ServerStatements;

/// Shapes of one definition offered to new clients at once (a text that means different
/// things in two databases, or before and after a change some clients still use).
const SHAPES_PER_TEXT: usize = 4;
/// Deaths remembered for connections that have not looked yet; one further behind checks
/// each of its statements instead.
const DEATHS_KEPT: usize = 4096;

/// Which pool a statement is parsed in, and its definition.
type Key = (u64, Bytes);

/// One live shared statement.
#[derive(Debug)]
struct Shared {
    /// Client statements that use it.
    refs: u32,
    /// Its pool and definition as clients sent it.
    key: Key,
    /// ParameterDescription and RowDescription/NoData of a fresh Parse (table columns left out).
    shape: Bytes,
    /// The definition with the described parameter types, used for every server Parse of it.
    server_def: Bytes,
    /// Its plan changed result type since (PostgreSQL said so, or a copy described otherwise).
    changed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pool and definition → the live statements a fresh Parse may be matched with, oldest
    /// first.
    offered: crate::FastMap<Key, Vec<u64>>,
    /// Live shared statements by id.
    live: crate::FastMap<u64, Shared>,
    /// Ids of statements that died, the last ones: deaths `dead_base..` of the count.
    dead: VecDeque<u64>,
    dead_base: u64,
}

/// Proxy-wide: shared statements by id, and which a fresh Parse of a definition may join.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    /// Last id handed out (ids are never reused: a server name is never ambiguous).
    next: AtomicU64,
    /// Shared statements that died so far.
    deaths: AtomicU64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new id, for a client's Parse until its shape is known.
    pub(crate) fn fresh_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether a server accepted a Parse of `def` in pool `scope` and some client still uses
    /// it.
    pub fn known(&self, scope: u64, def: &Bytes) -> bool {
        self.lock().offered.contains_key(&(scope, def.clone()))
    }

    /// Client statements (`refs` of them) of pool `scope` parsed as `def` under provisional
    /// id `k` were described as `shape`: the shared statement they use from now on (an
    /// existing one of the same pool, definition and shape, else `k`), and its definition for
    /// server Parses. A changed statement described as it was is no longer changed.
    pub(crate) fn resolve(&self, scope: u64, def: &Bytes, k: u64, shape: Bytes, refs: u32) -> (u64, Bytes) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let key = (scope, def.clone());
        if let Some(ids) = inner.offered.get(&key) {
            for id in ids {
                if let Some(s) = inner.live.get_mut(id).filter(|s| s.shape == shape) {
                    s.refs += refs;
                    s.changed = false;
                    return (*id, s.server_def.clone());
                }
            }
        }
        let server_def = with_described_types(def, &shape);
        inner.live.insert(
            k,
            Shared {
                refs,
                key: key.clone(),
                shape,
                server_def: server_def.clone(),
                changed: false,
            },
        );
        let ids = inner.offered.entry(key).or_default();
        if !ids.is_empty() {
            tracing::debug!(id = k, "a fresh Parse described differently: new shared statement");
        }
        ids.push(k);
        if ids.len() > SHAPES_PER_TEXT {
            ids.remove(0); // still live for its clients; not offered to new ones
        }
        (k, server_def)
    }

    /// Whether shared statement `id` has `shape`; None when it is not live.
    pub(crate) fn shape_matches(&self, id: u64, shape: &[u8]) -> Option<bool> {
        self.lock().live.get(&id).map(|s| s.shape == shape)
    }

    /// Shared statement `id`'s plan changed result type (a copy said so, or described
    /// otherwise than it did): where no valid copy of it is prepared, its clients are told so
    /// (0A000) as PostgreSQL would, instead of getting a copy planned for other columns; a
    /// new client gets it only when its fresh Parse describes as it did.
    pub(crate) fn mark_changed(&self, id: u64) {
        if let Some(s) = self.lock().live.get_mut(&id) {
            s.changed = true;
        }
    }

    /// Whether shared statement `id` is marked changed.
    pub(crate) fn changed(&self, id: u64) -> bool {
        self.lock().live.get(&id).is_some_and(|s| s.changed)
    }

    /// Client statements stopped using shared statements `ids` (one each): those none uses
    /// any more die.
    pub(crate) fn release(&self, ids: impl IntoIterator<Item = u64>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_none() {
            return;
        }
        let mut inner = self.lock();
        for id in ids {
            let Some(s) = inner.live.get_mut(&id) else {
                continue;
            };
            s.refs = s.refs.saturating_sub(1);
            if s.refs > 0 {
                continue;
            }
            let key = s.key.clone();
            inner.live.remove(&id);
            unoffer(&mut inner, &key, id);
            inner.dead.push_back(id);
            if inner.dead.len() > DEATHS_KEPT {
                inner.dead.pop_front();
                inner.dead_base += 1;
            }
            self.deaths.fetch_add(1, Ordering::Release);
        }
    }

    /// Marks copies on `conn` of statements that died since it last looked, for closing.
    /// One atomic load when none died.
    #[inline]
    pub(crate) fn sweep(&self, conn: &mut ServerStatements) {
        let deaths = self.deaths.load(Ordering::Acquire);
        if conn.deaths_seen() == deaths {
            return;
        }
        if conn.is_empty() {
            conn.set_deaths_seen(deaths);
            return;
        }
        self.sweep_locked(conn);
    }

    fn sweep_locked(&self, conn: &mut ServerStatements) {
        let inner = self.lock();
        let deaths = self.deaths.load(Ordering::Acquire);
        let seen = conn.deaths_seen();
        if seen >= inner.dead_base && seen <= deaths {
            let from = (seen - inner.dead_base) as usize;
            let dead: crate::FastMap<u64, ()> = inner.dead.range(from..).map(|&id| (id, ())).collect();
            conn.sweep(|id| dead.contains_key(&id));
        } else {
            // Too far behind: every copy of a statement that is not live (including fresh
            // Parses not matched yet: they are parsed again when used) is closed.
            conn.sweep(|id| !inner.live.contains_key(&id));
        }
        conn.set_deaths_seen(deaths);
    }

    /// Live shared statements (for tests and stats).
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }
}

fn unoffer(inner: &mut Inner, key: &Key, id: u64) {
    if let Some(ids) = inner.offered.get_mut(key) {
        ids.retain(|&x| x != id);
        if ids.is_empty() {
            inner.offered.remove(key);
        }
    }
}

/// The scope of statements of pool (`database`, `user`): statements are shared within it.
pub(crate) fn scope(database: &str, user: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (database, user).hash(&mut h);
    h.finish()
}

/// The shape of a statement from the answers to a Describe of it: the ParameterDescription
/// message and the RowDescription (or NoData) message, whole, with each column's table and
/// column number zeroed (a table dropped and created again alike describes alike, and
/// PostgreSQL itself re-plans a statement on it without complaint).
pub(crate) fn shape_of(params: &[u8], row: &[u8]) -> Bytes {
    let mut s = BytesMut::with_capacity(params.len() + row.len());
    s.put_slice(params);
    let start = s.len();
    s.put_slice(row);
    if row.first() == Some(&crate::protocol::tags::backend::ROW_DESCRIPTION) {
        zero_table_columns(&mut s[start..]);
    }
    s.freeze()
}

/// Zeroes the table OID and column number of each field of a RowDescription (left as it is
/// when malformed).
fn zero_table_columns(row: &mut [u8]) {
    let Some(&[a, b]) = row.get(5..7) else {
        return;
    };
    let mut pos = 7;
    for _ in 0..u16::from_be_bytes([a, b]) {
        let Some(nul) = row.get(pos..).and_then(|r| r.iter().position(|&c| c == 0)) else {
            return;
        };
        let at = pos + nul + 1;
        let Some(ids) = row.get_mut(at..at + 6) else {
            return;
        };
        ids.fill(0);
        pos = at + 18;
    }
}

/// `def` (query, NUL, parameter count and types) with the parameter types `shape`'s
/// ParameterDescription gives: what PostgreSQL keeps for a statement once parsed, so every
/// copy on every server connection takes the parameters its clients were told it takes.
/// `def` as it is when either is malformed.
pub(crate) fn with_described_types(def: &Bytes, shape: &[u8]) -> Bytes {
    let Some(qend) = def.iter().position(|&c| c == 0) else {
        return def.clone();
    };
    let Some(&[a, b]) = shape.get(5..7) else {
        return def.clone();
    };
    let n = u16::from_be_bytes([a, b]) as usize;
    let Some(oids) = shape.get(7..7 + 4 * n) else {
        return def.clone();
    };
    let mut out = BytesMut::with_capacity(qend + 3 + oids.len());
    out.put_slice(&def[..=qend]);
    out.put_u16(n as u16);
    out.put_slice(oids);
    out.freeze()
}

//! Cluster-wide per-identity caps: an identity's `cluster_max_server_connections` as grants,
//! advisory locks its instances lease the way they lease seats.
//!
//! Part of the cluster coordination, beside the seats ([`super::table`]): the coordinator
//! runs [`round`] on each pg_locks snapshot. Grant `k` of an identity is the exclusive lock
//! `(class, base + k)`, `k` below the cap; an instance whose clients of the identity wait
//! holds the shared lock `(class, base + WANT)`. Admission caps the identity's server
//! connections in use at the grants this instance holds ([`IdentityGrants::set`]); a grant
//! is unlocked only after that cap was lowered and the count in use fell under it, so while
//! the coordination connection lives the cap holds exactly. docs/cluster.md, "Per-identity
//! caps", has the invariant and where it is approximate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio_postgres::Client;

use super::{lease, share};

/// First key of the grants' range (seats are below `LEASE_BASE` + budget, far under it).
pub const GRANT_BASE: i64 = 1_000_000_000;
/// Keys per identity: grants 0..255 and the want marker.
const PER_IDENTITY: i64 = 256;
/// The want marker's offset (shared lock).
const WANT: i32 = 255;
/// Identity hash bits: `GRANT_BASE + 2^22 * 256` stays below `i32::MAX`.
const HASH_BITS: u32 = 22;

/// The want marker, shared.
const WANT_SQL: &str = "SELECT pg_try_advisory_lock_shared($1::int4, $2::int4)";
const UNWANT_SQL: &str = "SELECT pg_advisory_unlock_shared($1::int4, $2::int4)";

/// One identity with a cluster-wide cap, as admission holds it on this instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The identity.
    pub identity: Arc<str>,
    /// Its cluster-wide cap.
    pub max: u32,
    /// Server connections it holds here.
    pub in_use: u32,
    /// Its clients waiting here.
    pub waiting: u32,
}

/// What the coordinator needs of admission (the proxy attaches it; cluster does not depend
/// on admission).
pub trait IdentityGrants: Send + Sync + std::fmt::Debug {
    /// Every identity with a cluster-wide cap.
    fn wants(&self) -> Vec<Want>;
    /// Lets `identity` hold `grants` here from now on; returns what it holds now.
    fn set(&self, identity: &str, grants: u32) -> u32;
}

/// The first key of `identity`'s grants (a stable hash: two identities whose hashes collide
/// share grants, which is stricter, never looser).
pub fn base(identity: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in identity.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let slot = i64::from(h & ((1 << HASH_BITS) - 1));
    i32::try_from(GRANT_BASE + slot * PER_IDENTITY).expect("invariant: below i32::MAX by HASH_BITS")
}

/// Who holds and who wants one identity's grants, from one snapshot.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Backend pid -> the grants it holds.
    pub held: BTreeMap<i32, BTreeSet<i32>>,
    /// Backend pids holding the want marker.
    pub wanters: BTreeSet<i32>,
}

/// Sorts `(key, pid)` of every granted advisory lock at or above [`GRANT_BASE`] by identity
/// base.
pub fn seen(locks: &[(i64, i32)]) -> BTreeMap<i32, Seen> {
    let mut out: BTreeMap<i32, Seen> = BTreeMap::new();
    for &(key, pid) in locks {
        let off = key - GRANT_BASE;
        let (Ok(base), Ok(k)) = (
            i32::try_from(GRANT_BASE + off / PER_IDENTITY * PER_IDENTITY),
            i32::try_from(off % PER_IDENTITY),
        ) else {
            continue;
        };
        let s = out.entry(base).or_default();
        if k == WANT {
            s.wanters.insert(pid);
        } else {
            s.held.entry(pid).or_default().insert(k);
        }
    }
    out
}

/// What one round does for one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What admission may let it hold here now (never above the valid grants held).
    pub cap: u32,
    /// Its share this round.
    pub target: u32,
    /// Grants to try to take (free ones, as many as the share allows).
    pub take: Vec<i32>,
}

/// This round's plan for one identity: `mine` the grants this instance (backend `me`) holds
/// and those it lost with its last coordination connection, `quiet` whether an instance was
/// seen gone within `takeover_delay` (then only its own lost grants are taken back), `turn`
/// which instance's turn it is to get the remainder of an even split ([`turn`]).
pub fn plan(
    me: i32,
    w: &Want,
    (mine, lost): (&BTreeSet<i32>, &BTreeSet<i32>),
    seen: &Seen,
    (quiet, turn): (bool, u64),
) -> Plan {
    let max = w.max as usize;
    let valid = mine.iter().filter(|k| (**k as usize) < max).count();
    let need = (w.in_use as usize + w.waiting as usize).min(max);
    let others: Vec<i32> = seen
        .held
        .keys()
        .chain(&seen.wanters)
        .copied()
        .filter(|p| *p != me)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let others_want = others.iter().any(|p| seen.wanters.contains(p));
    let held_by = |p: &i32| {
        seen.held
            .get(p)
            .map_or(0, |ks| ks.iter().filter(|k| (**k as usize) < max).count())
    };
    // In backend pid order, the same in every instance, turned by `turn` (the remainder of
    // an even split goes to the first, so each gets it in turn): a peer that wants is taken
    // to want the whole cap, one that does not to want what it holds.
    let mut demands: Vec<usize> = others
        .iter()
        .map(|p| if seen.wanters.contains(p) { max } else { held_by(p) })
        .collect();
    let n = others.len() + 1;
    let shift = usize::try_from(turn % n as u64).unwrap_or(0);
    demands.insert(others.iter().filter(|p| **p < me).count(), need);
    demands.rotate_left(shift);
    let mine_at = (others.iter().filter(|p| **p < me).count() + n - shift) % n;
    let mut target = share::max_min(&demands, max)[mine_at];
    if !others_want {
        // Nobody else is short: what it holds stays (its next transactions find it there).
        target = target.max(valid);
    }
    // Server connections in use beyond its grants (its coordination connection was lost, and
    // every grant with it) are covered first, by the very grants it lost when they are free:
    // those, and only those, it takes back even while an instance is seen gone (everyone
    // else leaves them alone for takeover_delay after seeing its old connection gone).
    let cover = (w.in_use as usize).min(max);
    let taken: BTreeSet<i32> = seen.held.values().flatten().chain(mine).copied().collect();
    let free = |k: &i32| (*k as usize) < max && !taken.contains(k);
    let mut take: Vec<i32> = lost.iter().copied().filter(free).collect();
    let goal = if quiet {
        cover.min(valid + take.len())
    } else {
        let mut others: Vec<i32> = (0..w.max as i32).filter(|k| free(k) && !lost.contains(k)).collect();
        fastrand::shuffle(&mut others);
        take.extend(others);
        target.max(cover)
    };
    take.truncate(goal.saturating_sub(valid));
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    Plan {
        cap: n(target.min(valid)),
        target: n(target),
        take,
    }
}

/// Seconds each instance keeps its turn at the remainder of an even split.
const TURN_SECS: u64 = 10;

/// Whose turn it is now: the same in every instance whose clock is right within seconds (a
/// moment of disagreement moves a grant twice, nothing more: grants stay exclusive).
pub fn turn() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_secs() / TURN_SECS)
}

/// The grants to give back when `in_use` are held under a cap of `cap`: those beyond the cap
/// first, then the highest.
pub fn to_release(mine: &BTreeSet<i32>, max: u32, cap: u32, in_use: u32) -> Vec<i32> {
    let keep = cap.max(in_use) as usize;
    let mut order: Vec<i32> = mine.iter().rev().copied().collect();
    order.sort_by_key(|k| (*k as u32) < max);
    order.into_iter().take(mine.len().saturating_sub(keep)).collect()
}

/// What this instance holds of one capped identity.
#[derive(Debug, Default)]
struct Mine {
    /// Grants held on the coordination connection.
    ks: BTreeSet<i32>,
    /// Grants held on the previous one, lost with it, while connections they covered remain.
    lost: BTreeSet<i32>,
    /// Whether it holds the want marker.
    wanting: bool,
}

/// What this instance holds of each capped identity. Kept across coordination connections:
/// when one is lost its grants become `lost` (see [`plan`]).
#[derive(Debug, Default)]
pub struct Held {
    ids: BTreeMap<Arc<str>, Mine>,
}

impl Held {
    /// The coordination connection is lost, and every grant and want marker with it.
    pub fn lose(&mut self) {
        for m in self.ids.values_mut() {
            let ks = std::mem::take(&mut m.ks);
            m.lost.extend(ks);
            m.wanting = false;
        }
    }
}

/// Every capped identity's part of one round: lower caps and give back, then take what the
/// shares allow and tell admission, then publish who wants.
pub async fn round(
    gate: &dyn IdentityGrants,
    client: &Client,
    (class, me): (i32, i32),
    locks: &[(i64, i32)],
    held: &mut Held,
    quiet: bool,
) -> Result<(), String> {
    let wants = gate.wants();
    let seen = seen(locks);
    let gone: Vec<Arc<str>> = held
        .ids
        .keys()
        .filter(|id| !wants.iter().any(|w| &w.identity == *id))
        .cloned()
        .collect();
    for id in gone {
        let m = held.ids.remove(&id).unwrap_or_default();
        let ks: Vec<i32> = m.ks.into_iter().collect();
        lease::unlock(client, (class, base(&id)), &ks).await?;
        if m.wanting {
            client
                .query(UNWANT_SQL, &[&class, &(base(&id) + WANT)])
                .await
                .map_err(text)?;
        }
    }
    for w in &wants {
        let b = base(&w.identity);
        let m = held.ids.entry(w.identity.clone()).or_default();
        let p = plan(
            me,
            w,
            (&m.ks, &m.lost),
            seen.get(&b).unwrap_or(&Seen::default()),
            (quiet, turn()),
        );
        let in_use = gate.set(&w.identity, p.cap);
        let back = to_release(&m.ks, w.max, p.cap, in_use);
        lease::unlock(client, (class, b), &back).await?;
        for k in &back {
            m.ks.remove(k);
        }
        let got = lease::take(client, (class, b), &p.take, lease::HELD_ELSEWHERE_SQL).await?;
        m.ks.extend(&got);
        let valid = m.ks.iter().filter(|k| (**k as u32) < w.max).count() as u32;
        if valid >= in_use {
            // Covered again: what was lost is nobody's concern of this instance any more.
            m.lost.clear();
        }
        gate.set(&w.identity, p.target.min(valid));
        let want = w.in_use + w.waiting > valid;
        if want != m.wanting {
            let sql = if want { WANT_SQL } else { UNWANT_SQL };
            client.query(sql, &[&class, &(b + WANT)]).await.map_err(text)?;
            m.wanting = want;
        }
    }
    Ok(())
}

fn text(e: tokio_postgres::Error) -> String {
    e.to_string()
}

/// Every capped identity may hold nothing here (the coordination connection is lost, and
/// every grant with it).
pub fn lose(gate: &dyn IdentityGrants, held: &mut Held) {
    held.lose();
    for w in gate.wants() {
        gate.set(&w.identity, 0);
    }
}

#[cfg(test)]
#[path = "grants_tests.rs"]
mod tests;

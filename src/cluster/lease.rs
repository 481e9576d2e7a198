//! Exclusive advisory locks of the cluster taken and given back on the coordination
//! connection: seat leases (free seats, and seats this instance's connections still sit on
//! after a lost coordination connection) and the grants of per-identity caps.
//!
//! Part of the cluster coordination ([`super::coord`] and [`super::grants`] decide which and
//! when). Keys are `base + k` in the cluster's lock class; each lock taken is checked in a
//! fresh pg_locks snapshot after it was granted, for coordination connections in another
//! database, and given back at once when someone else holds it too (docs/cluster.md, step 1).

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::Cluster;
use crate::server::seat::LEASE_BASE;

/// Seat `i`'s lease is key `LEASES + i`.
const LEASES: i32 = LEASE_BASE as i32;

/// Takes the locks it can of the keys asked for.
const LOCK_SQL: &str = "SELECT k FROM unnest($1::int4[]) AS t(k) WHERE pg_try_advisory_lock($2::int4, $3::int4 + k)";
/// Of the seats just leased, those someone else also leases (another database) or sits on.
const SEAT_TAKEN_SQL: &str = "SELECT k FROM unnest($1::int4[]) AS t(k) WHERE EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' AND objsubid = 2 AND classid::int8 = $2::int8 \
     AND (objid::int8 = k OR (objid::int8 = $3::int8 + k AND pid <> pg_backend_pid())))";
/// Of the keys just locked, those another session also holds (another database).
pub(super) const HELD_ELSEWHERE_SQL: &str =
    "SELECT k FROM unnest($1::int4[]) AS t(k) WHERE EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' AND objsubid = 2 AND classid::int8 = $2::int8 \
     AND objid::int8 = $3::int8 + k AND pid <> pg_backend_pid())";
/// Gives locks back.
const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($2::int4, $3::int4 + k) FROM unnest($1::int4[]) AS t(k)";

/// Leases up to `n` of the `free` seats (in random order, so instances racing for the same
/// seats rarely collide); returns those leased.
pub(super) async fn acquire(client: &Client, class: i32, free: &[i32], n: usize) -> Result<Vec<i32>, String> {
    if n == 0 || free.is_empty() {
        return Ok(Vec::new());
    }
    let mut want = free.to_vec();
    fastrand::shuffle(&mut want);
    want.truncate(n);
    take(client, (class, LEASES), &want, SEAT_TAKEN_SQL).await
}

/// Leases again `mine`, the seats this instance's connections still sit on that nobody
/// leases (their markers keep them from everyone else; a seat another instance leases
/// meanwhile is left alone), so those connections go on serving instead of closing as they
/// come back to their pools.
pub(super) async fn adopt(cl: &Cluster, client: &Client, mine: Vec<i32>) -> Result<(), String> {
    if mine.is_empty() {
        return Ok(());
    }
    let class = cl.settings.lock_class();
    for i in take(client, (class, LEASES), &mine, HELD_ELSEWHERE_SQL).await? {
        cl.table.lease(i);
        cl.root.grow();
        Cluster::count(&cl.counters.leased, 1);
    }
    Ok(())
}

/// Gives back seat leases.
pub(super) async fn unlease(client: &Client, class: i32, seats: &[i32]) -> Result<(), String> {
    unlock(client, (class, LEASES), seats).await
}

/// Takes the locks of `keys` (above `base`) it can, then gives back those `conflict` finds
/// held by someone else too; returns those kept.
pub(super) async fn take(
    client: &Client,
    (class, base): (i32, i32),
    keys: &[i32],
    conflict: &str,
) -> Result<Vec<i32>, String> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let e = |e: tokio_postgres::Error| e.to_string();
    let got: Vec<i32> = client
        .query(LOCK_SQL, &[&keys, &class, &base])
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if got.is_empty() {
        return Ok(got);
    }
    let bad: BTreeSet<i32> = client
        .query(conflict, &[&got, &i64::from(class), &i64::from(base)])
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let back: Vec<i32> = bad.iter().copied().collect();
    unlock(client, (class, base), &back).await?;
    Ok(got.into_iter().filter(|k| !bad.contains(k)).collect())
}

/// Gives back the locks of `keys` (above `base`).
pub(super) async fn unlock(client: &Client, (class, base): (i32, i32), keys: &[i32]) -> Result<(), String> {
    if !keys.is_empty() {
        client
            .query(UNLOCK_SQL, &[&keys, &class, &base])
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

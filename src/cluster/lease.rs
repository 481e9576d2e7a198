//! Leasing seats on the coordination connection: taking the lease locks of free seats, and
//! leasing again the seats this instance's connections still sit on after a lost
//! coordination connection.
//!
//! Part of the cluster coordination ([`super::coord`] decides which and when); each lease is
//! checked in a fresh pg_locks snapshot after it was granted, for coordination connections
//! in another database (docs/cluster.md, step 1).

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::Cluster;

/// Takes the lease locks it can of the seats asked for.
const LOCK_SQL: &str = "SELECT i FROM unnest($1::int4[]) AS t(i) WHERE pg_try_advisory_lock($2::int4, 1000000 + i)";
/// Of the seats just leased, those someone else also leases (another database) or sits on.
const CONFLICT_SQL: &str = "SELECT i FROM unnest($1::int4[]) AS t(i) WHERE EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' AND objsubid = 2 AND classid::int8 = $2::int8 \
     AND (objid::int8 = i OR (objid::int8 = 1000000 + i AND pid <> pg_backend_pid())))";
/// Of the seats just leased again (their markers are this instance's connections'), those
/// another coordination connection also leases (another database).
const LEASED_ELSEWHERE_SQL: &str = "SELECT i FROM unnest($1::int4[]) AS t(i) WHERE EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' AND objsubid = 2 AND classid::int8 = $2::int8 \
     AND objid::int8 = 1000000 + i AND pid <> pg_backend_pid())";
/// Gives leases back.
pub(super) const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($2::int4, 1000000 + i) FROM unnest($1::int4[]) AS t(i)";

/// Leases up to `n` of the `free` seats (in random order, so instances racing for the same
/// seats rarely collide); returns those leased.
pub(super) async fn acquire(client: &Client, class: i32, free: &[i32], n: usize) -> Result<Vec<i32>, String> {
    if n == 0 || free.is_empty() {
        return Ok(Vec::new());
    }
    let mut want = free.to_vec();
    fastrand::shuffle(&mut want);
    want.truncate(n);
    checked(client, class, &want, CONFLICT_SQL).await
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
    for i in checked(client, class, &mine, LEASED_ELSEWHERE_SQL).await? {
        cl.table.lease(i);
        cl.root.grow();
        Cluster::count(&cl.counters.leased, 1);
    }
    Ok(())
}

/// Takes the lease locks of `seats` it can, then gives back those `conflict` finds held by
/// someone else too; returns those leased.
async fn checked(client: &Client, class: i32, seats: &[i32], conflict: &str) -> Result<Vec<i32>, String> {
    let e = |e: tokio_postgres::Error| e.to_string();
    let got: Vec<i32> = client
        .query(LOCK_SQL, &[&seats, &class])
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if got.is_empty() {
        return Ok(got);
    }
    let bad: BTreeSet<i32> = client
        .query(conflict, &[&got, &i64::from(class)])
        .await
        .map_err(e)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !bad.is_empty() {
        let bad: Vec<i32> = bad.iter().copied().collect();
        client.query(UNLOCK_SQL, &[&bad, &class]).await.map_err(e)?;
    }
    Ok(got.into_iter().filter(|i| !bad.contains(i)).collect())
}

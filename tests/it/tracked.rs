//! Transaction mode: `SET search_path` (and `track_parameters`) follows its client from one
//! server connection to the next without pinning, and never reaches another client.

use std::time::Duration;

use pgvalve::config::PoolMode;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::*;

fn txn_setup(pool_size: u32, track: &[&str]) -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    let track: Vec<String> = track.iter().map(|s| s.to_string()).collect();
    move |f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = pool_size;
        f.pool.query_wait_timeout = Duration::from_secs(60);
        f.pool.track_parameters = track;
        // Every slot of the pool for the clients (tests/it/budget.rs).
        f.locks.enabled = false;
    }
}

/// The first column of the first row of a simple query.
async fn value(c: &Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_in_ten_schemas_on_five_connections_never_see_another_schema() {
    let s = Setup::new(txn_setup(5, &[])).await;
    let direct = connect(&s.pg.url()).await.unwrap();
    for k in 0..10 {
        direct
            .batch_execute(&format!("CREATE SCHEMA s{k}; CREATE TABLE s{k}.t (client int, n int)"))
            .await
            .unwrap();
    }
    drop(direct);
    let peak = s.sample_backends().await;
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let url = s.url();
            tokio::spawn(async move {
                let k = i % 10;
                let c = connect(&url).await.unwrap();
                // As django-tenants does: the schema is set once, then used on and on.
                c.batch_execute(&format!("SET search_path TO s{k}, public"))
                    .await
                    .unwrap();
                for j in 0..10 {
                    assert_eq!(
                        value(&c, "SELECT current_schema()").await,
                        format!("s{k}"),
                        "client {i}"
                    );
                    c.execute("INSERT INTO t VALUES ($1, $2)", &[&i, &j]).await.unwrap();
                    let mine: i64 = c
                        .query_one("SELECT count(*) FROM t WHERE client = $1", &[&i])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(mine, i64::from(j) + 1, "client {i} in s{k}");
                }
            })
        })
        .collect();
    for c in clients {
        within(Duration::from_secs(180), c).await.unwrap();
    }
    assert!(peak.stop().await <= 5, "more than 5 server connections");
    let direct = connect(&s.pg.url()).await.unwrap();
    for k in 0..10 {
        let rows = direct
            .query(&format!("SELECT client, count(*) FROM s{k}.t GROUP BY client"), &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), 10, "s{k}: ten clients");
        for r in rows {
            let (client, n): (i32, i64) = (r.get(0), r.get(1));
            assert_eq!(client % 10, k, "a row of client {client} in s{k}");
            assert_eq!(n, 10);
        }
    }
    let pins = s.proxy.shared().pins.total();
    assert_eq!(pins, 0, "pinned: {:?}", s.proxy.shared().pins.by_reason());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_set_local_rollback_reset_and_default_behave_as_in_postgres() {
    // One server connection: a and b take turns on it, so whatever a leaves would reach b.
    let s = Setup::new(txn_setup(1, &[])).await;
    let a = s.client().await;
    let b = s.client().await;
    let default = value(&b, "SHOW search_path").await;
    a.batch_execute("SET search_path TO s1, public").await.unwrap();
    for _ in 0..2 {
        assert_eq!(value(&a, "SHOW search_path").await, "s1, public");
        assert_eq!(value(&b, "SHOW search_path").await, default, "a's SET reached b");
    }
    // Undone by a rollback, or by an error in the same implicit transaction.
    a.batch_execute("BEGIN; SET search_path TO s2; ROLLBACK").await.unwrap();
    assert!(a.batch_execute("SET search_path TO s2; SELECT 1/0").await.is_err());
    assert_eq!(value(&b, "SHOW search_path").await, default);
    assert_eq!(value(&a, "SHOW search_path").await, "s1, public");
    // Transaction-scoped: SET LOCAL, set_config(..., true).
    let inside = a
        .simple_query("BEGIN; SET LOCAL search_path TO s3; SHOW search_path; COMMIT")
        .await
        .unwrap();
    assert!(inside
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("s3"))));
    assert_eq!(value(&a, "SHOW search_path").await, "s1, public");
    assert_eq!(value(&a, "SELECT set_config('search_path', 's4', true)").await, "s4");
    assert_eq!(value(&b, "SHOW search_path").await, default);
    assert_eq!(value(&a, "SHOW search_path").await, "s1, public");
    // set_config(..., false) is a SET; DEFAULT and RESET go back to the default.
    value(&a, "SELECT set_config('search_path', 's5', false)").await;
    assert_eq!(value(&b, "SHOW search_path").await, default);
    assert_eq!(value(&a, "SHOW search_path").await, "s5");
    a.batch_execute("SET search_path TO DEFAULT").await.unwrap();
    assert_eq!(value(&b, "SHOW search_path").await, default);
    assert_eq!(value(&a, "SHOW search_path").await, default);
    a.batch_execute("SET search_path = s6").await.unwrap();
    assert_eq!(value(&a, "SHOW search_path").await, "s6");
    a.batch_execute("RESET search_path").await.unwrap();
    assert_eq!(value(&b, "SHOW search_path").await, default);
    assert_eq!(value(&a, "SHOW search_path").await, default);
    assert_eq!(s.proxy.shared().pins.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn track_parameters_and_reset_all_follow_the_client() {
    let s = Setup::new(txn_setup(1, &["statement_timeout", "app.tenant"])).await;
    let a = connect(&format!("{}?application_name=alpha", s.url())).await.unwrap();
    let b = s.client().await;
    let q = "SELECT concat_ws('|', current_setting('statement_timeout'), current_setting('search_path'), \
             coalesce(current_setting('app.tenant', true), ''), current_setting('application_name'), \
             current_setting('work_mem'))";
    let b_sees = value(&b, q).await;
    assert_eq!(b_sees, "0|\"$user\", public|||4MB");
    a.batch_execute("SET statement_timeout = '1234ms'; SET app.tenant = 'acme'; SET search_path = x")
        .await
        .unwrap();
    // A named prepared statement that SETs: it runs again in later transactions.
    let st = a.prepare("SET app.tenant = 'globex'").await.unwrap();
    for _ in 0..2 {
        assert_eq!(value(&a, q).await, "1234ms|x|acme|alpha|4MB");
        assert_eq!(value(&b, q).await, b_sees, "a's parameters reached b");
    }
    a.execute(&st, &[]).await.unwrap();
    assert_eq!(value(&b, q).await, b_sees);
    assert_eq!(value(&a, q).await, "1234ms|x|globex|alpha|4MB");
    assert_eq!(s.proxy.shared().pins.total(), 0);
    // RESET ALL: back to the startup parameters (application_name stays alpha).
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(value(&b, q).await, b_sees);
    assert_eq!(value(&a, q).await, "0|\"$user\", public||alpha|4MB");
    a.batch_execute("RESET ALL; SET statement_timeout = '5s'")
        .await
        .unwrap();
    assert_eq!(value(&b, q).await, b_sees);
    assert_eq!(value(&a, q).await, "5s|\"$user\", public||alpha|4MB");
    assert_eq!(s.proxy.shared().pins.total(), 0);
    // A parameter not tracked pins, as before.
    a.batch_execute("SET work_mem = '8MB'").await.unwrap();
    assert_eq!(s.proxy.shared().pins.total(), 1, "work_mem is not tracked");
}

//! Transaction pooling: many clients on few server connections, nothing leaks between them.

use std::time::Duration;

use pgvalve::config::PoolMode;
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

type Param = dyn tokio_postgres::types::ToSql + Sync;

use crate::support::*;

fn first_value(msgs: &[SimpleQueryMessage]) -> String {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

fn txn_setup(pool_size: u32) -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    move |f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = pool_size;
        f.pool.query_wait_timeout = Duration::from_secs(30);
        // Every slot of the pool for the clients: the lock monitor's connection would hold one
        // (tests/it/budget.rs).
        f.locks.enabled = false;
        f.admin.stats_users.push("app".into());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_share_three_server_connections() {
    let s = Setup::new(txn_setup(3)).await;
    s.client()
        .await
        .batch_execute("CREATE TABLE t (client int, n int)")
        .await
        .unwrap();
    let su = s.pg.superuser().await.unwrap();
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let url = s.url();
            tokio::spawn(async move {
                let c = connect(&url).await.unwrap();
                for j in 0..10 {
                    let got = first_value(&c.simple_query(&format!("SELECT {i} * 1000 + {j}")).await.unwrap());
                    assert_eq!(
                        got,
                        (i * 1000 + j).to_string(),
                        "client {i} got another client's result"
                    );
                    c.batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({i}, {j}); COMMIT"))
                        .await
                        .unwrap();
                    // Extended protocol with an unnamed statement does not pin.
                    let row = c
                        .query_typed_one("SELECT $1::int + 1", &[(&(i * 1000 + j), Type::INT4)])
                        .await
                        .unwrap();
                    assert_eq!(row.get::<_, i32>(0), i * 1000 + j + 1);
                }
            })
        })
        .collect();
    for c in clients {
        within(Duration::from_secs(120), c).await.unwrap();
    }
    assert!(s.backends(&su).await <= 3);
    assert!(s.proxy.shared().pools.stats().iter().all(|p| p.open <= 3));
    let direct = connect(&s.pg.url()).await.unwrap();
    let n: i64 = direct.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 400);
    assert_eq!(s.proxy.shared().pins.total(), 0, "nothing here should pin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_and_never_leaks() {
    let s = Setup::new(txn_setup(2)).await;
    let a = s.client().await;
    a.batch_execute("SET statement_timeout = '1234ms'").await.unwrap();
    let a_pid = first_value(&a.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(
        first_value(&a.simple_query("SHOW statement_timeout").await.unwrap()),
        "1234ms"
    );
    assert_eq!(s.proxy.shared().pins.total(), 1);
    // Another client runs on the other server connection and sees nothing of it.
    let b = s.client().await;
    for _ in 0..5 {
        let msgs = b
            .simple_query("SELECT pg_backend_pid()::text, current_setting('statement_timeout')")
            .await
            .unwrap();
        let SimpleQueryMessage::Row(r) = &msgs[1] else {
            panic!("{msgs:?}")
        };
        assert_ne!(r.get(0).unwrap(), a_pid, "pinned connection handed to another client");
        assert_eq!(r.get(1), Some("0"));
    }
    // A's connection is reset when A leaves, then serves others.
    drop(a);
    drop(b);
    // Both connections back in the pool (A's after its reset), however loaded the machine.
    eventually(Duration::from_secs(10), "both server connections idle", || async {
        console(&s, "SHOW POOLS")
            .await
            .iter()
            .any(|r| r["database"] != "pgvalve" && r["sv_idle"] == "2")
    })
    .await;
    // Two clients inside transactions hold both server connections at once, so one of
    // them is A's (the pool reuses its last-returned connection first: sequential clients
    // could all get B's).
    let mut seen_a = false;
    for _ in 0..3 {
        let (c, d) = (s.client().await, s.client().await);
        for x in [&c, &d] {
            x.batch_execute("BEGIN").await.unwrap();
            let msgs = x
                .simple_query("SELECT pg_backend_pid()::text, current_setting('statement_timeout')")
                .await
                .unwrap();
            let SimpleQueryMessage::Row(r) = &msgs[1] else { panic!() };
            seen_a |= r.get(0) == Some(a_pid.as_str());
            assert_eq!(r.get(1), Some("0"), "SET leaked after the pinned session ended");
        }
        for x in [&c, &d] {
            x.batch_execute("COMMIT").await.unwrap();
        }
    }
    assert!(seen_a, "the pinned connection was not returned to the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_lock_and_temp_table_pin_and_are_cleaned_up() {
    let s = Setup::new(txn_setup(1)).await;
    let su = s.pg.superuser().await.unwrap();
    let a = s.client().await;
    a.batch_execute("SELECT pg_advisory_lock(7); CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    // Pinned: the temp table is still there in A's next transaction.
    assert_eq!(
        first_value(&a.simple_query("SELECT count(*) FROM scratch").await.unwrap()),
        "1"
    );
    drop(a);
    eventually(Duration::from_secs(5), "advisory lock released", || async {
        let n: i64 = su
            .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
    let b = s.client().await;
    assert_eq!(
        first_value(
            &b.simple_query("SELECT to_regclass('pg_temp.scratch') IS NULL")
                .await
                .unwrap()
        ),
        "t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_parameters_follow_the_client_across_server_connections() {
    let s = Setup::new(txn_setup(1)).await;
    let a = connect(&format!(
        "{}?application_name=alpha&options=-c%20work_mem%3D7MB",
        s.url()
    ))
    .await
    .unwrap();
    let b = connect(&format!("{}?application_name=beta", s.url())).await.unwrap();
    let q =
        "SELECT current_setting('application_name') || ' ' || current_setting('work_mem') || ' ' || pg_backend_pid()";
    let mut pids = std::collections::HashSet::new();
    for _ in 0..3 {
        let va = first_value(&a.simple_query(q).await.unwrap());
        let vb = first_value(&b.simple_query(q).await.unwrap());
        assert!(va.starts_with("alpha 7MB "), "{va}");
        assert!(vb.starts_with("beta 4MB "), "{vb}");
        pids.insert(va.rsplit(' ').next().unwrap().to_string());
        pids.insert(vb.rsplit(' ').next().unwrap().to_string());
    }
    assert_eq!(pids.len(), 1, "pool_size 1: one server connection served both");
}

async fn prepared_clients(s: &Setup, clients: i32, rounds: i32) {
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let url = s.url();
            tokio::spawn(async move {
                let c = connect(&url).await.unwrap();
                // tokio-postgres prepares every query() as a named statement (s0, s1, ...).
                let double = c.prepare("SELECT $1::int * 2").await.unwrap();
                let label = c.prepare("SELECT 'client-' || $1::text").await.unwrap();
                for j in 0..rounds {
                    let v: i32 = c.query_one(&double, &[&(i * 1000 + j)]).await.unwrap().get(0);
                    assert_eq!(v, (i * 1000 + j) * 2, "client {i} got another client's result");
                    let l: String = c.query_one(&label, &[&i.to_string()]).await.unwrap().get(0);
                    assert_eq!(l, format!("client-{i}"));
                    // A statement prepared and used once per round (Parse, Bind, Close).
                    let once: i64 = c
                        .query_one(&format!("SELECT {j}::bigint + $1"), &[&1i64])
                        .await
                        .unwrap()
                        .get(0);
                    assert_eq!(once, j as i64 + 1);
                }
            })
        })
        .collect();
    for t in tasks {
        within(Duration::from_secs(120), t).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_are_shared_without_pinning() {
    let s = Setup::new(txn_setup(3)).await;
    prepared_clients(&s, 30, 20).await;
    assert_eq!(s.proxy.shared().pins.total(), 0, "named statements pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_lru_churn_stays_correct() {
    let s = Setup::new(|f| {
        txn_setup(2)(f);
        f.pool.max_prepared_statements = 2;
    })
    .await;
    prepared_clients(&s, 10, 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_a_pipeline_keep_statements_in_order() {
    let s = Setup::new(txn_setup(1)).await;
    let c = s.client().await;
    let ok = c.prepare("SELECT $1::int + 100").await.unwrap();
    let bad = c.prepare("SELECT 1 / $1::int").await.unwrap();
    for round in 0..5 {
        // Three requests pipelined on one connection; the middle one fails.
        let (zero, next) = (0i32, round + 1);
        let p1: [&Param; 1] = [&round];
        let p2: [&Param; 1] = [&zero];
        let p3: [&Param; 1] = [&next];
        let (a, b, d) = tokio::join!(c.query_one(&ok, &p1), c.query_one(&bad, &p2), c.query_one(&ok, &p3));
        assert_eq!(a.unwrap().get::<_, i32>(0), round + 100);
        assert_eq!(code(&b.unwrap_err()).as_deref(), Some("22012"));
        assert_eq!(d.unwrap().get::<_, i32>(0), round + 101);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_plan_result_change_errors_once_then_works() {
    let s = Setup::new(txn_setup(1)).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE r (a int); INSERT INTO r VALUES (1)")
        .await
        .unwrap();
    let stmt = c.prepare("SELECT * FROM r").await.unwrap();
    assert_eq!(c.query(&stmt, &[]).await.unwrap().len(), 1);
    connect(&s.pg.url())
        .await
        .unwrap()
        .batch_execute("ALTER TABLE r ADD COLUMN b int")
        .await
        .unwrap();
    let e = c.query(&stmt, &[]).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("0A000"), "{e}");
    // Preparing it again (any client name, same text) works on the same server connection.
    let again = c.prepare("SELECT * FROM r").await.unwrap();
    let rows = c.query(&again, &[]).await.unwrap();
    assert_eq!(rows[0].len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_forgets_statements() {
    let s = Setup::new(txn_setup(1)).await;
    let c = s.client().await;
    let stmt = c.prepare("SELECT 42").await.unwrap();
    assert_eq!(c.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 42);
    c.batch_execute("DEALLOCATE ALL").await.unwrap();
    let e = c.query_one(&stmt, &[]).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("26000"), "as PostgreSQL would say: {e}");
    let again = c.prepare("SELECT 42").await.unwrap();
    assert_eq!(c.query_one(&again, &[]).await.unwrap().get::<_, i32>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_transaction_in_transaction_mode() {
    let s = Setup::new(txn_setup(1)).await;
    s.client().await.batch_execute("CREATE TABLE k (id int)").await.unwrap();
    // Killed while idle in its transaction, then while a query of its transaction runs: the
    // query is cancelled, the transaction rolled back, and the connection (the pool's only
    // one) serves the next client clean.
    for (i, tail) in ["", "; SELECT pg_sleep(30)"].into_iter().enumerate() {
        let (victim, task) = connect_killable(&s.url()).await;
        let pid = first_value(
            &victim
                .simple_query("BEGIN; INSERT INTO k VALUES (1); SELECT pg_backend_pid()")
                .await
                .unwrap(),
        );
        if tail.is_empty() {
            task.abort();
        } else {
            let q = tokio::spawn(async move {
                let _ = victim.simple_query(tail.trim_start_matches("; ")).await;
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            task.abort();
            q.abort();
        }
        let next = within(Duration::from_secs(5), s.client()).await;
        let msgs = within(
            Duration::from_secs(5),
            next.simple_query("SELECT (SELECT count(*) FROM k)::text, pg_backend_pid()::text, (pg_current_xact_id_if_assigned() IS NULL AND now() = statement_timestamp())::text"),
        )
        .await
        .unwrap();
        let SimpleQueryMessage::Row(r) = &msgs[1] else { panic!() };
        assert_eq!(r.get(0), Some("0"), "case {i}: an uncommitted insert became visible");
        assert_eq!(
            r.get(1),
            Some(pid.as_str()),
            "case {i}: the connection was rolled back and reused"
        );
        assert_eq!(
            r.get(2),
            Some("true"),
            "case {i}: the next client started inside an old transaction"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_all_protocols_in_transaction_mode() {
    let s = Setup::new(txn_setup(2)).await;
    // Eight clients on two server connections, the TPC-B-like read-write script.
    pgbench_all_modes(&s, &[]);
    assert_eq!(s.proxy.shared().pins.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_of_a_reported_parameter_follows_the_client_without_pinning() {
    // Django runs SET TIME ZONE right after connecting: that must not pin.
    let s = Setup::new(txn_setup(1)).await;
    let a = s.client().await;
    let b = s.client().await;
    a.batch_execute("SET TIME ZONE 'America/New_York'").await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            first_value(&a.simple_query("SHOW TimeZone").await.unwrap()),
            "America/New_York"
        );
        assert_ne!(
            first_value(&b.simple_query("SHOW TimeZone").await.unwrap()),
            "America/New_York",
            "SET leaked to b"
        );
    }
    // A SET inside a rolled-back transaction is undone, and so is what the proxy re-applies.
    a.batch_execute("BEGIN; SET TIME ZONE 'Asia/Tokyo'; ROLLBACK")
        .await
        .unwrap();
    assert_eq!(first_value(&b.simple_query("SELECT 1").await.unwrap()), "1");
    assert_eq!(
        first_value(&a.simple_query("SHOW TimeZone").await.unwrap()),
        "America/New_York"
    );
    assert_eq!(s.proxy.shared().pins.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_policy_fails_session_state_changes_with_a_hint() {
    let s = Setup::new(|f| {
        txn_setup(2)(f);
        f.pool.session_state = pgvalve::config::SessionStatePolicy::Reject;
    })
    .await;
    let c = s.client().await;
    let e = c.batch_execute("SET statement_timeout = '5s'").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "0A000");
    assert!(
        db.message().contains("SET is not allowed in transaction pooling mode"),
        "{}",
        db.message()
    );
    assert!(db.hint().is_some_and(|h| h.contains("SET LOCAL")));
    // Inside a transaction the error fails the transaction, as PostgreSQL would.
    c.batch_execute("BEGIN").await.unwrap();
    assert!(c.batch_execute("SELECT pg_advisory_lock(1)").await.is_err());
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("25P02"), "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    // SET LOCAL is fine, nothing was pinned, and the session goes on.
    c.batch_execute("BEGIN; SET LOCAL statement_timeout = '5s'; COMMIT")
        .await
        .unwrap();
    assert_eq!(
        first_value(&c.simple_query("SHOW statement_timeout").await.unwrap()),
        "0"
    );
    assert_eq!(s.proxy.shared().pins.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_both_ways_and_psql_in_transaction_mode() {
    use futures_util::{SinkExt, StreamExt};
    let s = Setup::new(txn_setup(2)).await;
    let c = s.client().await;
    c.batch_execute("CREATE TABLE cp (id int, v text)").await.unwrap();
    // tokio-postgres runs COPY through the extended protocol with a named statement.
    let sink = c.copy_in("COPY cp FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..20 {
        let chunk: String = (0..500).map(|j| format!("{}\tv{}\n", i * 500 + j, j)).collect();
        sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let out = c.copy_out("COPY cp TO STDOUT").await.unwrap();
    futures_util::pin_mut!(out);
    let mut lines = 0;
    while let Some(b) = out.next().await {
        lines += b.unwrap().iter().filter(|&&x| x == b'\n').count();
    }
    assert_eq!(lines, 10_000);
    assert_eq!(
        c.query_one("SELECT count(*) FROM cp", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        10_000
    );

    let port = s.proxy.local_addr().port();
    let got = psql(
        port,
        &["-c", "SELECT count(*) FROM cp", "-c", "\\copy (SELECT 1) TO STDOUT"],
    );
    assert_eq!(got, "10000\n1");
    assert_eq!(s.proxy.shared().pins.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_statement_tracking_named_statements_pin_and_work() {
    let s = Setup::new(|f| {
        txn_setup(2)(f);
        f.pool.max_prepared_statements = 0;
    })
    .await;
    // Unnamed statements and simple queries still share server connections...
    let a = s.client().await;
    let b = s.client().await;
    for i in 0..5 {
        assert_eq!(
            first_value(&a.simple_query(&format!("SELECT {i}")).await.unwrap()),
            i.to_string()
        );
        let row = b.query_typed_one("SELECT $1::int", &[(&i, Type::INT4)]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    b.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    assert_eq!(s.proxy.shared().pins.total(), 0);
    // ...and a named statement pins its session, which then works as in session mode.
    let stmt = a.prepare("SELECT $1::int * 3").await.unwrap();
    for i in 0..5 {
        assert_eq!(a.query_one(&stmt, &[&i]).await.unwrap().get::<_, i32>(0), i * 3);
    }
    assert_eq!(s.proxy.shared().pins.total(), 1);
    assert_eq!(first_value(&b.simple_query("SHOW TimeZone").await.unwrap()), "UTC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_in_copy_in_is_not_handed_to_another_client() {
    use futures_util::SinkExt;
    // One server connection: while a's COPY IN waits for data, b must wait for it, never be
    // sent into the middle of a's COPY.
    let s = Setup::new(txn_setup(1)).await;
    let (a, b) = (s.client().await, s.client().await);
    a.batch_execute("CREATE TABLE cpi (id int)").await.unwrap();
    let sink = a.copy_in("COPY cpi FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let other = tokio::spawn(async move {
        b.query_one("SELECT count(*) FROM cpi", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows: String = (0..100).map(|i| format!("{i}\n")).collect();
    sink.send(bytes::Bytes::from(rows)).await.unwrap();
    assert_eq!(within(Duration::from_secs(5), sink.finish()).await.unwrap(), 100);
    let seen = within(Duration::from_secs(5), other).await.unwrap().unwrap();
    assert_eq!(seen, 100, "b ran after a's COPY, on the same connection");
}

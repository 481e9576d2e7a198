//! Statements that need a database to themselves — DROP DATABASE, ALTER DATABASE ... RENAME,
//! CREATE DATABASE ... TEMPLATE — succeed through pgvalve although it keeps idle pooled
//! connections and its lock monitor's connection to that database: it closes its own idle
//! ones first. A client's busy connection still makes PostgreSQL refuse, with its own error.

use std::time::Duration;

use pgvalve::config::PoolMode;
use tokio_postgres::Client;

use crate::support::*;

/// A proxy in `mode` where every database name is routed to the cluster ("*"), and `alias`
/// to its database `x` (so two pools reach `x`); the app role may create databases.
async fn setup(mode: PoolMode) -> (Setup, Client) {
    let s = Setup::new(|f| {
        f.pool.pool_mode = mode;
        f.pool.pool_size = 4;
        let app = f.databases.values().next().cloned().expect("the app database");
        let mut alias = app.clone();
        alias.dbname = Some("x".into());
        f.databases.insert("*".into(), app);
        f.databases.insert("alias".into(), alias);
    })
    .await;
    let su = s.pg.superuser().await.unwrap();
    su.batch_execute(&format!("ALTER ROLE \"{}\" CREATEDB", s.pg.opts.user))
        .await
        .unwrap();
    (s, su)
}

fn url(s: &Setup, db: &str) -> String {
    s.url_as(&s.pg.opts.user, &s.pg.opts.password, db)
}

async fn exists(su: &Client, db: &str) -> bool {
    su.query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&db])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 1
}

/// Backends connected to `db`: pgvalve's pooled ones and its lock monitor's.
async fn backends(su: &Client, db: &str) -> (i64, i64) {
    let r = su
        .query_one(
            "SELECT count(*) FILTER (WHERE application_name <> 'pgvalve lock monitor'), \
                    count(*) FILTER (WHERE application_name = 'pgvalve lock monitor') \
             FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'",
            &[&db],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Makes pgvalve hold idle pooled connections to `x` (through `x` itself and through
/// `alias`) and waits until its lock monitor is connected to `x` too: what made PostgreSQL
/// refuse before.
async fn leave_pgvalve_connected_to_x(s: &Setup, su: &Client) {
    for db in ["x", "alias"] {
        let c = connect(&url(s, db)).await.unwrap();
        let name: String = c
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "x");
    }
    eventually(
        Duration::from_secs(10),
        "idle pooled connections and the lock monitor on x",
        || async {
            let idle = s.proxy.shared().pools.stats();
            let idle_in = |db: &str| idle.iter().any(|p| p.key.database == db && p.idle > 0);
            idle_in("x") && idle_in("alias") && backends(su, "x").await.1 == 1
        },
    )
    .await;
    assert!(backends(su, "x").await.0 >= 2, "pooled connections to x are open");
}

/// DROP DATABASE x from a client connected to `postgres` through pgvalve, in both modes,
/// with the simple and the extended protocol: pgvalve's idle connections to x (two pools
/// reach it) and its lock monitor's connection go first, and the statement succeeds. In
/// transaction mode a client still connected to x (idle between transactions) does not stand
/// in the way; its next query gets PostgreSQL's "database does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_database_succeeds_while_pgvalve_has_idle_connections_to_it() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let (s, su) = setup(mode).await;
        let admin = connect(&url(&s, "postgres")).await.unwrap();
        for extended in [false, true] {
            su.batch_execute(&format!("CREATE DATABASE x OWNER \"{}\"", s.pg.opts.user))
                .await
                .unwrap();
            leave_pgvalve_connected_to_x(&s, &su).await;
            let between = match mode {
                PoolMode::Transaction => Some(connect(&url(&s, "x")).await.unwrap()),
                PoolMode::Session => None,
            };
            if extended {
                admin.execute("drop database \"x\"", &[]).await
            } else {
                admin.batch_execute("DROP DATABASE IF EXISTS X").await.map(|()| 0)
            }
            .unwrap_or_else(|e| panic!("{mode:?} extended={extended}: {e:?}"));
            assert!(!exists(&su, "x").await, "{mode:?}");
            if let Some(c) = between {
                let e = c.simple_query("SELECT 1").await.expect_err("x is gone");
                assert_eq!(code(&e).as_deref(), Some("3D000"), "{e:?}");
            }
        }
        // The session that dropped it goes on.
        admin.simple_query("SELECT 1").await.unwrap();
    }
}

/// CREATE DATABASE ... TEMPLATE x (what Django's `test --parallel` does) and ALTER DATABASE
/// x RENAME TO ... succeed while pgvalve was connected to x; once each is done, x is usable
/// through pgvalve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_and_renaming_a_database_pgvalve_is_connected_to_succeed() {
    let (s, su) = setup(PoolMode::Transaction).await;
    let admin = connect(&url(&s, "postgres")).await.unwrap();
    su.batch_execute(&format!("CREATE DATABASE x OWNER \"{}\"", s.pg.opts.user))
        .await
        .unwrap();
    let x = connect(&url(&s, "x")).await.unwrap();
    x.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    leave_pgvalve_connected_to_x(&s, &su).await;
    admin
        .execute("CREATE DATABASE x_copy WITH TEMPLATE = \"x\"", &[])
        .await
        .unwrap();
    let copy = connect(&url(&s, "x_copy")).await.unwrap();
    let v: i32 = copy.query_one("SELECT v FROM t", &[]).await.unwrap().get(0);
    assert_eq!(v, 7, "the copy has x's rows");
    // x is served again once the copy is done (the session stayed connected).
    let v: i32 = x.query_one("SELECT v FROM t", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    drop(x);
    leave_pgvalve_connected_to_x(&s, &su).await;
    admin
        .batch_execute("ALTER DATABASE x RENAME TO x_renamed")
        .await
        .unwrap();
    assert!(!exists(&su, "x").await && exists(&su, "x_renamed").await);
}

/// A client of x in a transaction holds a busy server connection: pgvalve leaves it alone
/// and PostgreSQL's refusal reaches the DROP's client unchanged (55006). When that
/// connection goes back to its pool while a DROP waits (PostgreSQL waits up to 5 s for other
/// sessions to leave), pgvalve closes it and the DROP succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_to_the_database_gets_postgresqls_own_error() {
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let (s, su) = setup(mode).await;
        su.batch_execute(&format!("CREATE DATABASE x OWNER \"{}\"", s.pg.opts.user))
            .await
            .unwrap();
        leave_pgvalve_connected_to_x(&s, &su).await;
        let admin = connect(&url(&s, "postgres")).await.unwrap();
        let busy = connect(&url(&s, "x")).await.unwrap();
        busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let e = admin.batch_execute("DROP DATABASE x").await.expect_err("x is in use");
        let db = e.as_db_error().expect("PostgreSQL's error");
        assert_eq!(db.code().code(), "55006", "{mode:?}: {db:?}");
        assert_eq!(db.message(), "database \"x\" is being accessed by other users");
        assert!(exists(&su, "x").await);
        busy.batch_execute("SELECT 1").await.expect("the busy client goes on");

        // Again, and this time the busy client finishes while the DROP waits.
        let drop_x = tokio::spawn(async move { admin.batch_execute("DROP DATABASE x").await });
        eventually(Duration::from_secs(10), "the DROP waits for x's sessions", || async {
            su.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'DROP DATABASE x' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 1
        })
        .await;
        busy.batch_execute("COMMIT").await.unwrap();
        drop(busy); // (session mode: the server connection goes back to the pool)
        within(Duration::from_secs(30), drop_x)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
        assert!(!exists(&su, "x").await, "{mode:?}");
    }
}

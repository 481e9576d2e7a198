//! The lock monitor against real PostgreSQL: holders named by identity in SHOW LOCKS with the
//! blocked count, FOR UPDATE and external holders, max_lock_hold acting only on the
//! offender (terminate, cancel), the history, and a PostgreSQL restart.

use std::time::Duration;

use pgvalve::admission::identity::IdentityRule;
use pgvalve::admission::LockAction;
use pgvalve::config::PoolMode;
use tokio_postgres::NoTls;

use crate::support::*;

fn setup_locks(action: Option<LockAction>) -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    move |f| {
        f.admin.admin_users = vec!["app".into()];
        f.locks.poll_interval = Duration::from_millis(200);
        f.pool.pool_mode = PoolMode::Transaction;
        f.identity = vec![IdentityRule {
            name: "greedy".into(),
            application_name: Some("greedy".into()),
            max_lock_hold: action.map(|_| Duration::from_secs(2)),
            lock_action: action,
            ..Default::default()
        }];
    }
}

/// A client whose connection task's end (and error) can be awaited.
async fn watched(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    (c, tokio::spawn(conn))
}

fn app(s: &Setup, name: &str) -> String {
    format!("{}?application_name={name}", s.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_is_named_and_only_it_is_terminated() {
    let s = Setup::new(setup_locks(Some(LockAction::Terminate))).await;
    let owner = s.client().await;
    owner
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let bystander = connect(&app(&s, "bystander")).await.unwrap();
    bystander.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (greedy, greedy_conn) = watched(&app(&s, "greedy")).await;
    greedy
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let reader = connect(&app(&s, "reader")).await.unwrap();
    let blocked = tokio::spawn(async move { reader.simple_query("SELECT count(*) FROM t").await.map(|_| ()) });

    // Within two poll intervals or so, SHOW LOCKS names greedy, the relation, the mode, and
    // the one client it blocks.
    eventually(Duration::from_secs(2), "SHOW LOCKS names the holder", || async {
        console(&s, "SHOW LOCKS").await.iter().any(|r| {
            r["identity"] == "greedy"
                && r["relation"] == "t"
                && r["mode"] == "AccessExclusiveLock"
                && r["blocks"] == "1"
                && r["dangerous"] == "yes"
                && r["state"] == "idle in transaction"
        })
    })
    .await;
    // After max_lock_hold (2 s) its transaction ends with an error that says why.
    let end = within(Duration::from_secs(6), greedy_conn).await.unwrap();
    let e = end.expect_err("greedy's connection ends with an error");
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db.code().code(), "57P01");
    assert!(
        db.message()
            .contains("client \"greedy\" held AccessExclusiveLock on relation \"t\"")
            && db.message().contains("max_lock_hold=2s, lock_action=terminate"),
        "{}",
        db.message()
    );
    within(Duration::from_secs(5), blocked)
        .await
        .unwrap()
        .expect("the blocked reader proceeds");
    bystander
        .batch_execute("SELECT 1; COMMIT")
        .await
        .expect("nobody else was touched");
    let n: i64 = owner.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    eventually(Duration::from_secs(2), "the episode is in the history", || async {
        console(&s, "SHOW LOCK_HISTORY").await.iter().any(|r| {
            r["identity"] == "greedy"
                && r["relation"] == "t"
                && r["ended_by"] == "terminate by pgvalve"
                && r["max_blocked"] == "1"
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_running_statement_that_holds_the_lock() {
    let s = Setup::new(setup_locks(Some(LockAction::Cancel))).await;
    let owner = s.client().await;
    owner.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let greedy = connect(&app(&s, "greedy")).await.unwrap();
    let started = std::time::Instant::now();
    let e = within(
        Duration::from_secs(10),
        greedy.simple_query("LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(30)"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("57014"), "{e:?}");
    let db = e.as_db_error().expect("an ErrorResponse");
    assert!(
        db.message()
            .starts_with("pgvalve: canceling statement: client \"greedy\" held AccessExclusiveLock")
            && db.message().contains("on relation \"t\"")
            && db.message().contains("max_lock_hold=2s, lock_action=cancel"),
        "pgvalve says why instead of PostgreSQL's \"canceling statement due to user request\": {}",
        db.message()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    greedy
        .simple_query("SELECT 1")
        .await
        .expect("the session goes on after a cancel");
    owner
        .simple_query("SELECT count(*) FROM t")
        .await
        .expect("the lock is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_update_and_external_holders_are_recorded_and_the_monitor_survives_a_restart() {
    let s = Setup::new(setup_locks(None)).await;
    let owner = s.client().await;
    owner
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let mine = connect(&app(&s, "web")).await.unwrap();
    mine.batch_execute("BEGIN; SELECT * FROM t FOR UPDATE").await.unwrap();
    let direct = connect(&s.pg.url()).await.unwrap();
    direct
        .batch_execute("BEGIN; LOCK TABLE t IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    eventually(Duration::from_secs(3), "both holders in SHOW LOCKS", || async {
        let rows = console(&s, "SHOW LOCKS").await;
        rows.iter()
            .any(|r| r["identity"] == "web" && r["mode"] == "RowShareLock" && r["source"] == "pgvalve")
            && rows
                .iter()
                .any(|r| r["source"] == "external" && r["mode"] == "ShareRowExclusiveLock" && r["dangerous"] == "yes")
    })
    .await;
    drop((mine, direct));
    within(Duration::from_secs(30), s.pg.restart()).await.unwrap();
    // Idle pooled connections died with the server; each is found out and replaced on use.
    eventually(Duration::from_secs(10), "pgvalve serves again", || async {
        match connect(&app(&s, "probe")).await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let again = connect(&app(&s, "web")).await.unwrap();
    within(
        Duration::from_secs(10),
        again.batch_execute("BEGIN; LOCK TABLE t IN EXCLUSIVE MODE"),
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the monitor reconnected after the restart",
        || async {
            console(&s, "SHOW LOCKS")
                .await
                .iter()
                .any(|r| r["identity"] == "web" && r["mode"] == "ExclusiveLock")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lock_holders_holds_back_the_identitys_next_transactions() {
    let s = Setup::new(|f| {
        f.admin.admin_users = vec!["app".into()];
        // Long enough that the release below is seen by the proxy, not by a poll: the holder
        // is seen by a poll at P, COMMIT goes out at P + 1 s, the next poll is at P + 4 s.
        f.locks.poll_interval = Duration::from_secs(4);
        f.pool.pool_mode = PoolMode::Transaction;
        f.identity = vec![IdentityRule {
            name: "migr".into(),
            application_name: Some("migr".into()),
            max_lock_holders: Some(1),
            ..Default::default()
        }];
    })
    .await;
    let owner = s.client().await;
    owner.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let (a, b) = (
        connect(&app(&s, "migr")).await.unwrap(),
        connect(&app(&s, "migr")).await.unwrap(),
    );
    let web = connect(&app(&s, "web")).await.unwrap();
    a.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    eventually(Duration::from_secs(6), "the monitor sees the holder", || async {
        console(&s, "SHOW LOCKS")
            .await
            .iter()
            .any(|r| r["identity"] == "migr" && r["dangerous"] == "yes")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = tokio::spawn(async move { b.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !next.is_finished(),
        "migr's next transaction waits while one of its sessions holds the lock"
    );
    within(Duration::from_secs(2), web.simple_query("SELECT 1"))
        .await
        .expect("other identities go on");
    a.batch_execute("COMMIT").await.unwrap();
    // The relay saw the transaction end (ReadyForQuery 'I') and released the lock at once,
    // well before the next poll.
    within(Duration::from_secs(2), next)
        .await
        .unwrap()
        .expect("released once the lock is gone");
    let history = console(&s, "SHOW LOCK_HISTORY").await;
    assert!(
        history
            .iter()
            .any(|r| r["identity"] == "migr" && r["ended_by"] == "transaction ended"),
        "{history:?}"
    );
}

//! Forensics against real PostgreSQL: a deadlock between two identities named from both
//! sides (SHOW DEADLOCKS, pgvalve_deadlocks_total), sqlcommenter tags shown where statements
//! are recorded, malformed and huge comments harmless.

use std::collections::HashMap;
use std::time::Duration;

use pgvalve::admission::identity::IdentityRule;
use pgvalve::config::{FileConfig, PoolMode};

use crate::admission::http_get;
use crate::support::*;

fn rule(name: &str) -> IdentityRule {
    IdentityRule {
        name: name.into(),
        application_name: Some(name.into()),
        ..Default::default()
    }
}

/// Two identities (`web`, `worker`, by application_name), a fast lock monitor, the console
/// and metrics.
fn two_identities(mode: PoolMode) -> impl FnOnce(&mut FileConfig) {
    move |f| {
        f.admin.admin_users = vec!["app".into()];
        f.http.listen = Some("127.0.0.1:0".into());
        f.locks.poll_interval = Duration::from_millis(100);
        f.pool.pool_mode = mode;
        f.identity = vec![rule("web"), rule("worker")];
    }
}

fn app(s: &Setup, name: &str) -> String {
    format!("{}?application_name={name}", s.url())
}

const WEB_TAG: &str = "/*controller='checkout',framework='django%3A5.2',route='%2Fapi%2Fpay%2F'*/";
const WORKER_TAG: &str = "/*controller='settle',route='%2Fjobs%2Fsettle%2F',traceparent='00-abc-def-01'*/";

async fn deadlock_between_two_identities(mode: PoolMode) {
    let s = Setup::new(two_identities(mode)).await;
    let owner = s.client().await;
    owner
        .batch_execute("CREATE TABLE acct (id int PRIMARY KEY, n int); INSERT INTO acct VALUES (1, 0), (2, 0)")
        .await
        .unwrap();
    let web = connect(&app(&s, "web")).await.unwrap();
    let worker = connect(&app(&s, "worker")).await.unwrap();
    web.batch_execute(&format!("BEGIN; UPDATE acct SET n = n + 1 WHERE id = 1 {WEB_TAG}"))
        .await
        .unwrap();
    worker
        .batch_execute(&format!("BEGIN; UPDATE acct SET n = n + 1 WHERE id = 2 {WORKER_TAG}"))
        .await
        .unwrap();
    // Opposite order: web waits for row 2, then worker for row 1.
    let web_second = tokio::spawn(async move {
        let r = web
            .batch_execute(&format!("UPDATE acct SET n = n + 1 WHERE id = 2 {WEB_TAG}"))
            .await;
        (web, r)
    });
    eventually(Duration::from_secs(10), "web waits for worker's row", || async {
        console(&s, "SHOW LOCKS").await.iter().any(|r| r["granted"] == "no")
    })
    .await;
    let worker_second = worker
        .batch_execute(&format!("UPDATE acct SET n = n + 1 WHERE id = 1 {WORKER_TAG}"))
        .await;
    let (web, web_second) = within(Duration::from_secs(10), web_second).await.unwrap();
    let codes = [
        web_second.as_ref().err().and_then(code),
        worker_second.as_ref().err().and_then(code),
    ];
    let losers: Vec<_> = codes.iter().flatten().collect();
    assert_eq!(losers, vec!["40P01"], "exactly one side loses: {codes:?}");
    // Both transactions stay open until the deadlock is recorded: the winner's statement, if
    // the monitor's last poll missed it waiting, is read from pg_stat_activity.
    eventually(Duration::from_secs(10), "SHOW DEADLOCKS names both sides", || async {
        let rows = console(&s, "SHOW DEADLOCKS").await;
        rows.len() >= 2 && rows.iter().all(|r| !r["statement"].is_empty())
    })
    .await;
    let rows = console(&s, "SHOW DEADLOCKS").await;
    for c in [&web, &worker] {
        let _ = c.batch_execute("ROLLBACK").await;
    }
    let side = |id: &str| {
        rows.iter()
            .find(|r| r["identity"] == id)
            .unwrap_or_else(|| panic!("{id} in {rows:?}"))
    };
    let (w, k) = (side("web"), side("worker"));
    assert_eq!(
        (w["application_name"].as_str(), k["application_name"].as_str()),
        ("web", "worker")
    );
    assert!(w["statement"].contains("WHERE id = 2"), "{w:?}");
    assert!(k["statement"].contains("WHERE id = 1"), "{k:?}");
    assert_eq!(
        (w["route"].as_str(), w["controller"].as_str()),
        ("/api/pay/", "checkout")
    );
    assert_eq!(
        (k["route"].as_str(), k["controller"].as_str()),
        ("/jobs/settle/", "settle")
    );
    assert_eq!(k["traceparent"], "00-abc-def-01");
    assert!(w["waited_for"].starts_with("ShareLock on transaction"), "{w:?}");
    assert_eq!(rows.iter().filter(|r| r["role"] == "rolled back").count(), 1);
    assert_eq!(w["blocked_by"], k["pid"]);
    let http = s.proxy.http_addr().expect("http endpoint");
    let body = http_get(http, "/metrics").await.1;
    for id in ["web", "worker"] {
        let want = format!("pgvalve_deadlocks_total{{identity=\"{id}\"}} 1");
        assert!(body.contains(&want), "{want} in {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_attributed_to_both_identities_in_transaction_mode() {
    deadlock_between_two_identities(PoolMode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_attributed_to_both_identities_in_session_mode() {
    deadlock_between_two_identities(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_error_of_another_shape_is_still_counted() {
    let s = Setup::new(two_identities(PoolMode::Transaction)).await;
    let web = connect(&app(&s, "web")).await.unwrap();
    for detail in ["DETAIL = 'Prozess 1 wartet auf nichts',", ""] {
        let e = web
            .batch_execute(&format!(
                "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40P01', {detail} MESSAGE = 'deadlock detected'; END $$"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&e).as_deref(), Some("40P01"));
    }
    web.batch_execute("SELECT 1").await.expect("the client goes on");
    let http = s.proxy.http_addr().expect("http endpoint");
    eventually(Duration::from_secs(5), "both are counted for web", || async {
        http_get(http, "/metrics")
            .await
            .1
            .contains("pgvalve_deadlocks_total{identity=\"web\"} 2")
    })
    .await;
    let rows = console(&s, "SHOW DEADLOCKS").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r["identity"] == "web" && r["role"] == "rolled back" && r["statement"].contains("RAISE")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlcommenter_tags_show_in_locks_and_history_and_bad_comments_are_harmless() {
    let s = Setup::new(two_identities(PoolMode::Transaction)).await;
    let owner = s.client().await;
    owner.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let huge = format!("/*route='{}',controller='big'*/", "x".repeat(1 << 20));
    let cases = [
        (WEB_TAG.to_string(), Some(("/api/pay/", "checkout"))),
        ("/*route='%2Funterminated,controller=*/".to_string(), None),
        ("/*route='%ZZ\u{1}\u{7}'*/".to_string(), None),
        (huge, None),
    ];
    for (comment, want) in cases {
        let web = connect(&app(&s, "web")).await.unwrap();
        let sql = format!("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE {comment}");
        within(Duration::from_secs(10), web.batch_execute(&sql)).await.unwrap();
        let holder = |rows: Vec<HashMap<String, String>>| {
            rows.into_iter()
                .find(|r| r["identity"] == "web" && r["mode"] == "AccessExclusiveLock")
        };
        // (A poll that fails under load shows no locks until the next: keep the row seen.)
        let seen = std::sync::Mutex::new(None);
        eventually(Duration::from_secs(10), "SHOW LOCKS shows the holder", || async {
            let found = holder(console(&s, "SHOW LOCKS").await);
            let ok = found.is_some();
            *seen.lock().unwrap() = found;
            ok
        })
        .await;
        let row = seen.into_inner().unwrap().expect("seen");
        match want {
            Some((route, controller)) => {
                assert_eq!((row["route"].as_str(), row["controller"].as_str()), (route, controller));
            }
            None => assert!(
                row["route"].chars().count() <= 200 && row["controller"].is_empty(),
                "{row:?}"
            ),
        }
        web.batch_execute("COMMIT").await.unwrap();
    }
    let history = console(&s, "SHOW LOCK_HISTORY").await;
    assert!(
        history
            .iter()
            .any(|r| r["identity"] == "web" && r["route"] == "/api/pay/" && r["controller"] == "checkout"),
        "{history:?}"
    );
    owner.batch_execute("SELECT 1").await.expect("pgvalve goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_is_recorded_with_its_identity_and_route() {
    let s = Setup::new(|f| {
        two_identities(PoolMode::Transaction)(f);
        f.locks.long_transaction_after = Duration::from_secs(1);
    })
    .await;
    let web = connect(&app(&s, "web")).await.unwrap();
    let worker = connect(&app(&s, "worker")).await.unwrap();
    web.batch_execute("BEGIN; SELECT 1 /*controller='report',route='%2Freports%2Fslow%2F'*/")
        .await
        .unwrap();
    worker.batch_execute("SELECT 1").await.unwrap();
    let open = |r: &HashMap<String, String>| r["identity"] == "web" && r["ended"].is_empty();
    eventually(Duration::from_secs(10), "SHOW LONG_TRANSACTIONS has web's", || async {
        console(&s, "SHOW LONG_TRANSACTIONS").await.iter().any(open)
    })
    .await;
    let rows = console(&s, "SHOW LONG_TRANSACTIONS").await;
    let r = rows.iter().find(|r| open(r)).expect("shown");
    assert_eq!(r["application_name"], "web");
    assert_eq!(r["state"], "idle in transaction");
    assert_eq!(
        (r["route"].as_str(), r["controller"].as_str()),
        ("/reports/slow/", "report")
    );
    assert!(r["last_statement"].contains("SELECT 1 /*controller"), "{r:?}");
    assert!(!r["session_id"].is_empty());
    assert!(
        rows.iter().all(|r| r["identity"] != "worker"),
        "worker's were short: {rows:?}"
    );
    let http = s.proxy.http_addr().expect("http endpoint");
    let body = http_get(http, "/metrics").await.1;
    assert!(
        body.contains("pgvalve_long_transactions_total{identity=\"web\"} 1"),
        "{body}"
    );
    web.batch_execute("COMMIT").await.unwrap();
    eventually(Duration::from_secs(5), "it ends", || async {
        console(&s, "SHOW LONG_TRANSACTIONS")
            .await
            .iter()
            .any(|r| r["identity"] == "web" && !r["ended"].is_empty())
    })
    .await;
}

/// `migr` gets `lock_timeout = "1s"` from its rule; `[admission]` gives everyone a
/// `statement_timeout` the rule does not touch.
fn guarded(mode: PoolMode) -> impl FnOnce(&mut FileConfig) {
    move |f| {
        two_identities(mode)(f);
        let settings = |toml: &str| toml::from_str::<pgvalve::config::ServerSettings>(toml).unwrap();
        f.admission.server_settings = settings("statement_timeout = \"40s\"");
        f.identity.push(IdentityRule {
            server_settings: Some(settings("lock_timeout = \"1s\"")),
            ..rule("migr")
        });
    }
}

async fn show(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one(&format!("SHOW {name}"), &[]).await.unwrap().get(0)
}

async fn lock_timeout_stops_only_the_migration(mode: PoolMode) {
    let s = Setup::new(guarded(mode)).await;
    let owner = s.client().await;
    owner.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let migr = connect(&app(&s, "migr")).await.unwrap();
    let web = connect(&app(&s, "web")).await.unwrap();
    assert_eq!(show(&migr, "lock_timeout").await, "1s");
    assert_eq!(show(&migr, "statement_timeout").await, "40s");
    assert_eq!(show(&web, "lock_timeout").await, "0");
    assert_eq!(show(&web, "statement_timeout").await, "40s");
    // The client's own setting wins over its identity's.
    let own = connect(&format!("{}&options=-c%20lock_timeout%3D7s", app(&s, "migr")))
        .await
        .unwrap();
    assert_eq!(show(&own, "lock_timeout").await, "7s");

    let reader = connect(&app(&s, "reader")).await.unwrap();
    reader.batch_execute("BEGIN; SELECT count(*) FROM t").await.unwrap();
    let e = within(
        Duration::from_secs(10),
        migr.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE"),
    )
    .await
    .unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("55P03"), "{e:?}");
    migr.batch_execute("ROLLBACK").await.unwrap();
    let waiting = tokio::spawn(async move {
        let r = web
            .batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; COMMIT")
            .await;
        (web, r)
    });
    // web's identical statement waits (no lock_timeout for it) until the reader lets go.
    eventually(Duration::from_secs(5), "web waits for the lock", || async {
        console(&s, "SHOW LOCKS")
            .await
            .iter()
            .any(|r| r["identity"] == "web" && r["granted"] == "no")
    })
    .await;
    assert!(!waiting.is_finished());
    reader.batch_execute("COMMIT").await.unwrap();
    let (web, r) = within(Duration::from_secs(10), waiting).await.unwrap();
    r.expect("web got its lock once the reader was done");
    assert_eq!(show(&web, "lock_timeout").await, "0", "no migr setting leaked to web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_give_only_the_migration_a_lock_timeout_in_transaction_mode() {
    lock_timeout_stops_only_the_migration(PoolMode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_give_only_the_migration_a_lock_timeout_in_session_mode() {
    lock_timeout_stops_only_the_migration(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_server_settings_from_the_next_transaction() {
    let s = Setup::new(guarded(PoolMode::Transaction)).await;
    let web = connect(&app(&s, "web")).await.unwrap();
    assert_eq!(show(&web, "lock_timeout").await, "0");
    let mut f = s.pg.file_config();
    guarded(PoolMode::Transaction)(&mut f);
    f.identity[0].server_settings = Some(toml::from_str("lock_timeout = \"3s\"").unwrap());
    s.proxy.reload(pgvalve::config::Config::validate(f, "reload").unwrap());
    assert_eq!(
        show(&web, "lock_timeout").await,
        "3s",
        "the same client, its next transaction"
    );
    assert_eq!(show(&web, "statement_timeout").await, "40s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surge_names_the_routes_its_sessions_were_running() {
    let s = Setup::new(|f| {
        two_identities(PoolMode::Transaction)(f);
        f.admission.surge_min_rate = 1.0;
        f.admission.surge_multiplier = 0.0;
        f.admission.surge_cooldown = Duration::from_secs(60);
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let c = connect(&app(&s, "web")).await.unwrap();
        let route = if i < 4 { "%2Fapi%2Fpay%2F" } else { "%2Fapi%2Fcart%2F" };
        c.batch_execute(&format!("SELECT 1 /*controller='v',route='{route}'*/"))
            .await
            .unwrap();
        clients.push(c);
    }
    eventually(Duration::from_secs(10), "SHOW SURGES names web's routes", || async {
        console(&s, "SHOW SURGES")
            .await
            .iter()
            .any(|r| r["identity"] == "web" && r["top_routes"] == "/api/pay/ (4), /api/cart/ (2)")
    })
    .await;
}

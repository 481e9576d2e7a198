//! The admin console (`psql -d pgvalve`): who may use it, SHOW LIMITS / SURGES / VERSION /
//! HELP with the identities admission knows, and clear errors for anything else.

use std::time::Duration;

use pgvalve::config::{Secret, UserConfig};
use tokio_postgres::SimpleQueryMessage;

use crate::support::*;

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<&tokio_postgres::SimpleQueryRow> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn user(password: &str) -> UserConfig {
    UserConfig {
        password: Some(Secret(password.into())),
        ..Default::default()
    }
}

#[allow(clippy::too_many_lines)] // a test: the 80-line rule is for non-test code
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_identities_to_admins_and_stats_users_only() {
    let s = Setup::new(|f| {
        f.users.insert("watcher".into(), user("watch"));
        f.users.insert("nobody".into(), user("none"));
        f.admin.admin_users = vec!["app".into()];
        f.admin.stats_users = vec!["watcher".into()];
        f.admission.max_client_connections = 1;
    })
    .await;
    let web = connect(&format!("{}?application_name=web", s.url())).await.unwrap();
    let refused = connect(&format!("{}?application_name=web", s.url())).await.unwrap_err();
    assert_eq!(code(&refused).as_deref(), Some("53300"));

    let admin = connect(&s.url_as("app", "app-secret", "pgvalve")).await.unwrap();
    let out = admin.simple_query("SHOW LIMITS").await.unwrap();
    let web_row = rows(&out)
        .into_iter()
        .find(|r| r.get("identity") == Some("web"))
        .expect("identity web in SHOW LIMITS");
    assert_eq!(web_row.get("clients"), Some("1"));
    assert_eq!(web_row.get("max_client_connections"), Some("1"));
    assert_eq!(web_row.get("refused_client_cap"), Some("1"));
    assert_eq!(web_row.get("surging"), Some("no"));
    assert_eq!(web_row.get("headroom"), Some("10%"), "the default");
    // SHOW CLIENTS: PgBouncer's columns, and the backend each client uses now.
    let pid: i32 = web.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let out = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let clients = rows(&out);
    let pgbouncer_columns = crate::operate::CONNECTION;
    let names: Vec<&str> = clients[0].columns().iter().map(|c| c.name()).collect();
    assert_eq!(&names[..pgbouncer_columns.len()], pgbouncer_columns);
    let w = clients
        .iter()
        .find(|r| r.get("application_name") == Some("web"))
        .expect("the web client in SHOW CLIENTS");
    assert_eq!(
        (w.get("identity"), w.get("state"), w.get("user"), w.get("database")),
        (Some("web"), Some("active"), Some("app"), Some("app"))
    );
    assert_eq!(w.get("backend_pid"), Some(pid.to_string().as_str()));
    let out = admin.simple_query("show version; SHOW HELP;").await.unwrap();
    let r = rows(&out);
    assert!(r[0].get(0).unwrap().starts_with("pgvalve "));
    assert!(r[1..].iter().any(|r| r.get("command") == Some("SHOW SURGES")));
    let out = admin.simple_query("SHOW SURGES").await.unwrap();
    assert!(matches!(out.last(), Some(SimpleQueryMessage::CommandComplete(0))));
    let e = admin.simple_query("SHOW NONSENSE").await.unwrap_err();
    let db = e.as_db_error().unwrap();
    assert_eq!(
        (db.code().code(), db.hint()),
        ("42601", Some("SHOW HELP lists the commands."))
    );
    // The extended protocol is refused, and the session goes on.
    let e = admin.query("SHOW LIMITS", &[]).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("0A000"));
    admin.simple_query("SHOW VERSION").await.expect("still usable");

    let watcher = connect(&s.url_as("watcher", "watch", "pgbouncer")).await.unwrap();
    assert!(!rows(&watcher.simple_query("SHOW LIMITS").await.unwrap()).is_empty());
    let e = watcher.simple_query("SHUTDOWN").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("42501"));

    let e = connect(&s.url_as("nobody", "none", "pgvalve")).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("42501"));
    let e = connect(&s.url_as("app", "wrong", "pgvalve")).await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("28P01"));

    // psql, as operators use it.
    let bindir = pgvalve::testkit::find_bindir().unwrap();
    let out = std::process::Command::new(bindir.join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &s.proxy.local_addr().port().to_string(),
            "-U",
            "app",
            "-d",
            "pgvalve",
        ])
        .args(["-X", "-A", "-c", "SHOW LIMITS"])
        .env("PGPASSWORD", "app-secret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.starts_with("web|")), "{text}");
    within(Duration::from_secs(5), web.simple_query("SELECT 1"))
        .await
        .unwrap();
}

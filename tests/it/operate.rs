//! Operating pgvalve: the PgBouncer-compatible console tables and commands (PAUSE, RESUME,
//! KILL_CLIENT, RELOAD), live reload of a pool size from a real file, a broken file refused
//! without effect, and `/metrics` read with a Prometheus text parser.

use std::time::Duration;

use pgvalve::config::{Secret, UserConfig};
use pgvalve::proxy::ProxyHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::admission::http_get;
use crate::support::*;

type Rows = Vec<std::collections::HashMap<String, String>>;

/// Column names and rows of one console command.
async fn table(c: &Client, cmd: &str) -> (Vec<String>, Rows) {
    let msgs = c.simple_query(cmd).await.unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in &msgs {
        match m {
            SimpleQueryMessage::RowDescription(d) => cols = d.iter().map(|c| c.name().to_string()).collect(),
            SimpleQueryMessage::Row(r) => rows.push(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => {}
        }
    }
    (cols, rows)
}

/// PgBouncer's columns of SHOW CLIENTS and SHOW SERVERS.
pub(crate) const CONNECTION: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "prepared_statements",
    "id",
];

/// PgBouncer's columns of each command, in order (pgvalve may add its own after them).
const PGBOUNCER: &[(&str, &[&str])] = &[
    (
        "SHOW POOLS",
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "load_balance_hosts",
        ],
    ),
    ("SHOW SERVERS", CONNECTION),
    (
        "SHOW STATS",
        &[
            "database",
            "total_server_assignment_count",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "total_client_parse_count",
            "total_server_parse_count",
            "total_bind_count",
            "avg_server_assignment_count",
            "avg_xact_count",
            "avg_query_count",
            "avg_recv",
            "avg_sent",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
            "avg_client_parse_count",
            "avg_server_parse_count",
            "avg_bind_count",
        ],
    ),
    (
        "SHOW DATABASES",
        &[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool_size",
            "server_lifetime",
            "pool_mode",
            "load_balance_hosts",
            "max_connections",
            "current_connections",
            "max_client_connections",
            "current_client_connections",
            "paused",
            "disabled",
        ],
    ),
    (
        "SHOW USERS",
        &[
            "name",
            "pool_size",
            "reserve_pool_size",
            "pool_mode",
            "max_user_connections",
            "current_connections",
            "max_user_client_connections",
            "current_client_connections",
        ],
    ),
    ("SHOW CONFIG", &["key", "value", "default", "changeable"]),
    ("SHOW CLIENTS", CONNECTION),
];

#[allow(clippy::too_many_lines)] // a test: the 80-line rule is for non-test code
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_tables_and_commands() {
    let s = Setup::new(|f| {
        f.users.insert(
            "watcher".into(),
            UserConfig {
                password: Some(Secret("watch".into())),
                ..Default::default()
            },
        );
        f.admin.admin_users = vec!["app".into()];
        f.admin.stats_users = vec!["watcher".into()];
        f.pool.pool_mode = pgvalve::config::PoolMode::Transaction;
    })
    .await;
    let admin = connect(&s.url_as("app", "app-secret", "pgbouncer")).await.unwrap();
    let web = connect(&format!("{}?application_name=web", s.url())).await.unwrap();
    web.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pid: i32 = web.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for (cmd, want) in PGBOUNCER {
        let (cols, _) = table(&admin, cmd).await;
        assert_eq!(&cols[..want.len()], *want, "{cmd}: PgBouncer's columns first");
    }
    // The backend pid <-> client link, both ways.
    let (_, servers) = table(&admin, "SHOW SERVERS").await;
    let server = servers
        .iter()
        .find(|r| r["remote_pid"] == pid.to_string())
        .expect("the backend in SHOW SERVERS");
    assert_eq!(
        (server["state"].as_str(), server["identity"].as_str()),
        ("active", "web")
    );
    let (_, clients) = table(&admin, "SHOW CLIENTS").await;
    let client = clients
        .iter()
        .find(|r| r["ptr"] == server["link"])
        .expect("link names the client");
    assert_eq!(
        (client["link"].as_str(), client["backend_pid"].as_str()),
        (server["ptr"].as_str(), pid.to_string().as_str())
    );
    let (_, pools) = table(&admin, "SHOW POOLS").await;
    assert_eq!(
        (pools[0]["sv_active"].as_str(), pools[0]["pool_mode"].as_str()),
        ("1", "transaction")
    );
    web.batch_execute("COMMIT").await.unwrap();
    let (_, config) = table(&admin, "SHOW CONFIG").await;
    assert!(config
        .iter()
        .any(|r| r["key"] == "pool_mode" && r["value"] == "transaction" && r["default"] == "session"));
    assert!(
        config.iter().all(|r| !r["value"].contains("app-secret")),
        "no secret in SHOW CONFIG"
    );

    // Stats users see, admins act; unknown commands point at SHOW HELP.
    let watcher = connect(&s.url_as("watcher", "watch", "pgvalve")).await.unwrap();
    table(&watcher, "SHOW POOLS").await;
    let e = watcher.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("42501"));
    let e = admin.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("42601"));
    assert!(e.as_db_error().unwrap().hint().unwrap_or("").contains("SHOW HELP"));

    // PAUSE waits for the transaction in flight, then holds new ones until RESUME.
    web.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let pause = tokio::spawn({
        let url = s.url_as("app", "app-secret", "pgvalve");
        async move { connect(&url).await.unwrap().simple_query("PAUSE app").await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pause.is_finished(), "PAUSE waits for the transaction in flight");
    web.batch_execute("COMMIT").await.unwrap();
    within(Duration::from_secs(5), pause).await.unwrap().unwrap();
    let held = tokio::spawn(async move { web.simple_query("SELECT 1").await.map(|_| web) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "paused: new transactions wait");
    let (_, pools) = table(&admin, "SHOW POOLS").await;
    assert_eq!(
        (pools[0]["paused"].as_str(), pools[0]["cl_waiting"].as_str()),
        ("1", "0")
    );
    admin.simple_query("RESUME app").await.unwrap();
    let web = within(Duration::from_secs(5), held).await.unwrap().unwrap();

    // KILL_CLIENT closes that client only, between two of its transactions.
    let other = s.client().await;
    let (_, clients) = table(&admin, "SHOW CLIENTS").await;
    let id = &clients.iter().find(|r| r["application_name"] == "web").unwrap()["id"];
    admin.simple_query(&format!("KILL_CLIENT {id}")).await.unwrap();
    let e = within(Duration::from_secs(5), web.simple_query("SELECT 1"))
        .await
        .unwrap_err();
    assert!(e.is_closed() || code(&e).as_deref() == Some("57P01"), "{e:?}");
    other.simple_query("SELECT 1").await.expect("others go on");
    let e = admin.simple_query("KILL_CLIENT 999999").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("42704"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_counts_the_time_clients_waited_for_a_server_connection() {
    let pg = pgvalve::testkit::TestPostgres::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgvalve.toml");
    std::fs::write(&path, config_text(&pg, "1")).unwrap();
    let proxy = ProxyHandle::start(pgvalve::config::load(&path).unwrap()).await.unwrap();
    let url = format!("postgres://app:app-secret@{}/app", proxy.local_addr());
    let admin = connect(&format!("postgres://app:app-secret@{}/pgvalve", proxy.local_addr()))
        .await
        .unwrap();
    let wait_us = |rows: &Rows| {
        rows.iter()
            .find(|r| r["database"] == "app")
            .map_or(0, |r| r["total_wait_time"].parse::<u64>().unwrap())
    };

    // The only server connection is held in a transaction for 400 ms; a second client waits.
    let first = connect(&url).await.unwrap();
    first.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let second = {
        let url = url.clone();
        tokio::spawn(async move {
            let c = connect(&url).await.unwrap();
            c.simple_query("SELECT 1").await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, before) = table(&admin, "SHOW STATS").await;
    first.batch_execute("COMMIT").await.unwrap();
    within(Duration::from_secs(10), second).await.unwrap();
    let (_, after) = table(&admin, "SHOW STATS").await;
    let waited = wait_us(&after) - wait_us(&before);
    assert!(
        (300_000..10_000_000).contains(&waited),
        "total_wait_time grew by {waited} µs for a wait of about 400 ms"
    );
}

fn config_text(pg: &pgvalve::testkit::TestPostgres, pool_size: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[pool]\npool_mode = \"transaction\"\npool_size = {pool_size}\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[admin]\nadmin_users = [\"app\"]\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n[users.app]\npassword = \"app-secret\"\n",
        pg.port()
    )
}

fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_resizes_a_pool_live_refuses_a_broken_file_and_metrics_agree() {
    let pg = pgvalve::testkit::TestPostgres::start(Default::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgvalve.toml");
    std::fs::write(&path, config_text(&pg, "1")).unwrap();
    let proxy = ProxyHandle::start(pgvalve::config::load(&path).unwrap()).await.unwrap();
    proxy.set_reload_source(Some(path.clone()), Default::default());
    let url = |db: &str| format!("postgres://app:app-secret@{}/{db}", proxy.local_addr());
    let http = proxy.http_addr().unwrap();

    // Five statements, then gone: the counters say exactly that.
    let c = connect(&url("app")).await.unwrap();
    for _ in 0..5 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    drop(c);
    let app = [("database", "app"), ("user", "app")];
    eventually(
        Duration::from_secs(5),
        "the session's counters are folded in",
        || async { sample(&http_get(http, "/metrics").await.1, "pgvalve_transactions_total", &app) == Some(5.0) },
    )
    .await;
    let body = http_get(http, "/metrics").await.1;
    assert_eq!(sample(&body, "pgvalve_queries_total", &app), Some(5.0));
    assert_eq!(sample(&body, "pgvalve_pool_size", &app), Some(1.0));
    let admin = connect(&url("pgvalve")).await.unwrap();
    let (_, stats) = table(&admin, "SHOW STATS").await;
    assert_eq!(
        (
            stats[0]["total_xact_count"].as_str(),
            stats[0]["total_query_count"].as_str()
        ),
        ("5", "5")
    );

    // pool_size 1 -> 3 live: three transactions at once, with the first client still connected;
    // and a user added to the file (a stats user of the console) can log in at once.
    let stay = connect(&url("app")).await.unwrap();
    let ops = format!("postgres://ops:ops-secret@{}/pgvalve", proxy.local_addr());
    assert_eq!(code(&connect(&ops).await.unwrap_err()).as_deref(), Some("28P01"));
    let with_ops = config_text(&pg, "3").replace(
        "admin_users = [\"app\"]\n",
        "admin_users = [\"app\"]\nstats_users = [\"ops\"]\n",
    ) + "[users.ops]\npassword = \"ops-secret\"\n";
    std::fs::write(&path, with_ops).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    table(&connect(&ops).await.expect("the new user logs in"), "SHOW POOLS").await;
    let (a, b) = (connect(&url("app")).await.unwrap(), connect(&url("app")).await.unwrap());
    for c in [&stay, &a, &b] {
        within(Duration::from_secs(3), c.batch_execute("BEGIN; SELECT 1"))
            .await
            .unwrap();
    }
    let (_, pools) = table(&admin, "SHOW POOLS").await;
    assert_eq!(
        (pools[0]["pool_size"].as_str(), pools[0]["sv_active"].as_str()),
        ("3", "3")
    );

    // A broken file: refused with the reason, nothing changes.
    std::fs::write(&path, config_text(&pg, "\"three\"")).unwrap();
    // (the refused file also drops ops: nothing of it may apply)
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&e).as_deref(), Some("F0000"));
    let why = e.as_db_error().unwrap().message();
    assert!(why.contains("pgvalve.toml:5:") && why.contains("expected u32"), "{why}");
    let body = http_get(http, "/metrics").await.1;
    assert_eq!(
        sample(&body, "pgvalve_config_reloads_total", &[("result", "failed")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "pgvalve_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(sample(&body, "pgvalve_pool_size", &app), Some(3.0));
    connect(&ops)
        .await
        .expect("the refused file changed nothing: ops still logs in");
    for c in [&stay, &a, &b] {
        c.batch_execute("COMMIT").await.expect("no client was dropped");
    }
    proxy.shutdown_now().await;
}

/// The metric families a scrape shows (histogram series folded into their family).
fn families(body: &str) -> std::collections::BTreeSet<String> {
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text");
    let histogram = |m: &str| {
        ["_count", "_sum"]
            .iter()
            .find_map(|sfx| {
                m.strip_suffix(sfx)
                    .filter(|f| scrape.samples.iter().any(|s| s.metric == *f))
            })
            .map(str::to_string)
    };
    scrape
        .samples
        .iter()
        .map(|s| histogram(&s.metric).unwrap_or_else(|| s.metric.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_dashboard_and_alerts_agree_on_names() {
    let s = Setup::new(|f| {
        f.http.listen = Some("127.0.0.1:0".into());
        f.locks.poll_interval = Duration::from_millis(200);
    })
    .await;
    let c = s.client().await;
    // Two batches: a table created in the locking transaction is invisible to the monitor.
    c.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    c.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let http = s.proxy.http_addr().unwrap();
    eventually(Duration::from_secs(5), "the lock shows in /metrics", || async {
        families(&http_get(http, "/metrics").await.1).contains("pgvalve_dangerous_locks")
    })
    .await;
    let seen = families(&http_get(http, "/metrics").await.1);
    for f in &seen {
        assert!(
            pgvalve::observe::METRICS.contains(&f.as_str()),
            "{f} is exported but not in observe::METRICS"
        );
    }
    // Everything the dashboard and the alert rules query is something pgvalve exports.
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "config/grafana/pgvalve-dashboard.json",
        "config/prometheus/pgvalve-alerts.yml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let mut names: Vec<&str> = text
            .match_indices("pgvalve_")
            .map(|(i, _)| {
                let rest = &text[i..];
                &rest[..rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len())]
            })
            .collect();
        names.dedup();
        assert!(!names.is_empty(), "{file} queries pgvalve metrics");
        for n in names {
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|sfx| n.strip_suffix(sfx).filter(|f| pgvalve::observe::METRICS.contains(f)))
                .unwrap_or(n);
            assert!(
                pgvalve::observe::METRICS.contains(&family),
                "{file} uses {n}, which pgvalve does not export"
            );
        }
    }
    if let Ok(serde_json::Value::Object(d)) =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/config/grafana/pgvalve-dashboard.json")).unwrap())
    {
        assert!(d["panels"].as_array().is_some_and(|p| p.len() >= 6));
    } else {
        panic!("the dashboard is a JSON object");
    }
    c.batch_execute("COMMIT").await.unwrap();
}

//! The operator's view: query and transaction times per identity (SHOW IDENTITIES and the
//! `/metrics` histograms), the status page and `/status.json`, and the page as a real browser
//! (headless Chromium) renders it under a noisy neighbour.

use std::time::Duration;

use pgvalve::config::PoolMode;
use tokio_postgres::SimpleQueryMessage;

use crate::admission::{http_get, http_get_with};
use crate::support::*;

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<&tokio_postgres::SimpleQueryRow> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// Sample values of one histogram series of a scrape, by `le`, for `identity`.
fn buckets(body: &str, family: &str, identity: &str) -> Vec<(f64, f64)> {
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text");
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == family && s.labels.get("identity") == Some(identity))
        .unwrap_or_else(|| panic!("{family} for {identity} in {body}"));
    match &s.value {
        prometheus_parse::Value::Histogram(h) => h.iter().map(|b| (b.less_than, b.count)).collect(),
        v => panic!("{family} is a histogram, not {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_transaction_times_per_identity_in_show_identities_and_metrics() {
    let s = Setup::new(|f| {
        f.http.listen = Some("127.0.0.1:0".into());
        f.pool.pool_mode = PoolMode::Transaction;
        f.admin.admin_users = vec!["app".into()];
    })
    .await;
    let slow = connect(&format!("{}?application_name=slow", s.url())).await.unwrap();
    let quick = connect(&format!("{}?application_name=quick", s.url())).await.unwrap();
    for _ in 0..4 {
        slow.batch_execute("SELECT pg_sleep(0.06)").await.unwrap();
    }
    // One transaction of two statements: two queries, one transaction of at least 60 ms.
    slow.batch_execute("BEGIN").await.unwrap();
    slow.batch_execute("SELECT pg_sleep(0.06)").await.unwrap();
    slow.batch_execute("COMMIT").await.unwrap();
    for _ in 0..10 {
        quick.batch_execute("SELECT 1").await.unwrap();
    }
    // A session folds its times in every 250 ms at most, and all of them when it ends.
    drop((slow, quick));
    let admin = connect(&s.url_as("app", "app-secret", "pgvalve")).await.unwrap();
    eventually(Duration::from_secs(5), "the sessions' times are folded in", || async {
        let out = admin.simple_query("SHOW IDENTITIES").await.unwrap();
        let queries = |id: &str| {
            rows(&out)
                .iter()
                .find(|r| r.get("identity") == Some(id))
                .and_then(|r| r.get("queries_1m").map(String::from))
        };
        queries("slow").as_deref() == Some("7") && queries("quick").as_deref() == Some("10")
    })
    .await;
    let out = admin.simple_query("SHOW IDENTITIES").await.unwrap();
    let row = |id: &str| {
        rows(&out)
            .into_iter()
            .find(|r| r.get("identity") == Some(id))
            .unwrap_or_else(|| panic!("identity {id} in SHOW IDENTITIES"))
    };
    let ms = |r: &tokio_postgres::SimpleQueryRow, col: &str| -> f64 { r.get(col).unwrap().parse().unwrap() };
    let slow_row = row("slow");
    assert_eq!(slow_row.get("queries_1m"), Some("7"), "5 sleeps, BEGIN and COMMIT");
    assert_eq!(slow_row.get("xacts_1m"), Some("5"));
    // pg_sleep(0.06) takes at least 60 ms: its bucket is 50..100 ms.
    assert!(
        ms(slow_row, "query_p50_ms") >= 50.0,
        "{:?}",
        slow_row.get("query_p50_ms")
    );
    assert!(ms(slow_row, "xact_p99_ms") >= 50.0);
    let quick_row = row("quick");
    assert_eq!(quick_row.get("queries_1m"), Some("10"));
    assert!(ms(quick_row, "query_p50_ms") < ms(slow_row, "query_p50_ms"));

    let http = s.proxy.http_addr().expect("http endpoint");
    let body = http_get(http, "/metrics").await.1;
    let slow_q = buckets(&body, "pgvalve_query_duration_seconds", "slow");
    assert_eq!(slow_q.first().map(|b| b.0), Some(0.0005), "buckets start at 0.5 ms");
    assert!(slow_q.iter().any(|b| b.0 == 60.0), "and reach 60 s");
    let at = |h: &[(f64, f64)], le: f64| h.iter().find(|b| b.0 == le).unwrap().1;
    assert_eq!(at(&slow_q, 0.05), 2.0, "only BEGIN and COMMIT under 50 ms");
    assert_eq!(at(&slow_q, f64::INFINITY), 7.0);
    let slow_x = buckets(&body, "pgvalve_transaction_duration_seconds", "slow");
    assert_eq!(at(&slow_x, 0.05), 0.0);
    assert_eq!(at(&slow_x, f64::INFINITY), 5.0);
    let quick_q = buckets(&body, "pgvalve_query_duration_seconds", "quick");
    assert_eq!(at(&quick_q, f64::INFINITY), 10.0);
}

/// A proxy with the status page under a noisy neighbour: "noisy" surged (20 connections at
/// once, capped at 6 server connections) and keeps running queries; "polite" has one client
/// and one blocked by "migrator", which holds an ACCESS EXCLUSIVE lock. Dropped: the loops stop.
struct Scene {
    s: Setup,
    _keep: Vec<tokio_postgres::Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn noisy_neighbour() -> Scene {
    let s = Setup::new(|f| {
        f.http.listen = Some("127.0.0.1:0".into());
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 10;
        f.admission.max_client_connections = 50;
        f.admission.max_server_connections = 6;
        f.admission.surge_delta = 5;
        f.admission.surge_cooldown = Duration::from_secs(120);
        f.locks.poll_interval = Duration::from_millis(200);
        f.admin.admin_users = vec!["app".into()];
    })
    .await;
    let mut keep = Vec::new();
    let mut tasks = Vec::new();
    let migrator = connect(&format!("{}?application_name=migrator", s.url()))
        .await
        .unwrap();
    migrator.batch_execute("CREATE TABLE orders (id int)").await.unwrap();
    migrator
        .batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let polite = connect(&format!("{}?application_name=polite", s.url())).await.unwrap();
    polite.batch_execute("SELECT 1").await.unwrap();
    let blocked = connect(&format!("{}?application_name=polite", s.url())).await.unwrap();
    tasks.push(tokio::spawn(async move {
        let _ = blocked.batch_execute("SELECT count(*) FROM orders").await;
    }));
    deadlock(&s).await;
    let noisy = futures_util::future::join_all(
        (0..20).map(|_| async { connect(&format!("{}?application_name=noisy", s.url())).await.unwrap() }),
    )
    .await;
    for c in noisy {
        tasks.push(tokio::spawn(async move {
            while c.batch_execute("SELECT pg_sleep(0.05)").await.is_ok() {}
        }));
    }
    keep.push(migrator);
    keep.push(polite);
    let http = s.proxy.http_addr().expect("http endpoint");
    eventually(Duration::from_secs(10), "noisy surges and the lock blocks", || async {
        let v: serde_json::Value = serde_json::from_str(&http_get(http, "/status.json").await.1).unwrap();
        let surging = v["identities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["identity"] == "noisy" && i["surging"] == true);
        let blocks = v["lock_holders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["blocks"].as_array().is_some_and(|b| !b.is_empty()));
        surging && blocks
    })
    .await;
    Scene { s, _keep: keep, tasks }
}

/// A real deadlock between "web" (for the view /api/pay/) and "worker": one of them is rolled
/// back; both transactions end.
async fn deadlock(s: &Setup) {
    let client =
        |app: &'static str| async move { connect(&format!("{}?application_name={app}", s.url())).await.unwrap() };
    let (web, worker) = (client("web").await, client("worker").await);
    web.batch_execute("CREATE TABLE acct (id int PRIMARY KEY); INSERT INTO acct VALUES (1), (2)")
        .await
        .unwrap();
    let tag = |route: &str, view: &str| format!("/*controller='{view}',route='{route}'*/");
    let (web_tag, worker_tag) = (tag("%2Fapi%2Fpay%2F", "checkout"), tag("%2Fjobs%2Fsettle%2F", "settle"));
    let update = |id: u8, tag: &str| format!("UPDATE acct SET id = id WHERE id = {id} {tag}");
    web.batch_execute(&format!("BEGIN; {}", update(1, &web_tag)))
        .await
        .unwrap();
    worker
        .batch_execute(&format!("BEGIN; {}", update(2, &worker_tag)))
        .await
        .unwrap();
    let second = update(2, &web_tag);
    let web_waits = tokio::spawn(async move {
        let r = web.batch_execute(&second).await;
        (web, r)
    });
    let su = s.pg.superuser().await.unwrap();
    eventually(Duration::from_secs(10), "web waits for worker's row", || async {
        let r = su
            .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
            .await
            .unwrap();
        r.get::<_, i64>(0) > 0
    })
    .await;
    let worker_second = worker.batch_execute(&update(1, &worker_tag)).await;
    let (web, web_second) = within(Duration::from_secs(10), web_waits).await.unwrap();
    assert!(
        web_second.is_err() != worker_second.is_err(),
        "one side is rolled back: {web_second:?} {worker_second:?}"
    );
    // Both transactions stay open until the deadlock is recorded (the winner's route is read
    // from its statement in pg_stat_activity).
    let http = s.proxy.http_addr().expect("http endpoint");
    eventually(Duration::from_secs(10), "the deadlock is recorded", || async {
        let v: serde_json::Value = serde_json::from_str(&http_get(http, "/status.json").await.1).unwrap();
        v["deadlocks"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    for c in [web, worker] {
        let _ = c.batch_execute("ROLLBACK").await;
    }
}

#[allow(clippy::too_many_lines)] // a test: the 80-line rule is for non-test code
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_identities_caps_surges_locks_and_pools() {
    let scene = noisy_neighbour().await;
    let http = scene.s.proxy.http_addr().unwrap();
    let (head, body) = http_get(http, "/status.json").await;
    assert_eq!(head, "HTTP/1.1 200 OK");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["postgres"]["reachable"], true);
    let ids = v["identities"].as_array().unwrap();
    let id = |name: &str| {
        ids.iter()
            .find(|i| i["identity"] == name)
            .unwrap_or_else(|| panic!("{name} in {body}"))
    };
    assert_eq!(id("noisy")["clients"], 20);
    assert_eq!(id("noisy")["surging"], true);
    assert_eq!(id("polite")["surging"], false);
    assert_eq!(id("polite")["clients"], 2);
    let servers: Vec<u64> = ids.iter().map(|i| i["server_connections"].as_u64().unwrap()).collect();
    assert!(
        servers.windows(2).all(|w| w[0] >= w[1]),
        "sorted by server connections: {servers:?}"
    );
    assert!(servers[0] <= 6, "noisy's cap");
    assert_eq!(id("noisy")["max_server_connections"], 6);
    assert_eq!(id("noisy")["max_client_connections"], 50);
    assert!(
        id("noisy")["history"]["clients"]
            .as_array()
            .is_some_and(|h| !h.is_empty()),
        "sampled once a second"
    );
    assert_eq!(id("migrator")["lock_holders"], 1);
    let holder = &v["lock_holders"].as_array().unwrap()[0];
    assert_eq!(holder["identity"], "migrator");
    assert_eq!(holder["mode"], "AccessExclusiveLock");
    assert_eq!(holder["relation"], "orders");
    assert_eq!(holder["blocks"][0]["identity"], "polite");
    assert!(v["surges"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["identity"] == "noisy" && e["ended"].is_null()));
    assert_eq!(
        (id("web")["deadlocks"].as_u64(), id("worker")["deadlocks"].as_u64()),
        (Some(1), Some(1))
    );
    let d = &v["deadlocks"].as_array().unwrap()[0];
    assert_eq!(d["cycle_known"], true, "{d}");
    let sides = d["sides"].as_array().unwrap();
    let side = |who: &str| {
        sides
            .iter()
            .find(|p| p["identity"] == who)
            .unwrap_or_else(|| panic!("{who} in {d}"))
    };
    assert_eq!(
        (side("web")["route"].as_str(), side("web")["controller"].as_str()),
        (Some("/api/pay/"), Some("checkout"))
    );
    assert_eq!(side("worker")["route"], "/jobs/settle/");
    assert_eq!(sides.iter().filter(|p| p["rolled_back"] == true).count(), 1);
    assert!(
        side("web")["waited_for"]
            .as_str()
            .unwrap()
            .starts_with("ShareLock on transaction"),
        "{d}"
    );
    assert!(!body.contains("UPDATE acct"), "no statement text on the page");
    let pool = &v["pools"].as_array().unwrap()[0];
    assert_eq!(
        (pool["database"].as_str(), pool["pool_size"].as_u64()),
        (Some("app"), Some(10))
    );
    // No secret: no password of the configuration, no connection string.
    assert!(!body.contains("secret") && !body.contains("postgres://"), "{body}");
    let (head, page) = http_get(http, "/").await;
    assert_eq!(head, "HTTP/1.1 200 OK");
    assert!(page.contains("<meta http-equiv=\"refresh\""));
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("<script"),
        "self-contained"
    );
    assert!(page.contains("class=\"identity surging\" data-identity=\"noisy\""));
    // `pgvalve top` reads the same picture, over HTTP and through the console.
    let top = pgvalve::top::Source::http(&format!("http://{http}"), None)
        .unwrap()
        .read()
        .await
        .unwrap();
    let noisy = top.rows.iter().find(|r| r.identity == "noisy").expect("noisy in top");
    assert!(
        noisy.surging && noisy.clients == 20 && noisy.max_servers == 6,
        "{noisy:?}"
    );
    assert_eq!(
        top.rows.iter().find(|r| r.identity == "migrator").unwrap().lock_holders,
        1
    );
    let console = scene.s.url_as("app", "app-secret", "pgvalve");
    let top = pgvalve::top::Source::console(&console).read().await.unwrap();
    let noisy = top
        .rows
        .iter()
        .find(|r| r.identity == "noisy")
        .expect("noisy through the console");
    assert!(noisy.surging && noisy.clients == 20, "{noisy:?}");
    assert_eq!(
        top.rows.iter().find(|r| r.identity == "migrator").unwrap().lock_holders,
        1
    );
    drop(scene);
}

/// Chromium from Debian's package: found on PATH (or PGVALVE_CHROMIUM), installed with
/// apt-get when missing and root; None otherwise.
fn chromium() -> Option<String> {
    let find = || {
        std::env::var("PGVALVE_CHROMIUM")
            .ok()
            .into_iter()
            .chain(["chromium".into(), "chromium-browser".into()])
            .find(|c| {
                std::process::Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
    };
    if let Some(c) = find() {
        return Some(c);
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if root {
        eprintln!("installing chromium (Debian package) for the status page test");
        let ok = std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return find();
        }
    }
    None
}

/// Runs headless Chromium with `args` on `url` (killed after 60 s); its stdout.
async fn headless(chromium: &str, args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = within(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_renders_the_status_page_under_a_noisy_neighbour() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIPPED: no chromium (apt-get install chromium, or set PGVALVE_CHROMIUM)");
        return;
    };
    let scene = noisy_neighbour().await;
    let url = format!("http://{}/", scene.s.proxy.http_addr().unwrap());
    let dom = headless(&chromium, &["--dump-dom"], &url).await;
    // The DOM as the browser built it (after parsing and layout), serialized.
    let identities: Vec<&str> = dom
        .match_indices("data-identity=\"")
        .map(|(i, m)| {
            let rest = &dom[i + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    for want in ["noisy", "polite", "migrator"] {
        assert!(identities.contains(&want), "{want} rendered: {identities:?}");
    }
    assert!(
        dom.contains("class=\"identity surging\" data-identity=\"noisy\""),
        "noisy marked as surging"
    );
    assert!(dom.contains(">SURGING<"));
    assert!(!dom.contains("class=\"identity surging\" data-identity=\"polite\""));
    let charts = dom.matches("<svg class=\"spark\"").count();
    assert_eq!(
        charts,
        identities.len() * 5,
        "an SVG per chart, five charts per identity"
    );
    assert!(
        dom.contains("AccessExclusiveLock") && dom.contains("orders"),
        "the lock holder"
    );
    assert!(dom.contains("Surge episodes"));
    assert!(
        dom.contains("Recent deadlocks") && dom.contains("/api/pay/ (checkout)"),
        "the deadlock and its view"
    );
    assert!(
        dom.contains("data-deadlocks=\"1\""),
        "web's and worker's cards count it"
    );
    // A screenshot as a phone and as a desktop would show it.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    for (name, size) in [("status-page.png", "1280,1500"), ("status-page-phone.png", "412,1400")] {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        headless(
            &chromium,
            &[
                &format!("--screenshot={}", path.display()),
                &format!("--window-size={size}"),
            ],
            &url,
        )
        .await;
        let png = std::fs::read(&path).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name}: a real picture"
        );
    }
    drop(scene);
}

/// This machine's address other hosts would see (the source of a route outwards), if it has
/// one that is not loopback.
fn outward_address() -> Option<std::net::IpAddr> {
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    udp.connect("192.0.2.1:9").ok()?;
    Some(udp.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// From another address than loopback the status page needs the configured credentials
/// (403 when none are configured, 401 until given); `/metrics` and the probes stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hosts_need_the_configured_credentials_for_the_status_page() {
    let Some(ip) = outward_address() else {
        eprintln!("SKIPPED: this machine has no address but loopback");
        return;
    };
    let token = "a-token-of-at-least-16-characters";
    for (auth, good, bad) in [
        (None, None, None),
        (
            Some("token"),
            Some(format!("Authorization: Bearer {token}\r\n")),
            Some("Authorization: Bearer nope-nope-nope-nope\r\n".to_string()),
        ),
        (
            Some("basic"),
            Some("Authorization: Basic b3BzOnMzY3JldC1wYXNzd29yZA==\r\n".to_string()),
            Some("Authorization: Basic b3BzOndyb25n\r\n".to_string()),
        ),
    ] {
        let s = Setup::new(|f| {
            f.http.listen = Some("0.0.0.0:0".into());
            match auth {
                Some("token") => f.http.auth_token = Some(pgvalve::config::Secret(token.into())),
                Some(_) => {
                    f.http.auth_user = Some("ops".into());
                    f.http.auth_password = Some(pgvalve::config::Secret("s3cret-password".into()));
                }
                None => {}
            }
        })
        .await;
        let port = s.proxy.http_addr().unwrap().port();
        let (outside, inside) = ((ip, port).into(), ([127, 0, 0, 1], port).into());
        for path in ["/", "/status.json"] {
            assert_eq!(http_get(inside, path).await.0, "HTTP/1.1 200 OK", "loopback: {path}");
            let (head, body) = http_get(outside, path).await;
            let want = if auth.is_none() {
                "HTTP/1.1 403 Forbidden"
            } else {
                "HTTP/1.1 401 Unauthorized"
            };
            assert_eq!(head, want, "{auth:?} {path}: {body}");
            if let (Some(good), Some(bad)) = (&good, &bad) {
                assert_eq!(
                    http_get_with(outside, path, bad).await.0,
                    "HTTP/1.1 401 Unauthorized",
                    "{auth:?}"
                );
                assert_eq!(
                    http_get_with(outside, path, good).await.0,
                    "HTTP/1.1 200 OK",
                    "{auth:?}"
                );
            }
        }
        for path in ["/metrics", "/healthz"] {
            assert_eq!(http_get(outside, path).await.0, "HTTP/1.1 200 OK", "{path} stays open");
        }
    }
}

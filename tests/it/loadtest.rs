//! `pgvalve loadtest` against pgvalve in front of a real PostgreSQL: every scenario runs and
//! measures what it should, Ctrl-C (the stop flag) ends a run early with a report, the HTML
//! report is self-contained well-formed XHTML with its charts, and the binary writes the
//! JSON and HTML files from a scenario file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgvalve::config::PoolMode;
use pgvalve::loadtest::{plan, report, run, LockKind, Outcome};

use crate::support::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn go(p: &pgvalve::loadtest::Plan, observe: &str) -> Outcome {
    within(
        Duration::from_secs(30),
        run(p, Some(observe), Arc::new(AtomicBool::new(false))),
    )
    .await
    .expect("the run ends by itself")
}

fn tx_mode() -> impl FnOnce(&mut pgvalve::config::FileConfig) {
    |f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 8;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_measures() {
    let s = Setup::new(tx_mode()).await;
    let (url, direct) = (s.url(), s.pg.url());

    // surge: 40 clients in 300 ms, each for 700 ms, twice.
    let o = go(
        &plan::surge(&url, 40, ms(300), ms(700), 2, ms(200), "SELECT 1"),
        &direct,
    )
    .await;
    let g = &o.groups[0];
    assert_eq!(g.connect.len(), 80, "every client connected once per round");
    assert!(g.transactions > 80 && g.error_count() == 0, "{:?}", g.errors);
    assert!(o.samples.iter().any(|x| x.server_connections > 0) && o.max_connections.is_some());
    assert!(
        o.samples.iter().all(|x| x.server_connections <= 8 + 1),
        "the pool caps the server side"
    );

    // noisy-neighbor: per identity results.
    let o = go(
        &plan::noisy_neighbor(&url, 12, 2, ms(1000), "SELECT 1", "SELECT 1", ms(20)),
        &direct,
    )
    .await;
    let names: Vec<&str> = o.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["greedy", "polite"]);
    assert!(o.groups.iter().all(|g| g.transactions > 0 && g.error_count() == 0));
    // Jain's index of per-client throughput: greedy clients never pause, polite ones do.
    let x: Vec<f64> = o.groups.iter().map(|g| g.tps() / g.clients as f64).collect();
    let want = x.iter().sum::<f64>().powi(2) / (2.0 * x.iter().map(|v| v * v).sum::<f64>());
    let j = report::fairness(&o.groups);
    assert!((j - want).abs() < 1e-9 && j > 0.5 - 1e-9 && j < 1.0, "{j}");

    // lock-holder: the holder's lock is seen by the observer while readers wait on it.
    let o = go(
        &plan::lock_holder(&url, 1, 4, ms(2000), ms(600), LockKind::Table, "lt"),
        &direct,
    )
    .await;
    assert!(o.samples.iter().any(|x| x.dangerous_locks >= 1), "{:?}", o.samples);
    let (holder, reader) = (&o.groups[0], &o.groups[1]);
    assert!(
        holder.transactions >= 1 && holder.ms(0.5) >= 600.0,
        "held ~600 ms each time"
    );
    assert!(reader.latency.max() >= 100_000, "readers waited behind the lock");

    // steady, open loop at 200/s for 1.5 s with 20% read-write: arrivals follow the rate.
    let o = go(&plan::steady(&url, 4, ms(1500), 200.0, 0.2, "st"), &direct).await;
    let g = &o.groups[0];
    assert!(
        (250..=301).contains(&g.transactions),
        "{} transactions at 200/s for 1.5 s",
        g.transactions
    );
    assert_eq!(g.error_count(), 0, "{:?}", g.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_a_run_early_and_the_report_is_self_contained() {
    let s = Setup::new(tx_mode()).await;
    let p = plan::noisy_neighbor(&s.url(), 4, 2, Duration::from_secs(30), "SELECT 1", "SELECT 1", ms(10));
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ms(1200)).await;
        flag.store(true, Ordering::Relaxed);
    });
    let o = within(Duration::from_secs(5), run(&p, Some(&s.pg.url()), stop))
        .await
        .unwrap();
    assert!(o.stopped && o.elapsed < Duration::from_secs(4));
    assert!(o.groups.iter().all(|g| g.transactions > 0));

    let page = report::html(&o);
    assert!(page.starts_with("<!DOCTYPE html>"));
    // Well-formed (XHTML syntax): an XML parser reads it to the end.
    let mut reader = quick_xml::Reader::from_str(&page);
    let (mut svgs, mut elements) = (0, 0);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(quick_xml::events::Event::Start(e)) => {
                elements += 1;
                svgs += usize::from(e.name().as_ref() == b"svg");
            }
            Ok(_) => {}
            Err(e) => panic!("not well-formed at {}: {e}", reader.buffer_position()),
        }
    }
    assert!(svgs >= 5 && elements > 50, "{svgs} charts");
    for needle in [
        "Throughput over time",
        "p99 latency over time",
        "against the cap",
        "Errors over time",
        "Latency per identity",
    ] {
        assert!(page.contains(needle), "missing chart {needle}");
    }
    for outside in ["<script", " src=", "href=", "@import", "url("] {
        assert!(!page.contains(outside), "the report must not load anything: {outside}");
    }
    assert!(!page.contains("app-secret"), "the password is redacted");
    let json: serde_json::Value = serde_json::from_str(&report::json(&o)).unwrap();
    assert_eq!(json["groups"][0]["name"], "greedy");
    assert!(json["groups"][1]["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(json["peak_server_connections"].as_i64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_a_scenario_file_and_writes_json_and_html() {
    let s = Setup::new(tx_mode()).await;
    let dir = tempfile::tempdir().unwrap();
    let (json, html) = (dir.path().join("out.json"), dir.path().join("out.html"));
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/loadtest/lock-holder.toml");
    let stdout = loadtest_bin(
        &[
            std::ffi::OsStr::new("loadtest"),
            std::ffi::OsStr::new("--file"),
            std::ffi::OsStr::new(file),
            std::ffi::OsStr::new("--duration"),
            std::ffi::OsStr::new("2s"),
            std::ffi::OsStr::new("--target"),
            std::ffi::OsStr::new(&s.url()),
            std::ffi::OsStr::new("--observe"),
            std::ffi::OsStr::new(&s.pg.url()),
            std::ffi::OsStr::new("--json"),
            json.as_os_str(),
            std::ffi::OsStr::new("--report"),
            html.as_os_str(),
        ],
        30,
    )
    .await;
    assert!(
        stdout.contains("holder") && stdout.contains("reader") && stdout.contains("Jain"),
        "{stdout}"
    );
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["scenario"], "lock-holder");
    assert!(j["peak_dangerous_locks"].as_i64().unwrap() >= 1);
    assert!(std::fs::read_to_string(&html).unwrap().contains("<svg"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_through_pgvalve_with_a_cap_of_10_stays_under_it() {
    let s = Setup::new(|f| {
        f.pool.pool_mode = PoolMode::Transaction;
        f.pool.pool_size = 10;
        f.pool.max_server_connections = 10.into();
        // Only the pools' connections: the lock monitor's own would be an 11th.
        f.locks.enabled = false;
    })
    .await;
    let p = plan::surge(&s.url(), 80, ms(300), ms(1200), 1, ms(0), "SELECT pg_sleep(0.002)");
    let o = go(&p, &s.pg.url()).await;
    let j: serde_json::Value = serde_json::from_str(&report::json(&o)).unwrap();
    let peak = j["peak_server_connections"].as_i64().unwrap();
    assert!((1..=10).contains(&peak), "peak {peak}");
    let errors = j["groups"][0]["errors"].as_object().unwrap();
    assert!(
        errors.keys().all(|e| e.starts_with("53300")),
        "only refusals, if any: {errors:?}"
    );
    assert!(j["groups"][0]["transactions"].as_u64().unwrap() > 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_compares_pgvalve_with_postgresql_directly() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e.json");
    let stdout = loadtest_bin(
        &[
            std::ffi::OsStr::new("loadtest"),
            std::ffi::OsStr::new("surge"),
            std::ffi::OsStr::new("--ephemeral"),
            std::ffi::OsStr::new("--clients"),
            std::ffi::OsStr::new("80"),
            std::ffi::OsStr::new("--ramp"),
            std::ffi::OsStr::new("300ms"),
            std::ffi::OsStr::new("--hold"),
            std::ffi::OsStr::new("1s"),
            std::ffi::OsStr::new("--json"),
            json.as_os_str(),
        ],
        60,
    )
    .await;
    assert!(
        stdout.contains("== side by side") && stdout.contains("PostgreSQL directly"),
        "{stdout}"
    );
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let peak = j["peak_server_connections"].as_i64().unwrap();
    assert!(
        peak <= i64::from(pgvalve::loadtest::compare::EPHEMERAL_POOL_SIZE) + 1,
        "pool + lock monitor: {peak}"
    );
    assert_eq!(
        j["groups"][0]["errors"].as_object().unwrap().len(),
        0,
        "pgvalve absorbs the surge"
    );
}

/// Runs `pgvalve ARGS` (bounded by `secs`), asserts success, returns stdout.
async fn loadtest_bin(args: &[&std::ffi::OsStr], secs: u64) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgvalve"))
        .args(args)
        .output();
    let out = within(Duration::from_secs(secs), out).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `pgvalve_identity_logins_total` of `identity` on a proxy's /metrics.
async fn logins(proxy: &pgvalve::ProxyHandle, identity: &str) -> u64 {
    let (_, body) = crate::admission::http_get(proxy.http_addr().unwrap(), "/metrics").await;
    body.lines()
        .find(|l| l.starts_with("pgvalve_identity_logins_total{") && l.contains(&format!("identity=\"{identity}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

/// Several --target: the clients are spread across them (here two pgvalve instances and
/// PostgreSQL itself), each keeps the group's application_name (one identity on every
/// instance), and the results come per target in the table and the JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_spreads_clients_over_several_targets_and_reports_per_target() {
    let with_http = |f: &mut pgvalve::config::FileConfig| {
        tx_mode()(f);
        f.http.listen = Some("127.0.0.1:0".into());
    };
    let s = Setup::new(with_http).await;
    let mut f = s.pg.file_config();
    with_http(&mut f);
    let second = pgvalve::ProxyHandle::start(pgvalve::Config::validate(f, "second").unwrap())
        .await
        .unwrap();
    let b = s
        .url_as("app", "app-secret", "app")
        .replace(&s.proxy.local_addr().to_string(), &second.local_addr().to_string());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let (a, direct) = (s.url(), s.pg.url());
    let words = [
        "loadtest",
        "surge",
        "--clients",
        "31",
        "--ramp",
        "300ms",
        "--hold",
        "700ms",
        "--target",
        &a,
        "--target",
        &b,
        "--target",
        &direct,
    ];
    let args: Vec<&std::ffi::OsStr> = words
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([std::ffi::OsStr::new("--json"), json.as_os_str()])
        .collect();
    let stdout = loadtest_bin(&args, 60).await;
    assert!(stdout.contains("per target:"), "{stdout}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per: Vec<(String, u64, u64, u64)> = j["per_target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap().to_string(),
                t["clients"].as_u64().unwrap(),
                t["transactions"].as_u64().unwrap(),
                t["errors"].as_u64().unwrap(),
            )
        })
        .collect();
    let label = |url: &str| pgvalve::loadtest::plan::target_label(url);
    assert_eq!(
        per.iter().map(|p| (p.0.clone(), p.1)).collect::<Vec<_>>(),
        [(label(&a), 11), (label(&b), 10), (label(&direct), 10)]
    );
    assert!(per.iter().all(|p| p.2 >= p.1 && p.3 == 0), "{per:?}");
    assert!(!j["target"].as_str().unwrap().contains("app-secret"));
    // Each instance saw its share of the clients, all as the one identity "surge".
    assert_eq!(logins(&s.proxy, "surge").await, 11);
    assert_eq!(logins(&second, "surge").await, 10);
    second.shutdown().await;
}

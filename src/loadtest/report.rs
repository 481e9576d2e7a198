//! How a load test's results are shown: a terminal table, JSON for machines, and a
//! self-contained HTML report with SVG charts (throughput and p99 over time, server
//! connections against the cap, errors over time, latency per identity).
//!
//! Part of `pgvalve loadtest`; pure functions of an [`Outcome`]. The HTML is also
//! well-formed XML (every tag closed, text escaped) and needs no network: no scripts, no
//! fonts, no links.

use std::fmt::Write as _;

use serde::Serialize;

use super::measure::{jain, GroupReport};
use super::run::Outcome;

/// The target URL with its password hidden.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The target, or the targets (HOST:PORT) when the clients were spread over several.
pub(crate) fn targets(o: &Outcome) -> String {
    let t = per_target(&o.groups);
    if t.is_empty() {
        redact(&o.plan.target)
    } else {
        t.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Jain's index over the groups' per-client throughput.
pub fn fairness(groups: &[GroupReport]) -> f64 {
    let x: Vec<f64> = groups
        .iter()
        .filter(|g| g.clients > 0)
        .map(|g| g.tps() / g.clients as f64)
        .collect();
    jain(&x)
}

/// The terminal table: one line per group, errors under it, then fairness and what was
/// observed.
pub fn table(o: &Outcome) -> String {
    let w = o.groups.iter().map(|g| g.name.len()).max().unwrap_or(0).max(10);
    let mut out = format!(
        "{:<w$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>8}\n",
        "group", "clients", "tx", "tps", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "conn p99 ms", "errors"
    );
    for r in &o.groups {
        let _ = writeln!(
            out,
            "{:<w$} {:>7} {:>9} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>8}",
            r.name,
            r.clients,
            r.transactions,
            r.tps(),
            r.ms(0.5),
            r.ms(0.9),
            r.ms(0.99),
            r.ms(0.999),
            r.latency.max() as f64 / 1000.0,
            r.connect.value_at_quantile(0.99) as f64 / 1000.0,
            r.error_count()
        );
        for (e, n) in &r.errors {
            let _ = writeln!(out, "    {n} x {e}");
        }
        if r.unfinished > 0 {
            let _ = writeln!(
                out,
                "    {} transaction(s) still running at the end (not in the latency)",
                r.unfinished
            );
        }
    }
    let targets = per_target(&o.groups);
    if !targets.is_empty() {
        let w = targets.iter().map(|t| t.name.len()).max().unwrap_or(0).max(10);
        let _ = writeln!(
            out,
            "per target:\n{:<w$} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "target", "clients", "tx", "tps", "p50 ms", "p99 ms", "max ms", "errors"
        );
        for t in &targets {
            let _ = writeln!(
                out,
                "{:<w$} {:>7} {:>9} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>8}",
                t.name,
                t.clients,
                t.transactions,
                t.tps(),
                t.ms(0.5),
                t.ms(0.99),
                t.latency.max() as f64 / 1000.0,
                t.error_count()
            );
        }
    }
    let _ = writeln!(
        out,
        "Jain fairness index (per-client throughput): {:.3}",
        fairness(&o.groups)
    );
    if let Some(max) = o.max_connections {
        let peak = o.samples.iter().map(|s| s.server_connections).max().unwrap_or(0);
        let locks = o.samples.iter().map(|s| s.dangerous_locks).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "observed: peak server connections {peak} ({} before the run; max_connections {max}), peak dangerous locks {locks}",
            o.before.unwrap_or(0)
        );
    }
    if o.stopped {
        out.push_str("(stopped early by Ctrl-C: figures cover the time run)\n");
    }
    out
}

/// The groups' results added up per target (several `--target`), in the targets' order;
/// empty with one target.
pub fn per_target(groups: &[GroupReport]) -> Vec<GroupReport> {
    let mut out: Vec<GroupReport> = Vec::new();
    for g in groups {
        let Some(t) = g.target.as_deref() else { continue };
        let i = match out.iter().position(|r| r.name == t) {
            Some(i) => i,
            None => {
                out.push(GroupReport::new(t, 0));
                out.len() - 1
            }
        };
        let r = &mut out[i];
        r.clients += g.clients;
        r.transactions += g.transactions;
        r.unfinished += g.unfinished;
        for (e, n) in &g.errors {
            *r.errors.entry(e.clone()).or_default() += n;
        }
        // Same bounds on both sides: adding cannot fail.
        let _ = r.latency.add(&g.latency);
        let _ = r.connect.add(&g.connect);
        r.elapsed = r.elapsed.max(g.elapsed);
        r.target = Some(t.to_string());
    }
    out
}

#[derive(Serialize)]
struct Quantiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

#[derive(Serialize)]
struct SecondJson {
    second: usize,
    transactions: u64,
    errors: u64,
    p99_ms: f64,
}

#[derive(Serialize)]
struct GroupJson<'a> {
    name: &'a str,
    /// HOST:PORT, with several targets.
    target: Option<&'a str>,
    clients: usize,
    transactions: u64,
    unfinished: u64,
    tps: f64,
    latency_ms: Quantiles,
    connect_ms: Quantiles,
    errors: &'a std::collections::BTreeMap<String, u64>,
    timeline: Vec<SecondJson>,
}

#[derive(Serialize)]
struct Json<'a> {
    scenario: &'a str,
    target: String,
    elapsed_seconds: f64,
    stopped: bool,
    jain_fairness: f64,
    groups: Vec<GroupJson<'a>>,
    /// With several targets: the groups added up per target.
    per_target: Vec<TargetJson>,
    max_connections: Option<i64>,
    server_connections_before: Option<i64>,
    peak_server_connections: Option<i64>,
    peak_dangerous_locks: Option<i64>,
    observed: &'a [super::measure::Sample],
    in_flight: &'a [(f64, i64)],
}

#[derive(Serialize)]
struct TargetJson {
    target: String,
    clients: usize,
    transactions: u64,
    tps: f64,
    latency_ms: Quantiles,
    errors: u64,
}

fn quantiles(h: &hdrhistogram::Histogram<u64>) -> Quantiles {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Quantiles {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p999: ms(0.999),
        max: h.max() as f64 / 1000.0,
    }
}

/// The results as JSON.
pub fn json(o: &Outcome) -> String {
    let observed = !o.samples.is_empty();
    let j = Json {
        scenario: &o.plan.scenario,
        target: targets(o),
        elapsed_seconds: o.elapsed.as_secs_f64(),
        stopped: o.stopped,
        jain_fairness: fairness(&o.groups),
        groups: o
            .groups
            .iter()
            .map(|g| GroupJson {
                name: &g.name,
                target: g.target.as_deref(),
                clients: g.clients,
                transactions: g.transactions,
                unfinished: g.unfinished,
                tps: g.tps(),
                latency_ms: quantiles(&g.latency),
                connect_ms: quantiles(&g.connect),
                errors: &g.errors,
                timeline: g
                    .timeline
                    .iter()
                    .enumerate()
                    .map(|(i, s)| SecondJson {
                        second: i,
                        transactions: s.transactions,
                        errors: s.errors,
                        p99_ms: s.latency.value_at_quantile(0.99) as f64 / 1000.0,
                    })
                    .collect(),
            })
            .collect(),
        per_target: per_target(&o.groups)
            .iter()
            .map(|t| TargetJson {
                target: t.name.clone(),
                clients: t.clients,
                transactions: t.transactions,
                tps: t.tps(),
                latency_ms: quantiles(&t.latency),
                errors: t.error_count(),
            })
            .collect(),
        max_connections: o.max_connections,
        server_connections_before: o.before,
        peak_server_connections: observed.then(|| o.samples.iter().map(|s| s.server_connections).max().unwrap_or(0)),
        peak_dangerous_locks: observed.then(|| o.samples.iter().map(|s| s.dangerous_locks).max().unwrap_or(0)),
        observed: &o.samples,
        in_flight: &o.in_flight,
    };
    serde_json::to_string_pretty(&j).expect("invariant: plain data serializes")
}

pub use super::html::html;

//! The latency histograms of `/metrics`: `pgvalve_query_duration_seconds` and
//! `pgvalve_transaction_duration_seconds` per identity and pool (database, user), buckets
//! from 0.5 ms to 60 s, since start, written as Prometheus text.
//!
//! Part of the HTTP endpoint; reads [`crate::pool::latency`].

use std::fmt::Write;
use std::time::Instant;

use crate::pool::latency::{Hist, Reading, BOUNDS_US};

/// A label value with `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, help: &str, readings: &[Reading], pick: fn(&Reading) -> &Hist) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for r in readings {
        let h = pick(r);
        let labels = format!(
            "identity=\"{}\",database=\"{}\",user=\"{}\"",
            esc(&r.identity),
            esc(&r.pool.database),
            esc(&r.pool.user)
        );
        let mut cumulative = 0;
        for (i, n) in h.counts.iter().enumerate() {
            cumulative += n;
            let le = BOUNDS_US
                .get(i)
                .map_or("+Inf".to_string(), |b| (*b as f64 / 1e6).to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Both histogram families as Prometheus text (nothing when nothing was timed yet).
pub(super) fn render(latencies: &crate::pool::latency::Latencies) -> String {
    let readings = latencies.read(Instant::now());
    let mut out = String::new();
    if readings.is_empty() {
        return out;
    }
    family(
        &mut out,
        "pgvalve_query_duration_seconds",
        "Server-side time of a request (Query, or extended batch to Sync) until ReadyForQuery.",
        &readings,
        |r| &r.total.query,
    );
    family(
        &mut out,
        "pgvalve_transaction_duration_seconds",
        "Server-side time of a transaction, first request to ReadyForQuery idle.",
        &readings,
        |r| &r.total.xact,
    );
    out
}

//! `SHOW IDENTITIES`: per client identity, its connections now and how long its queries and
//! transactions took in the last minute (count, p50, p99), server-side, from the relay's
//! ReadyForQuery timing ([`crate::pool::latency`]).
//!
//! Part of the admin console's read-only commands.

use std::time::{Duration, Instant};

use crate::pool::latency::Hist;
use crate::protocol::messages::ColumnType::{Float8, Int8, Text};

use super::show::{s, Table};
use super::Admin;

/// Milliseconds with three decimals, or NULL when nothing was timed.
fn ms(d: Option<Duration>) -> Option<String> {
    d.map(|d| format!("{:.3}", d.as_secs_f64() * 1000.0))
}

fn quantiles(h: &Hist) -> [Option<String>; 3] {
    [s(h.count()), ms(h.quantile(0.5)), ms(h.quantile(0.99))]
}

pub(super) fn identities(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(&[
        ("identity", Text),
        ("clients", Int8),
        ("server_connections", Int8),
        ("waiting", Int8),
        ("surging", Text),
        ("queries_1m", Int8),
        ("query_p50_ms", Float8),
        ("query_p99_ms", Float8),
        ("xacts_1m", Int8),
        ("xact_p50_ms", Float8),
        ("xact_p99_ms", Float8),
    ]);
    let mut times = shared.pools.stats.latency.minute_by_identity(Instant::now());
    for i in shared.admission.identities() {
        let l = times.remove(i.identity.as_str()).unwrap_or_default();
        let mut row = vec![
            s(&i.identity),
            s(i.clients),
            s(i.servers),
            s(i.waiting),
            s(if i.surging { "yes" } else { "no" }),
        ];
        row.extend(quantiles(&l.query));
        row.extend(quantiles(&l.xact));
        t.rows.push(row);
    }
    // Identities admission forgot (no client for a while) whose times are still in the minute.
    for (id, l) in times.into_iter().filter(|(_, l)| !l.is_empty()) {
        let mut row = vec![s(&id), s(0), s(0), s(0), s("no")];
        row.extend(quantiles(&l.query));
        row.extend(quantiles(&l.xact));
        t.rows.push(row);
    }
    t
}

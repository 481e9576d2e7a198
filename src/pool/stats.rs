//! Traffic counters per pool: what `SHOW STATS` and the `pgvalve_transactions_total` family
//! report, with PgBouncer's meanings.
//!
//! Part of the pool step. A session adds to its own [`Local`] tally on the hot path (no
//! shared memory touched) and folds it into its pool's shared [`Counters`] at most every
//! [`FLUSH_EVERY`] and when it ends, so the counters are never more than that behind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::PoolKey;

/// How far a session's tally may run ahead of the shared counters.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Totals since start, as PgBouncer's `SHOW STATS` names them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Times a server connection was assigned to a client.
    pub(crate) server_assignments: u64,
    /// Transactions (ReadyForQuery 'I' after a request: also single statements outside one).
    pub(crate) xacts: u64,
    /// Queries (requests answered by ReadyForQuery: a Query, or an extended batch up to Sync).
    pub queries: u64,
    /// Bytes received from clients.
    pub(crate) received: u64,
    /// Bytes sent to clients (received from servers).
    pub sent: u64,
    /// Microseconds spent in transactions.
    pub(crate) xact_us: u64,
    /// Microseconds spent in queries.
    pub(crate) query_us: u64,
    /// Microseconds clients waited for a server connection.
    pub wait_us: u64,
    /// Parse messages from clients.
    pub(crate) parses: u64,
    /// Bind messages from clients.
    pub(crate) binds: u64,
}

impl Totals {
    /// Adds `o` field by field.
    pub fn add(&mut self, o: &Totals) {
        self.server_assignments += o.server_assignments;
        self.xacts += o.xacts;
        self.queries += o.queries;
        self.received += o.received;
        self.sent += o.sent;
        self.xact_us += o.xact_us;
        self.query_us += o.query_us;
        self.wait_us += o.wait_us;
        self.parses += o.parses;
        self.binds += o.binds;
    }

    /// `self - earlier`, field by field.
    pub(crate) fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            server_assignments: self.server_assignments.saturating_sub(earlier.server_assignments),
            xacts: self.xacts.saturating_sub(earlier.xacts),
            queries: self.queries.saturating_sub(earlier.queries),
            received: self.received.saturating_sub(earlier.received),
            sent: self.sent.saturating_sub(earlier.sent),
            xact_us: self.xact_us.saturating_sub(earlier.xact_us),
            query_us: self.query_us.saturating_sub(earlier.query_us),
            wait_us: self.wait_us.saturating_sub(earlier.wait_us),
            parses: self.parses.saturating_sub(earlier.parses),
            binds: self.binds.saturating_sub(earlier.binds),
        }
    }
}

/// One pool's shared counters.
#[derive(Debug, Default)]
pub struct Counters {
    fields: [AtomicU64; 10],
}

impl Counters {
    /// Adds a session's tally.
    pub fn add(&self, t: &Totals) {
        let v = [
            t.server_assignments,
            t.xacts,
            t.queries,
            t.received,
            t.sent,
            t.xact_us,
            t.query_us,
            t.wait_us,
            t.parses,
            t.binds,
        ];
        for (f, x) in self.fields.iter().zip(v) {
            if x > 0 {
                f.fetch_add(x, Ordering::Relaxed);
            }
        }
    }

    /// The totals now.
    pub(crate) fn totals(&self) -> Totals {
        let g = |i: usize| self.fields[i].load(Ordering::Relaxed);
        Totals {
            server_assignments: g(0),
            xacts: g(1),
            queries: g(2),
            received: g(3),
            sent: g(4),
            xact_us: g(5),
            query_us: g(6),
            wait_us: g(7),
            parses: g(8),
            binds: g(9),
        }
    }
}

/// A session's tally, folded into its pool's counters now and then and when dropped.
#[derive(Debug)]
pub(crate) struct Local {
    counters: Arc<Counters>,
    /// Not yet folded in.
    pub pending: Totals,
    flushed: Instant,
    /// Where the session's query and transaction times go (its identity's, in its pool).
    latency: Option<Arc<super::latency::Cell>>,
    /// Times not yet folded in: boxed while there are any (288 bytes that a client which
    /// has not run a transaction since the last fold, such as an idle one, does not hold).
    latency_pending: Option<Box<super::latency::Tally>>,
}

impl Local {
    /// A tally for the pool with `counters`.
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        Self {
            counters,
            pending: Totals::default(),
            flushed: Instant::now(),
            latency: None,
            latency_pending: None,
        }
    }

    /// The same, with the session's times folded into `cell`.
    pub(crate) fn with_latency(mut self, cell: Arc<super::latency::Cell>) -> Self {
        self.latency = Some(cell);
        self
    }

    /// Adds `t`; folds everything in when the last fold is [`FLUSH_EVERY`] old.
    pub(crate) fn add(&mut self, t: &Totals, now: Instant) {
        self.pending.add(t);
        if now.duration_since(self.flushed) >= FLUSH_EVERY {
            self.flush(now);
        }
    }

    /// Adds the query and transaction times `t`, folded in with the rest.
    pub(crate) fn add_latency(&mut self, t: &super::latency::Tally) {
        self.latency_pending.get_or_insert_with(Default::default).add(t);
    }

    fn flush(&mut self, now: Instant) {
        self.counters.add(&self.pending);
        self.pending = Totals::default();
        self.fold_latency(now);
        self.flushed = now;
    }

    fn fold_latency(&mut self, now: Instant) {
        if let (Some(t), Some(c)) = (self.latency_pending.take(), self.latency.as_deref()) {
            c.add(&t, now);
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.counters.add(&self.pending);
        self.fold_latency(Instant::now());
    }
}

/// Counters of every pool (kept across reloads that rebuild a pool), and the averages of
/// the last stats period.
#[derive(Debug, Default)]
pub struct Stats {
    counters: Mutex<crate::FastMap<PoolKey, Arc<Counters>>>,
    /// Query and transaction times per identity and pool.
    pub latency: super::latency::Latencies,
    period: Mutex<Period>,
}

#[derive(Debug, Default)]
struct Period {
    /// Totals at the start of the current period.
    start: HashMap<PoolKey, Totals>,
    started: Option<Instant>,
    /// Per-second averages over the last complete period.
    last: HashMap<PoolKey, (Totals, Duration)>,
}

impl Stats {
    /// The counters of a pool (created on first use).
    pub fn counters(&self, key: &PoolKey) -> Arc<Counters> {
        let mut m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key.clone()).or_default().clone()
    }

    /// Totals of every pool, by key.
    pub(crate) fn totals(&self) -> Vec<(PoolKey, Totals)> {
        let m = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, c)| (k.clone(), c.totals())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Ends a stats period (called every `stats_period`): its deltas become the averages.
    pub(crate) fn roll(&self, now: Instant) {
        let totals = self.totals();
        let mut p = self.period.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(started) = p.started {
            let span = now.duration_since(started);
            let last = totals
                .iter()
                .map(|(k, t)| {
                    let d = t.since(&p.start.get(k).copied().unwrap_or_default());
                    (k.clone(), (d, span))
                })
                .collect();
            p.last = last;
        }
        p.start = totals.into_iter().collect();
        p.started = Some(now);
    }

    /// The last complete period's deltas and its length, for a pool (None before the first
    /// period ended).
    pub(crate) fn last_period(&self, key: &PoolKey) -> Option<(Totals, Duration)> {
        self.period
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
            .get(key)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_fold_in_and_periods_average() {
        let stats = Stats::default();
        let key = PoolKey {
            database: "app".into(),
            user: "app".into(),
        };
        let t0 = Instant::now();
        stats.roll(t0);
        {
            let mut local = Local::new(stats.counters(&key));
            let one = Totals {
                xacts: 1,
                queries: 2,
                received: 10,
                ..Default::default()
            };
            local.add(&one, t0);
            assert_eq!(stats.totals()[0].1.xacts, 0, "not folded in yet");
            local.add(&one, t0 + 2 * FLUSH_EVERY);
            assert_eq!(stats.totals()[0].1.xacts, 2);
            local.add(&one, t0 + 2 * FLUSH_EVERY);
        }
        assert_eq!(stats.totals()[0].1.queries, 6, "the rest is folded in on drop");
        stats.roll(t0 + Duration::from_secs(60));
        let (d, span) = stats.last_period(&key).unwrap();
        assert_eq!((d.xacts, d.received, span.as_secs()), (3, 30, 60));
    }
}

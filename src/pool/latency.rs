//! Latency per identity and pool: how long queries and transactions took on the server side,
//! as fixed-bucket histograms (0.5 ms to 60 s), since start and over the last minute.
//!
//! Part of the pool step, beside [`stats`](super::stats). The relay times requests with the
//! clock reads it already makes at ReadyForQuery and puts each time in a bucket of its own
//! [`Tally`] (no shared memory touched); the session's [`Local`](super::stats::Local) folds the
//! tally into the shared [`Cell`] of its (identity, pool) with its other counters. A cell keeps
//! the totals (for `/metrics`) and one tally per second of the last minute (for p50/p99 in
//! `SHOW IDENTITIES`, the status page and `pgvalve top`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::PoolKey;

/// Upper bounds of the buckets, in microseconds (a last bucket takes everything above).
pub const BOUNDS_US: [u64; 16] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000, 30_000_000, 60_000_000,
];
const BUCKETS: usize = BOUNDS_US.len() + 1;
/// Seconds of history kept for the "last minute" figures.
const WINDOW: usize = 60;

/// Durations counted by bucket, with their sum.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Hist {
    /// Count per bucket (not cumulative); the last is above 60 s.
    pub counts: [u64; BUCKETS],
    /// Sum of the durations, in microseconds.
    pub sum_us: u64,
}

impl Hist {
    /// Counts one duration of `us` microseconds.
    #[inline]
    pub fn record(&mut self, us: u64) {
        let i = BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BOUNDS_US.len());
        self.counts[i] += 1;
        self.sum_us += us;
    }

    /// Adds `o` bucket by bucket.
    pub fn add(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.sum_us += o.sum_us;
    }

    /// Durations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1), interpolated inside its bucket; None when empty. Above the
    /// last bound it says 60 s.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut seen = 0.0;
        for (i, &n) in self.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if seen + n as f64 >= rank {
                let lo = if i == 0 { 0 } else { BOUNDS_US[i - 1] };
                let Some(&hi) = BOUNDS_US.get(i) else {
                    return Some(Duration::from_micros(lo));
                };
                let frac = (rank - seen) / n as f64;
                return Some(Duration::from_micros(lo + ((hi - lo) as f64 * frac) as u64));
            }
            seen += n as f64;
        }
        Some(Duration::from_micros(BOUNDS_US[BOUNDS_US.len() - 1]))
    }
}

/// Query and transaction times.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Requests answered by ReadyForQuery (a Query, or an extended batch up to Sync).
    pub query: Hist,
    /// Transactions (first request to ReadyForQuery 'I').
    pub xact: Hist,
}

impl Tally {
    /// Adds `o`.
    pub fn add(&mut self, o: &Tally) {
        self.query.add(&o.query);
        self.xact.add(&o.xact);
    }

    /// Nothing counted.
    pub fn is_empty(&self) -> bool {
        self.query.count() == 0 && self.xact.count() == 0
    }
}

/// One (identity, pool)'s times: totals and the last minute by second.
#[derive(Debug)]
pub struct Cell {
    /// When the cell was made: the origin of the ring's seconds.
    origin: Instant,
    inner: Mutex<CellInner>,
}

#[derive(Debug)]
struct CellInner {
    total: Tally,
    /// (second, what was folded in during it), indexed by second modulo the window.
    ring: [(u64, Tally); WINDOW],
}

impl Default for Cell {
    fn default() -> Self {
        Cell {
            origin: Instant::now(),
            inner: Mutex::new(CellInner {
                total: Tally::default(),
                ring: [(u64::MAX, Tally::default()); WINDOW],
            }),
        }
    }
}

impl Cell {
    /// The seconds from the cell's making to `now` (the clock of the last-minute ring).
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// Folds in a session's tally at `now`.
    pub fn add(&self, t: &Tally, now: Instant) {
        let sec = self.second(now);
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.total.add(t);
        let slot = &mut c.ring[(sec % WINDOW as u64) as usize];
        if slot.0 != sec {
            *slot = (sec, Tally::default());
        }
        slot.1.add(t);
    }

    /// (totals, the last minute's) at `now`.
    pub fn read(&self, now: Instant) -> (Tally, Tally) {
        let sec = self.second(now);
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut minute = Tally::default();
        for (s, t) in &c.ring {
            if *s != u64::MAX && *s + (WINDOW as u64) > sec {
                minute.add(t);
            }
        }
        (c.total, minute)
    }
}

/// The cells by (identity, pool).
type Cells = BTreeMap<(Arc<str>, PoolKey), Arc<Cell>>;

/// The cells of every (identity, pool) seen since start.
#[derive(Debug, Default)]
pub struct Latencies {
    cells: Mutex<Cells>,
}

/// One (identity, pool)'s times read now.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The client identity.
    pub identity: Arc<str>,
    /// The pool.
    pub pool: PoolKey,
    /// Since start.
    pub total: Tally,
    /// In the last minute.
    pub minute: Tally,
}

impl Latencies {
    /// The cell of `identity` in the pool `key` (created on first use).
    pub fn cell(&self, identity: &Arc<str>, key: &PoolKey) -> Arc<Cell> {
        let mut m = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((identity.clone(), key.clone())).or_default().clone()
    }

    /// Every cell read now, by identity then pool. A cell no session uses and with nothing in
    /// the last minute is forgotten (its series disappear, as a forgotten identity's do), so
    /// identities that come and go do not add up.
    pub fn read(&self, now: Instant) -> Vec<Reading> {
        let mut m = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(m.len());
        m.retain(|(identity, pool), c| {
            let (total, minute) = c.read(now);
            if Arc::strong_count(c) == 1 && minute.is_empty() {
                return false;
            }
            out.push(Reading {
                identity: identity.clone(),
                pool: pool.clone(),
                total,
                minute,
            });
            true
        });
        out
    }

    /// The last minute's times per identity (its pools together).
    pub fn minute_by_identity(&self, now: Instant) -> BTreeMap<Arc<str>, Tally> {
        let mut out: BTreeMap<Arc<str>, Tally> = BTreeMap::new();
        for r in self.read(now) {
            out.entry(r.identity).or_default().add(&r.minute);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_buckets_and_quantiles_interpolate() {
        let mut h = Hist::default();
        assert_eq!(h.quantile(0.5), None);
        h.record(100);
        h.record(500);
        h.record(501);
        h.record(70_000_000);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[BUCKETS - 1], 1);
        assert_eq!(h.count(), 4);
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(500)));
        assert_eq!(h.quantile(1.0), Some(Duration::from_secs(60)));
        let mut many = Hist::default();
        for _ in 0..100 {
            many.record(40_000);
        }
        let p50 = many.quantile(0.5).unwrap();
        assert!(
            p50 > Duration::from_millis(25) && p50 <= Duration::from_millis(50),
            "{p50:?}"
        );
    }

    #[test]
    fn the_last_minute_forgets_older_seconds() {
        let cell = Cell::default();
        let t0 = Instant::now();
        let mut t = Tally::default();
        t.query.record(1_000);
        cell.add(&t, t0);
        cell.add(&t, t0 + Duration::from_secs(30));
        let (total, minute) = cell.read(t0 + Duration::from_secs(30));
        assert_eq!((total.query.count(), minute.query.count()), (2, 2));
        let (total, minute) = cell.read(t0 + Duration::from_secs(75));
        assert_eq!((total.query.count(), minute.query.count()), (2, 1));
        let (_, minute) = cell.read(t0 + Duration::from_secs(200));
        assert_eq!(minute.query.count(), 0);
    }

    #[test]
    fn unused_quiet_cells_are_forgotten() {
        let all = Latencies::default();
        let key = PoolKey {
            database: "d".into(),
            user: "u".into(),
        };
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let held = all.cell(&a, &key);
        let mut t = Tally::default();
        t.xact.record(10);
        all.cell(&b, &key).add(&t, Instant::now());
        assert_eq!(all.read(Instant::now()).len(), 2, "a is in use, b timed something");
        assert_eq!(
            all.read(Instant::now() + Duration::from_secs(120)).len(),
            1,
            "b forgotten"
        );
        drop(held);
        assert!(all.read(Instant::now()).is_empty());
    }
}

//! Surge detection: an identity's login rate and growth in client connections over 1 s and
//! 10 s windows, against thresholds and its own baseline.
//!
//! Part of admission. Logins are counted as they happen; once a second the proxy's admission
//! tick closes the window, and a surge episode starts when the last second's logins reach
//! `surge_min_rate` and `surge_multiplier` × the identity's baseline (a slow moving average of
//! its logins per second, frozen during a surge), or when its client connections grew by
//! `surge_delta` within 10 s. The episode ends after `surge_cooldown` without either.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use super::limits::AdmissionSettings;

/// Seconds of history kept (the 10 s window plus the current one).
const WINDOW: usize = 11;
/// Weight of each second in the baseline (a time constant of about a minute).
const BASELINE_ALPHA: f64 = 1.0 / 60.0;

/// One surge episode.
#[derive(Debug, Clone, PartialEq)]
pub struct SurgeEvent {
    /// The identity.
    pub identity: String,
    /// When it started (wall clock).
    pub started: SystemTime,
    /// When it ended (None: still going).
    pub ended: Option<SystemTime>,
    /// Logins in the second that started it.
    pub rate: f64,
    /// Growth of client connections over the last 10 s when it started.
    pub(crate) delta: i64,
    /// The identity's baseline logins per second before it.
    pub(crate) baseline: f64,
    /// Highest logins per second during it.
    pub(crate) peak_rate: f64,
    /// Highest 10 s growth during it.
    pub(crate) peak_delta: i64,
    /// What crossed: "rate" or "delta" (or both).
    pub(crate) trigger: &'static str,
}

/// What a tick found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// An episode began.
    Started(SurgeEvent),
    /// The episode ended.
    Ended(SurgeEvent),
}

/// The surge state of one identity.
#[derive(Debug, Clone, Default)]
pub(crate) struct SurgeTrack {
    logins_now: u32,
    /// Logins per closed second, newest last.
    logins: VecDeque<u32>,
    /// Client connections at each tick, newest last.
    clients: VecDeque<u32>,
    baseline: f64,
    episode: Option<(SurgeEvent, Duration)>,
}

impl SurgeTrack {
    /// Counts one login.
    pub(crate) fn login(&mut self) {
        self.logins_now = self.logins_now.saturating_add(1);
    }

    /// In a surge episode now.
    pub(crate) fn active(&self) -> bool {
        self.episode.is_some()
    }

    /// Logins in the last closed second, the 10 s average, growth of client connections in
    /// the last 1 s and 10 s, and the baseline.
    pub(crate) fn rates(&self) -> (f64, f64, i64, i64, f64) {
        let last = self.logins.back().copied().unwrap_or(0);
        let sum: u32 = self.logins.iter().rev().take(10).sum();
        let now = self.clients.back().copied().unwrap_or(0);
        let ago = |n: usize| {
            let len = self.clients.len();
            i64::from(now) - i64::from(self.clients.get(len.saturating_sub(n + 1)).copied().unwrap_or(0))
        };
        (f64::from(last), f64::from(sum) / 10.0, ago(1), ago(10), self.baseline)
    }

    /// Closes one second (`every` long) with `clients` connected, and says whether an episode
    /// began or ended.
    pub(crate) fn tick(
        &mut self,
        identity: &str,
        clients: u32,
        every: Duration,
        s: &AdmissionSettings,
    ) -> Option<Change> {
        self.logins.push_back(std::mem::take(&mut self.logins_now));
        self.clients.push_back(clients);
        while self.logins.len() > WINDOW {
            self.logins.pop_front();
        }
        while self.clients.len() > WINDOW {
            self.clients.pop_front();
        }
        let (rate, _, _, delta, baseline) = self.rates();
        let by_rate =
            rate >= s.surge_min_rate && (s.surge_multiplier <= 0.0 || rate >= s.surge_multiplier * baseline.max(0.1));
        let by_delta = s.surge_delta > 0 && delta >= i64::from(s.surge_delta);
        let surging = by_rate || by_delta;
        match &mut self.episode {
            None if surging => {
                let ev = SurgeEvent {
                    identity: identity.to_string(),
                    started: SystemTime::now(),
                    ended: None,
                    rate,
                    delta,
                    baseline,
                    peak_rate: rate,
                    peak_delta: delta,
                    trigger: match (by_rate, by_delta) {
                        (true, true) => "rate+delta",
                        (true, false) => "rate",
                        _ => "delta",
                    },
                };
                self.episode = Some((ev.clone(), Duration::ZERO));
                return Some(Change::Started(ev));
            }
            None => {
                self.baseline += BASELINE_ALPHA * (rate - self.baseline);
            }
            Some((ev, quiet)) => {
                ev.peak_rate = ev.peak_rate.max(rate);
                ev.peak_delta = ev.peak_delta.max(delta);
                *quiet = if surging { Duration::ZERO } else { *quiet + every };
                if *quiet >= s.surge_cooldown {
                    let (mut ev, _) = self.episode.take().expect("invariant: in an episode");
                    ev.ended = Some(SystemTime::now());
                    return Some(Change::Ended(ev));
                }
            }
        }
        None
    }

    /// True when nothing here is worth keeping (no logins in the window, no episode).
    pub(crate) fn is_quiet(&self) -> bool {
        self.episode.is_none() && self.logins_now == 0 && self.logins.iter().all(|&n| n == 0) && self.baseline < 0.01
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            surge_min_rate: 20.0,
            surge_multiplier: 5.0,
            surge_delta: 50,
            surge_cooldown: Duration::from_secs(3),
            ..Default::default()
        }
    }

    fn second(t: &mut SurgeTrack, logins: u32, clients: u32) -> Option<Change> {
        for _ in 0..logins {
            t.login();
        }
        t.tick("web", clients, Duration::from_secs(1), &settings())
    }

    #[test]
    fn steady_load_is_no_surge_but_a_jump_is_once_per_episode() {
        let mut t = SurgeTrack::default();
        for _ in 0..120 {
            // 10 logins a second replacing 10 leaving: a steady 30 clients.
            assert_eq!(second(&mut t, 10, 30), None);
        }
        let (.., baseline) = t.rates();
        assert!((8.0..=10.0).contains(&baseline), "{baseline}");
        // 30 a second is above surge_min_rate but below 5x the baseline: not a surge.
        assert_eq!(second(&mut t, 30, 30), None);
        let Some(Change::Started(ev)) = second(&mut t, 70, 100) else {
            panic!("70 logins a second against a baseline of ~10 is a surge");
        };
        assert_eq!((ev.rate, ev.trigger), (70.0, "rate+delta"));
        assert_eq!(second(&mut t, 80, 180), None, "one event per episode");
        // The growth stays in the 10 s window for 9 more seconds, then 3 s of cooldown.
        let ended = (1..=20).find_map(|i| match second(&mut t, 0, 180) {
            Some(Change::Ended(ev)) => Some((i, ev)),
            _ => None,
        });
        let Some((i, ev)) = ended else {
            panic!("the episode never ended");
        };
        assert_eq!(i, 12);
        assert_eq!((ev.peak_rate, ev.ended.is_some()), (80.0, true));
    }

    #[test]
    fn slow_growth_of_connections_is_a_delta_surge() {
        let mut t = SurgeTrack::default();
        let mut found = None;
        for i in 0..12 {
            // 6 new clients a second, none leaving: never a rate surge, but +60 in 10 s.
            if let Some(c) = second(&mut t, 6, 6 * (i + 1)) {
                found = Some((i, c));
                break;
            }
        }
        let Some((i, Change::Started(ev))) = found else {
            panic!("no delta surge")
        };
        assert_eq!((i, ev.trigger), (9, "delta"));
    }
}

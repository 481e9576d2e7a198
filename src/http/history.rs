//! The last 15 minutes per identity, sampled once a second for the status page's sparklines:
//! client and server connections, waiting clients, logins per second and 10 s growth.
//!
//! Part of the HTTP endpoint: [`History::run`] samples admission while the endpoint serves.
//! Bounded: [`SAMPLES`] samples of at most [`MAX_IDENTITIES`] identities each (the ones with
//! the most clients).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::admission::Admission;

/// Samples kept: 15 minutes at one a second.
pub(crate) const SAMPLES: usize = 900;
/// Identities kept per sample.
pub(crate) const MAX_IDENTITIES: usize = 64;

/// What one identity looked like in one second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Point {
    pub clients: f32,
    pub servers: f32,
    pub waiting: f32,
    pub login_rate: f32,
    pub growth_10s: f32,
}

/// One second's sample.
#[derive(Debug, Clone, Default)]
struct Sample {
    ids: Vec<(String, Point)>,
}

/// The ring of samples, oldest first.
#[derive(Debug, Default)]
pub(crate) struct History {
    ring: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Samples `admission` once a second until dropped.
    pub(crate) async fn run(&self, admission: &Admission) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.sample(admission);
        }
    }

    /// Takes one sample now.
    pub(crate) fn sample(&self, admission: &Admission) {
        let mut ids: Vec<(String, Point)> = admission
            .identities()
            .into_iter()
            .map(|i| {
                let p = Point {
                    clients: i.clients as f32,
                    servers: i.servers as f32,
                    waiting: i.waiting as f32,
                    login_rate: i.login_rate as f32,
                    growth_10s: i.delta_10s as f32,
                };
                (i.identity, p)
            })
            .collect();
        ids.sort_by(|a, b| b.1.clients.total_cmp(&a.1.clients));
        ids.truncate(MAX_IDENTITIES);
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(Sample { ids });
    }

    /// One identity's points, oldest first, one per sample (zero where it was not seen).
    pub(crate) fn series(&self, identity: &str) -> Vec<Point> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter()
            .map(|s| {
                s.ids
                    .iter()
                    .find(|(id, _)| id == identity)
                    .map(|(_, p)| *p)
                    .unwrap_or_default()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_fifteen_minutes() {
        let h = History::default();
        let a = Admission::new(
            crate::admission::AdmissionConfig::from_config(&crate::config::Config::default_settings()),
            Default::default(),
        );
        for _ in 0..SAMPLES + 10 {
            h.sample(&a);
        }
        assert_eq!(h.ring.lock().unwrap().len(), SAMPLES);
        assert_eq!(h.series("nobody").len(), SAMPLES);
        assert!(h.series("nobody").iter().all(|p| *p == Point::default()));
    }
}

//! The routes behind a surge: which views the surging identity's sessions were running.
//!
//! Part of the lock monitor, on its poll: for every surge still going, the sqlcommenter
//! routes of the surging identity's sessions' sampled statements (the relay keeps one per
//! session at its first transaction and one in `sessions::SAMPLE_EVERY` after; nothing is
//! parsed on the relay's path) are counted, and each route keeps the most sessions seen on
//! it at once. SHOW SURGES shows the most seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::admission::surge::SurgeEvent;
use crate::protocol::sqlcomment::Tags;
use crate::sessions::SessionInfo;

/// Routes shown per surge.
pub const TOP: usize = 3;

/// Per surge (identity, start): route -> most sessions seen on it at once.
#[derive(Debug, Default)]
pub struct SurgeRoutes(HashMap<(String, SystemTime), HashMap<String, u64>>);

impl SurgeRoutes {
    /// One poll: counts the routes of the surges still going in `surges` among `sessions`;
    /// forgets surges no longer in the history.
    pub(crate) fn update(&mut self, surges: &[SurgeEvent], sessions: &[Arc<SessionInfo>]) {
        self.0
            .retain(|(id, started), _| surges.iter().any(|e| &e.identity == id && e.started == *started));
        for e in surges.iter().filter(|e| e.ended.is_none()) {
            let mut now: HashMap<String, u64> = HashMap::new();
            for s in sessions.iter().filter(|s| *s.client.identity == *e.identity) {
                if let Some(route) = s.sampled_statement().and_then(|q| Tags::parse(&q).route) {
                    *now.entry(route).or_default() += 1;
                }
            }
            let kept = self.0.entry((e.identity.clone(), e.started)).or_default();
            for (route, n) in now {
                let k = kept.entry(route).or_default();
                *k = (*k).max(n);
            }
        }
    }

    /// The most seen routes of the surge of `identity` that started at `started`, as
    /// "route (sessions)", most first.
    pub fn top(&self, identity: &str, started: SystemTime) -> Vec<String> {
        let Some(m) = self.0.get(&(identity.to_string(), started)) else {
            return Vec::new();
        };
        let mut v: Vec<(&String, &u64)> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter().take(TOP).map(|(r, n)| format!("{r} ({n})")).collect()
    }
}

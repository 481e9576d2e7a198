//! What the fair queue is told from outside it: each identity's limits (from the
//! configuration, at login and reload), its cluster-wide grants (from the cluster's
//! coordinator) and its sessions holding dangerous locks (from the lock monitor).
//!
//! Part of the fair queue ([`super`]); each change re-examines the queues it may free.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Scheduler, Share, ShareLimits};
use crate::admission::names::Same;

impl Scheduler {
    /// Sets an identity's limits (creating its share); queues are re-examined.
    pub fn set_limits(&mut self, id: &Arc<str>, limits: ShareLimits) {
        self.reserves |= limits.min_servers > 0;
        let changed = match self.shares.get_mut(&Same(id)) {
            Some(s) => std::mem::replace(&mut s.limits, limits) != limits,
            None => {
                self.shares.insert(
                    id.clone(),
                    Share {
                        limits,
                        servers: 0,
                        waiting: 0,
                        lock_holders: 0,
                        grants: 0,
                        allow: u32::MAX,
                        queue: None,
                        mirrored_long: self.mirrored_long(id),
                    },
                );
                false
            }
        };
        if changed {
            self.dispatch_all();
        }
    }

    /// Sets how many grants of its cluster-wide cap `id` may hold on this instance (from the
    /// cluster's coordinator); returns how many it holds now. Lowering it takes nothing
    /// back: what it holds above the new number is given back as its transactions end.
    pub(crate) fn set_grants(&mut self, id: &str, grants: u32) -> u32 {
        let Some(key) = self.shares.get_key_value(id).map(|(k, _)| k.clone()) else {
            return 0;
        };
        let s = self.shares.get_mut(&key).expect("invariant: found above");
        let (raised, servers) = (grants > s.grants, s.servers);
        s.grants = grants;
        if raised {
            self.dispatch_waiting(&key, None);
        }
        servers
    }

    /// What `id` may hold now of its cluster-wide cap.
    pub(crate) fn grants(&self, id: &str) -> u32 {
        self.shares.get(id).map_or(0, |s| s.grants)
    }

    /// Every identity with a cluster-wide cap, as the cluster's coordinator needs it.
    pub(crate) fn cluster_wants(&self) -> Vec<crate::cluster::grants::Want> {
        self.shares
            .iter()
            .filter(|(_, s)| s.limits.cluster_max > 0)
            .map(|(k, s)| crate::cluster::grants::Want {
                identity: k.clone(),
                max: s.limits.cluster_max,
                in_use: s.servers,
                waiting: s.waiting,
            })
            .collect()
    }

    /// Sets how many sessions of each identity hold dangerous locks (absent: none); queues
    /// are re-examined when that frees anyone.
    pub(crate) fn set_lock_holders(&mut self, holders: &HashMap<String, u32>) {
        let mut freed = false;
        for (id, s) in self.shares.iter_mut() {
            let n = holders.get(&**id).copied().unwrap_or(0);
            freed |= n < s.lock_holders;
            s.lock_holders = n;
        }
        if freed {
            self.dispatch_all();
        }
    }
}

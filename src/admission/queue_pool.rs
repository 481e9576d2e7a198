//! A pool's gates on several cores, seen as one pool where the whole pool matters.
//!
//! Part of the fair queue ([`super`]). With several cores each pool has one gate per core
//! (`label#core`, see [`crate::admission::gate_name`]) whose capacity is that core's lease
//! of the pool: a core's gate hands out no more grants than its lease. But the headroom rule
//! judges an identity by its share of the whole pool, and refusals name what the identity
//! holds in the pool; both read the sums over the pool's gates here. A scheduler holds its own
//! core's gates; the other cores' gates of the pool are mirrors of them ([`super::cores_view`])
//! a few milliseconds old, so near the end of a pool the rule waits for an exact look
//! (`Standing::decided_here`). With one core a gate is its own pool and nothing is summed.

use std::sync::Arc;

use super::{Gate, Scheduler, Share};
use crate::admission::headroom::Standing;
use crate::admission::names::Same;

impl Scheduler {
    /// Sets how many cores each pool has a gate on (before any gate is made).
    pub(crate) fn set_cores(&mut self, cores: usize) {
        self.cores = cores;
    }

    /// Registers `gate`'s siblings the first time it is seen, and makes `gate` (the pool
    /// part's own name) the one the maps keep for it: a look-up by the very key then compares
    /// pointers, not the ~30 bytes of the name (siblings not seen yet get a name made here,
    /// replaced the same way when their part first asks). True when `gate` is one of a
    /// pool's gates on several cores.
    pub(super) fn know(&mut self, gate: &Arc<str>) -> bool {
        if self.cores < 2 {
            return false;
        }
        if let Some((k, _)) = self.siblings.get_key_value(&Same(gate)) {
            if !Arc::ptr_eq(k, gate) {
                self.adopt(gate);
            }
            return true;
        }
        let label = crate::admission::shown(gate);
        if label.len() == gate.len() {
            return false;
        }
        let all: Arc<[Arc<str>]> = (0..self.cores)
            .map(|k| crate::admission::gate_name(label, k, self.cores))
            .map(|n| if *n == **gate { gate.clone() } else { Arc::from(n) })
            .collect();
        for g in all.iter() {
            self.siblings.insert(g.clone(), all.clone());
        }
        self.siblings.contains_key(&Same(gate))
    }

    /// Makes `gate` the key kept for its name in the sibling lists and the gates (a map
    /// keeps the key it has when an equal one is inserted: hence remove, then insert).
    fn adopt(&mut self, gate: &Arc<str>) {
        let Some(all) = self.siblings.get(&Same(gate)).cloned() else {
            return;
        };
        let all: Arc<[Arc<str>]> = all
            .iter()
            .map(|n| if **n == **gate { gate.clone() } else { n.clone() })
            .collect();
        for g in all.iter() {
            self.siblings.remove(g);
            self.siblings.insert(g.clone(), all.clone());
        }
        if let Some(g) = self.gates.remove(gate) {
            self.gates.insert(gate.clone(), g);
        }
    }

    /// The gates of `gate`'s pool (itself alone with one core).
    fn pool_gates<'a>(&'a self, gate: &'a Arc<str>) -> impl Iterator<Item = &'a Gate> + 'a {
        let names: &'a [Arc<str>] = self
            .siblings
            .get(&Same(gate))
            .map_or(std::slice::from_ref(gate), |s| &s[..]);
        names.iter().filter_map(|n| self.gates.get(&Same(n)))
    }

    /// What the headroom rule looks at for `id` (whose share is `s`) in `gate`'s pool: all
    /// of the pool's gates, those of other cores as last mirrored (see `cores_view`).
    pub(super) fn standing(&self, gate: &Arc<str>, id: &Arc<str>, s: &Share) -> Standing {
        let (mut in_use, mut capacity, mut held, mut long) = (0, 0, 0, 0);
        let mut own_free = 0u32;
        for g in self.pool_gates(gate) {
            // A gate holding grants beyond its lease (it shrank under them) has none free;
            // what it holds beyond does not take another gate's free ones.
            in_use += g.in_use.min(g.capacity);
            capacity += g.capacity;
            if !g.mirror {
                own_free += g.capacity.saturating_sub(g.in_use);
            }
            if let Some(f) = g.flows.get(&Same(id)) {
                held += f.in_use;
                long += f.long;
            }
        }
        let headroom = s.limits.headroom.of(capacity);
        // Only needed near the end of the pool: the sum over flows is skipped otherwise.
        let others = if capacity.saturating_sub(in_use) > headroom {
            0
        } else {
            let mut seen: Vec<&Arc<str>> = Vec::new();
            for g in self.pool_gates(gate) {
                for (k, f) in &g.flows {
                    if k != id && (f.in_use > 0 || !f.waiting.is_empty() || f.remote_waiting > 0) && !seen.contains(&k)
                    {
                        seen.push(k);
                    }
                }
            }
            seen.iter()
                .map(|k| u64::from(self.shares.get(&Same(k)).map_or(1, |s| s.limits.weight)))
                .sum()
        };
        Standing {
            in_use,
            capacity,
            held,
            long,
            weight: s.limits.weight,
            others,
            // A pool split over cores' schedulers is judged exactly only with every core
            // locked (its other gates are mirrors, or not seen yet).
            own_free: (self.split && !self.exact && self.siblings.contains_key(&Same(gate))).then_some(own_free),
            headroom,
        }
    }

    /// Serves the waiters of `gate`'s siblings that may go now. Nothing to do on one core's
    /// scheduler of several: it holds only its own gate of a pool, the others are mirrors
    /// with no waiters here (their cores look again at the next exchange).
    pub(super) fn dispatch_siblings(&mut self, gate: &Arc<str>) {
        if self.split {
            return;
        }
        let Some(sib) = self.siblings.get(&Same(gate)).cloned() else {
            return;
        };
        for g in sib.iter() {
            if g != gate && self.gates.get(&Same(g)).is_some_and(|x| x.waiting > 0) {
                self.dispatch(g);
            }
        }
    }

    /// A gate's grants in use, its waiters more lease would serve (those not held back by
    /// their identity's cap, the lock-holder cap or the headroom rule, which do not depend
    /// on how the pool is split between cores), and its grants held long (for whole
    /// sessions, or pinned: they do not come back at a transaction's end).
    pub(crate) fn gate_demand(&self, gate: &Arc<str>) -> (u32, u32, u32) {
        let Some(g) = self.gates.get(&Same(gate)) else {
            return (0, 0, 0);
        };
        let wanting = g
            .flows
            .iter()
            .filter_map(|(id, f)| {
                let w = f.waiting.front()?;
                let s = self.shares.get(&Same(id))?;
                let l = &s.limits;
                let capped = (l.max_servers > 0 && s.servers >= l.max_servers)
                    || s.servers >= s.allow
                    || (l.max_lock_holders > 0 && s.lock_holders >= l.max_lock_holders);
                let held_back = self.standing(gate, id, s).held_back(w.hold);
                (!capped && !held_back).then_some(f.waiting.len() as u32)
            })
            .sum();
        let long = g.flows.values().map(|f| f.long + f.pinning).sum::<u32>().min(g.in_use);
        (g.in_use, wanting, long)
    }

    /// A gate's capacity now (0 when it does not exist).
    pub(crate) fn gate_capacity(&self, gate: &Arc<str>) -> u32 {
        self.gates.get(&Same(gate)).map_or(0, |g| g.capacity)
    }

    /// Grants an identity holds in a gate's pool.
    pub(crate) fn gate_held(&self, gate: &Arc<str>, id: &Arc<str>) -> u32 {
        self.pool_gates(gate)
            .filter_map(|g| g.flows.get(&Same(id)))
            .map(|f| f.in_use)
            .sum()
    }
}

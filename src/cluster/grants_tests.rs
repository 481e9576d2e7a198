//! Unit tests of the per-identity grant plan.

use super::*;

fn want(max: u32, in_use: u32, waiting: u32) -> Want {
    Want {
        identity: "web".into(),
        max,
        in_use,
        waiting,
    }
}

fn set(ks: &[i32]) -> BTreeSet<i32> {
    ks.iter().copied().collect()
}

#[test]
fn keys_of_an_identity_stay_in_their_range() {
    for id in ["web", "worker", "", "é", &"x".repeat(500)] {
        let b = i64::from(base(id));
        assert!(b >= GRANT_BASE && b + PER_IDENTITY <= i64::from(i32::MAX));
        assert_eq!((b - GRANT_BASE) % PER_IDENTITY, 0);
        let s = seen(&[(b + 3, 10), (b + i64::from(WANT), 11)]);
        assert_eq!(s[&(b as i32)].held[&10], set(&[3]));
        assert!(s[&(b as i32)].wanters.contains(&11));
    }
    assert_ne!(base("web"), base("worker"));
}

#[test]
fn alone_it_takes_what_it_needs_and_keeps_it() {
    let p = plan(1, &want(5, 0, 3), (&set(&[]), &set(&[])), &Seen::default(), (false, 0));
    assert_eq!((p.cap, p.target, p.take.len()), (0, 3, 3));
    // Idle again with three held and nobody else wanting: they stay.
    let p = plan(
        1,
        &want(5, 0, 0),
        (&set(&[0, 1, 2]), &set(&[])),
        &Seen::default(),
        (false, 0),
    );
    assert_eq!((p.cap, p.take.len()), (3, 0));
    // Quiet after an instance left: nothing is taken.
    let p = plan(1, &want(5, 0, 3), (&set(&[]), &set(&[])), &Seen::default(), (true, 0));
    assert_eq!((p.cap, p.take.len()), (0, 0));
}

#[test]
fn a_wanting_peer_gets_an_equal_share_and_the_free_ones_are_not_taken_twice() {
    let mut seen = Seen::default();
    seen.held.insert(2, set(&[0, 1]));
    seen.wanters.insert(2);
    // Me: five in use, cap 5; the peer holds two and wants more: shares 3 / 2... me above.
    let p = plan(1, &want(5, 3, 4), (&set(&[2, 3, 4]), &set(&[])), &seen, (false, 0));
    assert_eq!((p.cap, p.target), (3, 3), "max-min: I keep my three");
    assert!(p.take.is_empty());
    let p = plan(1, &want(6, 4, 4), (&set(&[2, 3, 4, 5]), &set(&[])), &seen, (false, 0));
    assert_eq!((p.cap, p.target), (3, 3), "lowered to an equal share");
    assert_eq!(
        to_release(&set(&[2, 3, 4, 5]), 6, 3, 4),
        Vec::<i32>::new(),
        "four in use"
    );
    assert_eq!(to_release(&set(&[2, 3, 4, 5]), 6, 3, 3), vec![5]);
    // The free ones are those nobody holds.
    let p = plan(1, &want(6, 0, 9), (&set(&[]), &set(&[])), &seen, (false, 0));
    assert_eq!(p.target, 3);
    assert!(p.take.iter().all(|k| (2..6).contains(k)), "{:?}", p.take);
}

#[test]
fn connections_left_from_a_lost_connection_are_covered_by_their_own_grants_first() {
    let mut seen = Seen::default();
    seen.held.insert(2, set(&[0, 1]));
    seen.wanters.insert(2);
    // Rejoined with two in use and nothing held; grants 3 and 4 were its own; another
    // instance was seen gone just now (its grants, 2 say, are left alone).
    let p = plan(9, &want(5, 2, 6), (&set(&[]), &set(&[3, 4])), &seen, (true, 0));
    assert_eq!((p.cap, p.take.len()), (0, 2), "{p:?}");
    assert!(p.take.iter().all(|k| [3, 4].contains(k)), "{p:?}");
    // One of its own was taken meanwhile: only the other comes back while quiet.
    seen.held.insert(3, set(&[4]));
    let p = plan(9, &want(5, 2, 6), (&set(&[]), &set(&[3, 4])), &seen, (true, 0));
    assert_eq!(p.take, vec![3]);
    // Not quiet: its own first, then any free one.
    let p = plan(9, &want(5, 2, 6), (&set(&[]), &set(&[3, 4])), &seen, (false, 0));
    assert_eq!(p.take, vec![3, 2]);
}

#[test]
fn the_remainder_of_an_even_split_goes_round_in_turn() {
    let mut seen = Seen::default();
    for p in [2, 3] {
        seen.held.insert(p, set(&[]));
        seen.wanters.insert(p);
    }
    // Three instances want all of 5: each gets 2 in its turn, 1 otherwise; 5 in all.
    for turn in 0..6u64 {
        let targets: Vec<u32> = [1, 2, 3]
            .iter()
            .map(|&me| {
                let mut s = seen.clone();
                s.held.insert(1, set(&[]));
                s.wanters.insert(1);
                s.held.remove(&me);
                s.wanters.remove(&me);
                plan(me, &want(5, 0, 9), (&set(&[]), &set(&[])), &s, (false, turn)).target
            })
            .collect();
        assert_eq!(targets.iter().sum::<u32>(), 5, "turn {turn}: {targets:?}");
        assert!(targets.iter().all(|t| (1..=2).contains(t)), "{targets:?}");
        assert_eq!(targets.iter().filter(|t| **t == 1).count(), 1, "{targets:?}");
    }
}

#[test]
fn grants_beyond_a_lowered_cap_go_first() {
    assert_eq!(to_release(&set(&[0, 7, 8]), 5, 1, 0), vec![8, 7]);
    let p = plan(
        1,
        &want(5, 2, 0),
        (&set(&[0, 7, 8]), &set(&[])),
        &Seen::default(),
        (false, 0),
    );
    assert_eq!(p.cap, 1, "grants above the cap do not count");
}

/// A deterministic simulation of the grants (no PostgreSQL): a lock table, instances with
/// admission's counts, random transactions, rounds, killed coordination connections, crashes
/// and rejoins; after every step the cap is checked. The one approximation of
/// docs/cluster.md is modelled: transactions running when an instance notices its
/// coordination connection gone (or crashes) finish; they are counted apart ("orphans")
/// until the instance covers them with grants again (its own lost ones, taken back first).
mod sim {
    use super::*;

    const MAX: u32 = 5;
    const INSTANCES: usize = 4;
    /// An instance notices its lost coordination connection within this many steps...
    const NOTICE: u64 = 2;
    /// ... which is less than takeover_delay.
    const TAKEOVER: u64 = 6;
    /// Every instance runs a round at least this often.
    const ROUND: u64 = 2;
    const STEPS: usize = 500;

    #[derive(Default)]
    struct Inst {
        up: bool,
        /// Its coordination session (the key of its locks), and when PostgreSQL dropped it.
        session: u32,
        dropped_at: Option<u64>,
        mine: BTreeSet<i32>,
        /// Grants of its previous coordination connection (taken back first).
        lost: BTreeSet<i32>,
        wanting: bool,
        cap: u32,
        in_use: u32,
        orphans: u32,
        waiting: u32,
        peers: BTreeSet<u32>,
        quiet_until: u64,
        last_round: u64,
    }

    struct World {
        rng: fastrand::Rng,
        now: u64,
        next_session: u32,
        /// Grant -> session holding it; sessions holding the want marker; live sessions.
        locks: BTreeMap<i32, u32>,
        wanters: BTreeSet<u32>,
        live: BTreeSet<u32>,
        is: Vec<Inst>,
        /// Statements of crashed processes still running.
        dead: u32,
    }

    impl World {
        fn join(&mut self, i: usize, lost: BTreeSet<i32>) {
            self.next_session += 1;
            let s = self.next_session;
            self.live.insert(s);
            let now = self.now;
            let inst = &mut self.is[i];
            *inst = Inst {
                up: true,
                session: s,
                in_use: inst.in_use,
                orphans: inst.orphans,
                lost,
                waiting: inst.waiting,
                quiet_until: now + TAKEOVER,
                last_round: now,
                ..Inst::default()
            };
        }

        /// PostgreSQL ends session `s`: its locks go.
        fn drop_session(&mut self, s: u32) {
            self.live.remove(&s);
            self.locks.retain(|_, h| *h != s);
            self.wanters.remove(&s);
        }

        fn round(&mut self, i: usize) {
            let now = self.now;
            let (s, alive) = (self.is[i].session, self.live.contains(&self.is[i].session));
            if !self.is[i].up || !alive {
                return;
            }
            let mut seen = Seen::default();
            for (k, h) in &self.locks {
                seen.held.entry(*h as i32).or_default().insert(*k);
            }
            seen.wanters = self.wanters.iter().map(|w| *w as i32).collect();
            let peers = self.live.clone();
            let inst = &mut self.is[i];
            inst.last_round = now;
            if inst.peers.difference(&peers).next().is_some() {
                inst.quiet_until = now + TAKEOVER;
            }
            inst.peers = peers;
            let w = Want {
                identity: "web".into(),
                max: MAX,
                in_use: inst.in_use,
                waiting: inst.waiting,
            };
            let p = plan(
                s as i32,
                &w,
                (&inst.mine, &inst.lost),
                &seen,
                (now < inst.quiet_until, now / 50),
            );
            inst.cap = p.cap;
            for k in to_release(&inst.mine, MAX, p.cap, inst.in_use) {
                inst.mine.remove(&k);
                self.locks.remove(&k);
            }
            for k in p.take {
                // pg_try_advisory_lock: exclusive.
                if let std::collections::btree_map::Entry::Vacant(e) = self.locks.entry(k) {
                    e.insert(s);
                    self.is[i].mine.insert(k);
                }
            }
            let inst = &mut self.is[i];
            inst.cap = p.target.min(inst.mine.len() as u32);
            if inst.mine.len() as u32 >= inst.in_use {
                // Covered by grants again (it took its own back after rejoining).
                inst.orphans = 0;
                inst.lost.clear();
            }
            inst.wanting = inst.in_use + inst.waiting > inst.mine.len() as u32;
            if inst.wanting {
                self.wanters.insert(s);
            } else {
                self.wanters.remove(&s);
            }
            self.admit(i);
        }

        /// Admission hands grants to waiters while under the cap.
        fn admit(&mut self, i: usize) {
            let inst = &mut self.is[i];
            while inst.waiting > 0 && inst.in_use < inst.cap {
                inst.waiting -= 1;
                inst.in_use += 1;
            }
        }

        fn step(&mut self) {
            self.now += 1;
            for i in 0..INSTANCES {
                let inst = &mut self.is[i];
                // The instance notices its lost connection: caps to 0, running ones finish.
                if inst.up && inst.dropped_at.is_some_and(|d| self.now >= d + NOTICE) {
                    inst.orphans = inst.in_use;
                    inst.cap = 0;
                    let lost = std::mem::take(&mut inst.mine);
                    self.join(i, lost);
                }
                if self.is[i].up && self.now >= self.is[i].last_round + ROUND {
                    self.round(i);
                }
            }
            let i = self.rng.usize(..INSTANCES);
            match self.rng.u32(..100) {
                0..=29 => self.round(i),
                30..=59 if self.is[i].up && self.is[i].waiting < 8 => {
                    self.is[i].waiting += 1;
                    self.admit(i);
                }
                60..=64 if self.dead > 0 => self.dead -= 1,
                60..=85 if self.is[i].in_use > 0 => {
                    let inst = &mut self.is[i];
                    inst.in_use -= 1;
                    inst.orphans = inst.orphans.saturating_sub(1);
                    self.admit(i);
                }
                86..=95 if self.is[i].dropped_at.is_none() => {
                    // pg_terminate_backend on its coordination connection.
                    let s = self.is[i].session;
                    self.drop_session(s);
                    self.is[i].dropped_at = Some(self.now);
                }
                96..=97 if self.is[i].up => {
                    // Crash: its sessions end; statements already running finish.
                    let s = self.is[i].session;
                    self.drop_session(s);
                    let inst = &mut self.is[i];
                    // Its statements still running finish on PostgreSQL's side, nobody's now.
                    self.dead += inst.in_use;
                    (inst.up, inst.in_use, inst.orphans, inst.waiting, inst.cap) = (false, 0, 0, 0, 0);
                }
                98..=99 if !self.is[i].up => self.join(i, BTreeSet::new()),
                _ => {}
            }
        }

        fn check(&self, seed: u64) {
            let counted: u32 = self.is.iter().map(|i| i.in_use - i.orphans.min(i.in_use)).sum();
            assert!(
                counted <= MAX,
                "seed {seed} step {}: {counted} in use beyond the orphans",
                self.now
            );
            for (n, i) in self.is.iter().enumerate() {
                if i.up && i.dropped_at.is_none() {
                    let held = i.mine.iter().filter(|k| self.locks.get(k) == Some(&i.session)).count() as u32;
                    assert!(
                        i.cap <= held,
                        "seed {seed}: instance {n} admits {} on {held} grants",
                        i.cap
                    );
                }
            }
        }
    }

    #[test]
    fn the_cap_holds_through_crashes_kills_and_rejoins() {
        let seeds: u64 = std::env::var("PGVALVE_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000);
        let mut served = 0;
        for seed in 0..seeds {
            let mut w = World {
                rng: fastrand::Rng::with_seed(seed),
                now: 0,
                next_session: 0,
                locks: BTreeMap::new(),
                wanters: BTreeSet::new(),
                live: BTreeSet::new(),
                is: (0..INSTANCES).map(|_| Inst::default()).collect(),
                dead: 0,
            };
            for i in 0..INSTANCES {
                w.join(i, BTreeSet::new());
            }
            for _ in 0..STEPS {
                w.step();
                w.check(seed);
            }
            served += w.is.iter().filter(|i| i.cap > 0).count();
        }
        assert!(served > 0, "grants were handed out at all");
    }
}

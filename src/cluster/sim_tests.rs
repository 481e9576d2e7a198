//! A deterministic simulation of the coordination protocol (docs/cluster.md): no PostgreSQL,
//! many instances, random crashes, killed coordination connections, PostgreSQL restarts and
//! delays, thousands of seeds; the invariant is checked after every step.
//!
//! PostgreSQL is modelled as a lock table (leases: exclusive, markers: shared) and a set of
//! backends, each statement of the protocol as one atomic step, and time as steps. Timing
//! assumptions of docs/cluster.md are the model's: an instance notices the loss of its
//! coordination connection within `NOTICE` steps and a login completes within `LOGIN` steps,
//! both shorter than `TAKEOVER`.

use std::collections::{BTreeMap, BTreeSet};

const BUDGET: usize = 5;
const INSTANCES: usize = 4;
const TAKEOVER: u64 = 6;
const NOTICE: u64 = 2;
const LOGIN: u64 = 2;
/// Every instance looks at the cluster at least this often (rebalance_interval).
const ROUND: u64 = 2;
const STEPS: usize = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Forked, authenticating: in pg_stat_activity, holding nothing.
    Login,
    /// Logged in.
    Live,
}

#[derive(Debug, Clone, Copy)]
struct Backend {
    inst: usize,
    stage: Stage,
    since: u64,
    /// A server connection: its seat and the coordinator pid that assigned it.
    seat: Option<(usize, u32)>,
}

#[derive(Default)]
struct Pg {
    next: u32,
    backends: BTreeMap<u32, Backend>,
    leases: BTreeMap<usize, u32>,
    markers: BTreeMap<usize, BTreeSet<u32>>,
}

impl Pg {
    fn exit(&mut self, pid: u32) {
        self.backends.remove(&pid);
        self.leases.retain(|_, p| *p != pid);
        for m in self.markers.values_mut() {
            m.remove(&pid);
        }
    }

    fn free(&self) -> BTreeSet<usize> {
        (0..BUDGET)
            .filter(|s| !self.leases.contains_key(s) && self.markers.get(s).is_none_or(BTreeSet::is_empty))
            .collect()
    }

    fn coordinators(&self) -> BTreeSet<u32> {
        self.leases.values().copied().collect()
    }
}

#[derive(Default)]
struct Inst {
    up: bool,
    /// The coordination connection as the instance believes it (pid), and since when PostgreSQL
    /// has it gone (the instance notices `NOTICE` steps later).
    coord: Option<u32>,
    gone_at: Option<u64>,
    leased: BTreeSet<usize>,
    /// Connections: pid -> seat (the seat is sat on until the backend is gone).
    conns: BTreeMap<u32, usize>,
    prev_free: BTreeSet<usize>,
    peers: BTreeSet<u32>,
    quiet_until: u64,
    last_round: u64,
    want: usize,
}

struct World {
    rng: fastrand::Rng,
    now: u64,
    pg: Pg,
    is: Vec<Inst>,
}

impl World {
    fn new(seed: u64) -> World {
        World {
            rng: fastrand::Rng::with_seed(seed),
            now: 0,
            pg: Pg::default(),
            is: (0..INSTANCES).map(|_| Inst::default()).collect(),
        }
    }

    fn fork(&mut self, inst: usize, seat: Option<(usize, u32)>) -> u32 {
        self.pg.next += 1;
        let pid = self.pg.next;
        let b = Backend {
            inst,
            stage: Stage::Login,
            since: self.now,
            seat,
        };
        self.pg.backends.insert(pid, b);
        pid
    }

    /// Coordinator joins: connect (a login window of its own), take one free seat or leave.
    fn join(&mut self, i: usize) {
        let pid = self.fork(i, None);
        let free: Vec<usize> = self.pg.free().into_iter().collect();
        match free.first() {
            Some(&s) => {
                self.pg.backends.get_mut(&pid).expect("forked").stage = Stage::Live;
                self.pg.leases.insert(s, pid);
                let inst = &mut self.is[i];
                inst.coord = Some(pid);
                inst.gone_at = None;
                inst.leased.clear();
                inst.prev_free.clear();
                inst.quiet_until = self.now + TAKEOVER;
            }
            None => self.pg.exit(pid),
        }
    }

    /// One round: snapshot, note vanished peers, take or give back seats.
    fn round(&mut self, i: usize) {
        // A dead coordination connection answers nothing.
        let Some(me) = self.is[i].coord.filter(|_| self.is[i].gone_at.is_none()) else {
            return;
        };
        let free = self.pg.free();
        let peers = self.pg.coordinators();
        let now = self.now;
        let inst = &mut self.is[i];
        inst.last_round = now;
        if inst.peers.difference(&peers).next().is_some() {
            inst.quiet_until = now + TAKEOVER;
        }
        inst.peers = peers;
        let takeable: Vec<usize> = if now >= inst.quiet_until {
            free.intersection(&inst.prev_free).copied().collect()
        } else {
            Vec::new()
        };
        inst.prev_free = free;
        let sat: BTreeSet<usize> = inst.conns.values().copied().collect();
        // Seats its connections sit on from before a lost coordination connection: leased
        // again when nobody leases them (lease::adopt).
        for &s in &sat {
            if !inst.leased.contains(&s) && !self.pg.leases.contains_key(&s) {
                self.pg.leases.insert(s, me);
                inst.leased.insert(s);
            }
        }
        if inst.leased.len() < inst.want {
            for s in takeable.into_iter().take(inst.want - inst.leased.len()) {
                // pg_try_advisory_lock, then the conflict check (one database: the lock decides).
                if !self.pg.leases.contains_key(&s) && self.pg.markers.get(&s).is_none_or(BTreeSet::is_empty) {
                    self.pg.leases.insert(s, me);
                    self.is[i].leased.insert(s);
                }
            }
        } else if let Some(&s) = inst.leased.iter().find(|s| !sat.contains(s)) {
            inst.leased.remove(&s);
            if self.pg.leases.get(&s) == Some(&me) {
                self.pg.leases.remove(&s);
            }
        }
    }

    /// Opens a connection on a leased seat nobody of this instance sits on.
    fn open(&mut self, i: usize) {
        let inst = &self.is[i];
        let (Some(holder), true) = (inst.coord, inst.gone_at.is_none_or(|g| self.now < g + NOTICE)) else {
            return;
        };
        let sat: BTreeSet<usize> = inst.conns.values().copied().collect();
        let Some(&seat) = inst.leased.iter().find(|s| !sat.contains(s)) else {
            return;
        };
        let pid = self.fork(i, Some((seat, holder)));
        self.is[i].conns.insert(pid, seat);
    }

    /// A connection's login ends: it takes its marker, then checks its lease.
    fn login(&mut self, pid: u32) {
        let Some(b) = self.pg.backends.get_mut(&pid) else {
            return;
        };
        let Some((seat, holder)) = b.seat else { return };
        b.stage = Stage::Live;
        self.pg.markers.entry(seat).or_default().insert(pid);
        let ok = self.pg.leases.get(&seat) == Some(&holder) && self.pg.markers[&seat].len() == 1;
        if !ok {
            self.close(pid);
        }
    }

    /// A backend ends; its instance sees the socket closed only after (the seat is free then).
    fn close(&mut self, pid: u32) {
        let inst = self.pg.backends.get(&pid).map(|b| b.inst);
        self.pg.exit(pid);
        if let Some(inst) = inst.and_then(|i| self.is.get_mut(i)) {
            inst.conns.remove(&pid);
        }
    }

    fn kill_coordinator(&mut self, i: usize) {
        if let Some(pid) = self.is[i].coord.filter(|_| self.is[i].gone_at.is_none()) {
            self.pg.exit(pid);
            self.is[i].gone_at = Some(self.now);
        }
    }

    fn crash(&mut self, i: usize) {
        let pids: Vec<u32> = self
            .pg
            .backends
            .iter()
            .filter(|(_, b)| b.inst == i)
            .map(|(p, _)| *p)
            .collect();
        for p in pids {
            // Busy backends end later, but their locks last exactly as long as they do.
            if self.rng.bool() {
                self.pg.exit(p);
            } else if let Some(b) = self.pg.backends.get_mut(&p) {
                b.inst = usize::MAX;
            }
        }
        self.is[i] = Inst::default();
    }

    fn restart_postgres(&mut self) {
        let pids: Vec<u32> = self.pg.backends.keys().copied().collect();
        for p in pids {
            self.pg.exit(p);
        }
        for inst in &mut self.is {
            if inst.coord.is_some() && inst.gone_at.is_none() {
                inst.gone_at = Some(self.now);
            }
        }
    }

    /// Time passes: logins finish in time, instances notice lost coordinators in time.
    fn tick(&mut self) {
        self.now += 1;
        let late: Vec<u32> = self
            .pg
            .backends
            .iter()
            .filter(|(_, b)| b.stage == Stage::Login && self.now >= b.since + LOGIN)
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            self.login(p);
        }
        for i in 0..INSTANCES {
            if self.is[i].coord.is_some() && self.now >= self.is[i].last_round + ROUND {
                self.round(i);
            }
        }
        for inst in &mut self.is {
            if inst.gone_at.is_some_and(|g| self.now >= g + NOTICE) {
                inst.coord = None;
                inst.gone_at = None;
                inst.leased.clear();
            }
        }
    }

    fn step(&mut self) {
        let i = self.rng.usize(..INSTANCES);
        match self.rng.u32(..100) {
            0..=24 => self.tick(),
            25..=44 => self.round(i),
            45..=59 => self.open(i),
            60..=69 => {
                let pid = self
                    .pg
                    .backends
                    .iter()
                    .find(|(_, b)| b.stage == Stage::Login)
                    .map(|(p, _)| *p);
                pid.into_iter().for_each(|p| self.login(p));
            }
            70..=79 => {
                let conns: Vec<u32> = self.is[i].conns.keys().copied().collect();
                if !conns.is_empty() {
                    let p = conns[self.rng.usize(..conns.len())];
                    self.close(p);
                }
            }
            80..=86 => self.is[i].want = self.rng.usize(..=BUDGET),
            87..=90 => {
                if !self.is[i].up || self.is[i].coord.is_none() && self.is[i].gone_at.is_none() {
                    self.is[i].up = true;
                    self.join(i);
                }
            }
            91..=93 => self.kill_coordinator(i),
            94..=96 => self.crash(i),
            97 => self.restart_postgres(),
            _ => {
                // A busy backend of a crashed instance finally ends.
                let orphan = self
                    .pg
                    .backends
                    .iter()
                    .find(|(_, b)| b.inst == usize::MAX)
                    .map(|(p, _)| *p);
                orphan.into_iter().for_each(|p| self.pg.exit(p));
            }
        }
    }

    /// The invariant: each seat has at most one logged-in connection and every logged-in
    /// backend holds a lease or a marker, so at most `BUDGET` are logged in; and, under the
    /// model's timing, counting logins too, never more than `BUDGET` backends but for
    /// coordination connections joining (which hold nothing, see docs/cluster.md).
    fn check(&self, seed: u64) {
        let mut per_seat: BTreeMap<usize, usize> = BTreeMap::new();
        let mut live = 0;
        let mut all = 0;
        for (pid, b) in &self.pg.backends {
            all += 1;
            if b.stage == Stage::Live {
                live += 1;
                let holds =
                    self.pg.leases.values().any(|p| p == pid) || self.pg.markers.values().any(|m| m.contains(pid));
                assert!(holds, "seed {seed}: backend {pid} logged in and holds nothing");
                if let Some((s, _)) = b.seat {
                    *per_seat.entry(s).or_default() += 1;
                }
            }
        }
        assert!(
            per_seat.values().all(|n| *n <= 1),
            "seed {seed}: a seat used twice: {per_seat:?}"
        );
        assert!(
            live <= BUDGET,
            "seed {seed}: {live} logged-in backends, budget {BUDGET}"
        );
        assert!(
            all <= BUDGET,
            "seed {seed}: {all} backends (logins included), budget {BUDGET}"
        );
    }
}

#[test]
fn the_invariant_holds_after_every_step_of_thousands_of_random_runs() {
    let seeds: u64 = std::env::var("PGVALVE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    for seed in 0..seeds {
        let mut w = World::new(seed);
        for _ in 0..STEPS {
            w.step();
            w.check(seed);
        }
    }
}

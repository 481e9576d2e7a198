//! Unit tests of the fair queue's decisions and of its sweep (no I/O, no runtime).

use std::time::Duration;

use super::*;
use std::collections::HashMap;

/// Queued now, due in an hour (the decisions under test never wait that long).
fn far() -> impl FnOnce(Duration) -> (Instant, Due) {
    let now = Instant::now();
    move |_| {
        (
            now,
            Due {
                notice: None,
                deadline: now + Duration::from_secs(3600),
            },
        )
    }
}

fn limits(max: u32, min: u32, weight: u32, queue: u32) -> ShareLimits {
    ShareLimits {
        max_servers: max,
        cluster_max: 0,
        min_servers: min,
        weight,
        max_queue: queue,
        max_lock_holders: 0,
        headroom: Headroom::Connections(0),
        queue_timeout: Duration::from_secs(120),
    }
}

struct Bench {
    s: Scheduler,
    gate: Arc<str>,
    cap: u32,
    /// Waiting receivers per identity, FIFO.
    waiting: HashMap<String, VecDeque<oneshot::Receiver<Signal>>>,
    held: HashMap<String, u32>,
    /// How the grants asked for are held.
    hold: Hold,
}

impl Bench {
    fn new(cap: u32, ids: &[(&str, ShareLimits)]) -> Self {
        let mut s = Scheduler::default();
        for (id, l) in ids {
            s.set_limits(&Arc::from(*id), *l);
        }
        Self {
            s,
            gate: Arc::from("pool"),
            cap,
            waiting: HashMap::new(),
            held: HashMap::new(),
            hold: Hold::Transaction,
        }
    }

    /// Requests a grant; true when granted at once.
    fn ask(&mut self, id: &str) -> bool {
        match self.s.request(&self.gate, self.cap, &Arc::from(id), self.hold, far()) {
            Request::Granted => {
                *self.held.entry(id.into()).or_default() += 1;
                true
            }
            Request::Queued(_, rx) => {
                self.waiting.entry(id.into()).or_default().push_back(rx);
                false
            }
            Request::QueueFull(_) => panic!("queue full for {id}"),
        }
    }

    /// Releases one grant of `id` and collects whoever was woken.
    fn release(&mut self, id: &str) {
        self.s.release(&self.gate, &Arc::from(id), self.hold);
        *self.held.get_mut(id).unwrap() -= 1;
        self.collect();
    }

    /// Counts the waiters that got a grant.
    fn collect(&mut self) {
        for (who, q) in self.waiting.iter_mut() {
            while let Some(rx) = q.front_mut() {
                if rx.try_recv().is_ok() {
                    q.pop_front();
                    *self.held.entry(who.clone()).or_default() += 1;
                } else {
                    break;
                }
            }
        }
    }

    fn held(&self, id: &str) -> u32 {
        self.held.get(id).copied().unwrap_or(0)
    }
}

#[test]
fn a_cluster_wide_cap_admits_as_many_as_the_grants_held_here() {
    let capped = ShareLimits {
        cluster_max: 5,
        ..limits(0, 0, 1, 0)
    };
    let mut b = Bench::new(10, &[("web", capped)]);
    assert!(
        !b.ask("web"),
        "no grant leased yet: it waits, whatever the pool has free"
    );
    assert_eq!(b.s.set_grants("web", 2), 0);
    b.collect();
    assert_eq!(b.held("web"), 1, "the waiter got in");
    assert!(b.ask("web") && !b.ask("web"), "two grants, two in use");
    assert_eq!(b.s.set_grants("web", 1), 2, "lowering takes nothing back");
    b.release("web");
    assert_eq!(b.held("web"), 1, "the waiter stays out: one in use, cap 1");
    let w = &b.s.cluster_wants()[0];
    assert_eq!((&*w.identity, w.max, w.in_use, w.waiting), ("web", 5, 1, 1));
    assert_eq!(b.s.grants("web"), 1);
    b.s.set_grants("web", 3);
    b.collect();
    assert_eq!(b.held("web"), 2);
    assert_eq!(b.s.set_grants("nobody", 3), 0, "unknown identities are left alone");
}

#[test]
fn one_identity_alone_gets_everything() {
    let mut b = Bench::new(4, &[("a", limits(0, 0, 1, 0))]);
    assert!((0..4).all(|_| b.ask("a")), "work-conserving: all free grants at once");
    assert!(!b.ask("a"));
    b.release("a");
    assert_eq!(b.held("a"), 4, "the waiter got the freed grant");
    assert_eq!(b.s.status("a"), ShareStatus { servers: 4, waiting: 0 });
}

#[test]
fn freed_grants_go_to_the_identity_holding_fewest_until_even() {
    let mut b = Bench::new(10, &[("greedy", limits(0, 0, 1, 0)), ("polite", limits(0, 0, 1, 0))]);
    for _ in 0..10 {
        b.ask("greedy");
    }
    for _ in 0..100 {
        b.ask("greedy");
    }
    for _ in 0..5 {
        b.ask("polite");
    }
    // Greedy arrived first with 100 waiting; every grant greedy frees goes to polite first.
    for _ in 0..5 {
        b.release("greedy");
    }
    assert_eq!((b.held("greedy"), b.held("polite")), (5, 5));
    for _ in 0..3 {
        b.ask("polite");
    }
    // Now even, both waiting: whoever frees a grant gets it back (its waiter holds fewer than the other).
    for i in 0..20 {
        b.release(if i % 2 == 0 { "greedy" } else { "polite" });
        b.ask(if i % 2 == 0 { "greedy" } else { "polite" });
        assert_eq!((b.held("greedy"), b.held("polite")), (5, 5));
    }
}

#[test]
fn weights_set_the_shares() {
    let mut b = Bench::new(8, &[("a", limits(0, 0, 3, 0)), ("b", limits(0, 0, 1, 0))]);
    for _ in 0..8 {
        b.ask("b");
    }
    for _ in 0..50 {
        b.ask("a");
        b.ask("b");
    }
    // Each freed grant goes to the waiter with the fewest grants for its weight.
    for who in ["b"; 8].into_iter().chain(["a"; 8]) {
        b.release(who);
        b.ask(who);
    }
    assert_eq!((b.held("a"), b.held("b")), (6, 2), "weight 3:1 of 8");
}

#[test]
fn per_identity_cap_leaves_the_rest_to_others_and_reserves_are_kept() {
    let mut b = Bench::new(
        6,
        &[
            ("capped", limits(2, 0, 1, 0)),
            ("other", limits(0, 0, 1, 0)),
            ("vip", limits(0, 2, 1, 0)),
        ],
    );
    assert!(b.ask("vip"), "first use of the pool registers vip's reserve");
    b.release("vip");
    assert!(b.ask("capped") && b.ask("capped"));
    assert!(!b.ask("capped"), "its cap of 2 is reached though grants are free");
    assert!(b.ask("other") && b.ask("other"));
    assert!(!b.ask("other"), "the last 2 are reserved for vip");
    assert!(b.ask("vip") && b.ask("vip"), "vip gets its reserve while others wait");
    assert!(!b.ask("vip"));
    b.release("vip");
    assert_eq!(
        b.held("other"),
        2,
        "a freed reserved grant goes back to vip's reserve, not to others"
    );
    assert_eq!(b.held("vip"), 2, "vip's own waiter got it");
    b.release("capped");
    assert_eq!(
        b.held("capped"),
        2,
        "capped's waiter takes its freed grant (still under cap)"
    );
}

#[test]
fn queue_bound_and_cancel() {
    let mut s = Scheduler::default();
    let (gate, a): (Arc<str>, Arc<str>) = (Arc::from("pool"), Arc::from("a"));
    s.set_limits(&a, limits(0, 0, 1, 2));
    assert!(matches!(
        s.request(&gate, 1, &a, Hold::Transaction, far()),
        Request::Granted
    ));
    let Request::Queued(t1, mut rx1) = s.request(&gate, 1, &a, Hold::Transaction, far()) else {
        panic!()
    };
    let Request::Queued(t2, _rx2) = s.request(&gate, 1, &a, Hold::Transaction, far()) else {
        panic!()
    };
    assert!(matches!(
        s.request(&gate, 1, &a, Hold::Transaction, far()),
        Request::QueueFull(2)
    ));
    assert!(s.cancel(&gate, &a, t2), "a queued waiter leaves the queue");
    assert!(!s.cancel(&gate, &a, t2));
    s.release(&gate, &a, Hold::Transaction);
    assert!(rx1.try_recv().is_ok());
    assert!(!s.cancel(&gate, &a, t1), "granted: not in the queue any more");
    assert_eq!(s.status("a"), ShareStatus { servers: 1, waiting: 0 });
    s.release(&gate, &a, Hold::Transaction);
    s.prune(|_| false);
    assert_eq!(s.status("a"), ShareStatus::default());
    assert_eq!(s.gate_status("pool"), (0, 0));
}

#[test]
fn capacity_growth_wakes_waiters() {
    let mut b = Bench::new(1, &[("a", limits(0, 0, 1, 0))]);
    assert!(b.ask("a"));
    assert!(!b.ask("a"));
    b.cap = 2;
    assert!(!b.ask("a"), "the new grant went to the client queued first");
    b.release("a");
    assert_eq!(b.held("a"), 2);
}

#[test]
fn lock_holders_at_their_cap_hold_back_new_grants() {
    let mut l = limits(0, 0, 1, 0);
    l.max_lock_holders = 1;
    let mut b = Bench::new(4, &[("migr", l), ("web", limits(0, 0, 1, 0))]);
    assert!(b.ask("migr"));
    b.s.set_lock_holders(&HashMap::from([("migr".to_string(), 1)]));
    assert!(
        !b.ask("migr"),
        "one session holds a dangerous lock: the next transaction waits"
    );
    assert!(b.ask("web"), "other identities are not held back");
    b.s.set_lock_holders(&HashMap::new());
    // Collect the woken waiter.
    b.release("web");
    assert_eq!(b.held("migr"), 2, "released by the monitor's next count");
}

#[test]
fn sweep_sends_due_notices_and_times_out_only_the_due() {
    let mut s = Scheduler::default();
    let (gate, a, b): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("pool"), Arc::from("a"), Arc::from("b"));
    let t0 = Instant::now();
    let secs = Duration::from_secs;
    let due = |notice: u64, deadline: u64| {
        let due = Due {
            notice: (notice > 0).then(|| t0 + secs(notice)),
            deadline: t0 + secs(deadline),
        };
        move |_| (t0, due)
    };
    assert!(matches!(
        s.request(&gate, 1, &a, Hold::Transaction, due(0, 100)),
        Request::Granted
    ));
    let Request::Queued(_, mut ra) = s.request(&gate, 1, &a, Hold::Transaction, due(5, 10)) else {
        panic!("a queues")
    };
    let Request::Queued(_, mut rb) = s.request(&gate, 1, &b, Hold::Transaction, due(0, 3)) else {
        panic!("b queues")
    };
    assert_eq!(s.sweep(t0 + secs(1)), Some(t0 + secs(3)), "b's deadline is next");
    assert!(ra.try_recv().is_err() && rb.try_recv().is_err(), "nothing due yet");
    assert_eq!(s.sweep(t0 + secs(3)), Some(t0 + secs(5)), "then a's notice");
    assert!(matches!(rb.try_recv(), Ok(Signal::TimedOut)));
    assert_eq!(s.status("b"), ShareStatus { servers: 0, waiting: 0 });
    assert_eq!(s.gate_status("pool"), (1, 1), "a still waits");
    assert_eq!(s.sweep(t0 + secs(5)), Some(t0 + secs(10)), "then a's deadline");
    let Ok(Signal::Notice(mut ra)) = ra.try_recv() else {
        panic!("a is told it is queued")
    };
    assert_eq!(s.sweep(t0 + secs(6)), Some(t0 + secs(10)), "one notice only");
    assert!(ra.try_recv().is_err());
    s.release(&gate, &a, Hold::Transaction);
    assert!(
        matches!(ra.try_recv(), Ok(Signal::Granted)),
        "the grant comes on the channel the notice gave"
    );
    assert_eq!(s.status("a"), ShareStatus { servers: 1, waiting: 0 });
    assert_eq!(s.sweep(t0 + secs(20)), None, "nobody waits");
}

fn with_headroom(n: u32) -> ShareLimits {
    ShareLimits {
        headroom: Headroom::Connections(n),
        ..ShareLimits::default()
    }
}

#[test]
fn sessions_leave_the_headroom_to_identities_below_their_share() {
    let mut b = Bench::new(40, &[("greedy", with_headroom(4)), ("polite", with_headroom(4))]);
    b.hold = Hold::Session;
    for _ in 0..200 {
        b.ask("greedy");
    }
    assert_eq!(b.held("greedy"), 36, "alone, it leaves 4 free");
    assert_eq!(
        b.s.held_back(&b.gate, &Arc::from("greedy"), Hold::Session),
        Some((36, 4))
    );
    for _ in 0..6 {
        b.ask("polite");
    }
    assert_eq!(b.held("polite"), 4, "a newcomer gets the headroom at once");
    assert_eq!(
        b.s.held_back(&b.gate, &Arc::from("greedy"), Hold::Session),
        None,
        "full"
    );
    b.release("greedy");
    b.release("greedy");
    assert_eq!(b.held("polite"), 6, "freed connections go to polite below its share");
    // Nobody else waits: the greedy may have what is free beyond the headroom only.
    for _ in 0..6 {
        b.release("greedy");
    }
    assert_eq!((b.held("greedy"), b.held("polite")), (30, 6), "36 in use, 4 free");
    b.ask("polite");
    assert_eq!(b.held("polite"), 7, "still below its share (20)");
}

#[test]
fn headroom_zero_and_short_transactions_are_never_held_back() {
    let mut b = Bench::new(10, &[("off", with_headroom(0))]);
    b.hold = Hold::Session;
    assert!((0..10).all(|_| b.ask("off")), "headroom 0: the whole pool");
    let mut b = Bench::new(10, &[("tx", with_headroom(2))]);
    assert!(
        (0..10).all(|_| b.ask("tx")),
        "transactions that do not pin: the whole pool"
    );
}

#[test]
fn an_identity_that_pins_is_judged_by_all_it_holds() {
    let mut b = Bench::new(10, &[("greedy", with_headroom(2)), ("polite", with_headroom(2))]);
    let greedy: Arc<str> = Arc::from("greedy");
    assert!((0..8).all(|_| b.ask("greedy")));
    b.s.pin(&b.gate, &greedy);
    assert!(!b.ask("greedy"), "it pins and holds 8 of 10: the last 2 are kept");
    assert!(b.ask("polite"), "for others");
    b.s.unpin(&b.gate, &greedy);
    b.collect();
    assert_eq!(b.held("greedy"), 9, "no pin left: its waiter is served");
}

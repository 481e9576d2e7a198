//! Admission with two cores: an identity's cap split into allowances that follow demand and
//! hold exactly, the queue bound across cores, and the whole pool's view through mirrors.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use super::super::identity::IdentityRule;
use super::super::*;

fn config(settings: AdmissionSettings) -> AdmissionConfig {
    AdmissionConfig {
        max_clients: 10_000,
        settings,
        rules: Vec::<IdentityRule>::new()
            .into_iter()
            .map(|r| Rule::new(r).unwrap())
            .collect(),
        query_wait_timeout: Duration::from_secs(30),
        login_wait: Duration::from_secs(5),
    }
}

fn facts() -> ClientFacts<'static> {
    ClientFacts {
        application_name: "web",
        source: IpAddr::from([10, 0, 0, 1]),
        user: "app",
        database: "app",
    }
}

/// Two cores, their queue clock running, and each core's gate of one pool.
fn two_cores(settings: AdmissionSettings) -> (Admission, [Arc<str>; 2]) {
    let a = Admission::with_cores(config(settings), Default::default(), 2);
    let clock = a.clone();
    tokio::spawn(async move { clock.queue_clock().await });
    let label = "database \"app\" user \"app\"";
    let gates = [0, 1].map(|k| Arc::from(gate_name(label, k, 2)));
    (a, gates)
}

async fn member_on(a: &Admission, core: usize) -> Member {
    member_as(a, "web", core).await
}

async fn member_as(a: &Admission, app: &str, core: usize) -> Member {
    let facts = ClientFacts {
        application_name: app,
        ..facts()
    };
    let mut m = a.login(&facts).await.unwrap();
    m.settle(core);
    m
}

/// Moves the grants the queued clients got by now into `granted`; how many.
async fn collect_granted(queued: &mut [Queued<'_>], granted: &mut Vec<ServerGrant>) -> usize {
    let mut more = 0;
    for q in queued {
        if let Ok(Ok(Waited::Granted(g, _))) = tokio::time::timeout(Duration::from_millis(1), q.next()).await {
            granted.push(g);
            more += 1;
        }
    }
    more
}

fn capped(max: u32) -> AdmissionSettings {
    AdmissionSettings {
        max_server_connections: max,
        queue_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn all_load_on_one_core_reaches_the_whole_cap() {
    let (a, gates) = two_cores(capped(4));
    let mut members = Vec::new();
    for _ in 0..6 {
        members.push(member_on(&a, 1).await);
    }
    let mut granted = Vec::new();
    let mut queued = Vec::new();
    for m in &members {
        match a.request_in(m, (&gates[1], 1), (10, 20), Hold::Transaction).unwrap() {
            Acquired::Granted(g) => granted.push(g),
            Acquired::Queued(q) => queued.push(q),
        }
    }
    assert_eq!(granted.len(), 2, "the cap split evenly at first: 2 of 4 on each core");
    a.exchange();
    let more = collect_granted(&mut queued, &mut granted).await;
    assert_eq!(more, 2, "the idle core's allowance moved to the waiting one");
    assert_eq!(a.identity("web").unwrap().servers, 4);
    // Never beyond the cap, however often the allowances move.
    for _ in 0..5 {
        a.exchange();
    }
    assert_eq!(a.identity("web").unwrap().servers, 4);
    assert_eq!(a.identity("web").unwrap().waiting, 2);
}

#[tokio::test(start_paused = true)]
async fn a_queued_client_wakes_the_lease_loop_at_once_and_counts_as_waiting() {
    let (a, gates) = two_cores(capped(2));
    let (m1, m2) = (member_on(&a, 1).await, member_on(&a, 1).await);
    let quiet = |a: &Admission| {
        let a = a.clone();
        async move {
            tokio::time::timeout(Duration::from_millis(1), a.client_queued())
                .await
                .is_err()
        }
    };
    assert!(quiet(&a).await, "nobody queued: the loop may sleep");
    let Acquired::Granted(first) = a.request_in(&m1, (&gates[1], 1), (10, 20), Hold::Transaction).unwrap() else {
        panic!("the core's allowance of 1 is free");
    };
    assert!(!a.anyone_waiting());
    assert!(quiet(&a).await, "a grant at once rings nothing");
    let Acquired::Queued(mut q) = a.request_in(&m2, (&gates[1], 1), (10, 20), Hold::Transaction).unwrap() else {
        panic!("the core's allowance is used up");
    };
    assert!(a.anyone_waiting());
    assert!(!quiet(&a).await, "the queued client woke the loop");
    assert!(quiet(&a).await, "once");
    drop(first);
    assert!(matches!(q.next().await, Ok(Waited::Granted(..))));
    assert!(!a.anyone_waiting());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cap_of_three_holds_across_cores_while_allowances_move() {
    let (a, gates) = two_cores(capped(3));
    let (held, peak) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                a.exchange();
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (a, gates, held, peak) = (a.clone(), gates.clone(), held.clone(), peak.clone());
            tokio::spawn(async move {
                let core = i % 2;
                let m = member_on(&a, core).await;
                for _ in 0..40 {
                    let g = match a
                        .request_in(&m, (&gates[core], core), (10, 20), Hold::Transaction)
                        .unwrap()
                    {
                        Acquired::Granted(g) => g,
                        Acquired::Queued(mut q) => loop {
                            if let Waited::Granted(g, _) = q.next().await.unwrap() {
                                break g;
                            }
                        },
                    };
                    peak.fetch_max(held.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    mover.await.unwrap();
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "max_server_connections=3 across two cores"
    );
    let s = a.identity("web").unwrap();
    assert_eq!((s.servers, s.waiting, s.counters.grants), (0, 0, 32 * 40));
}

#[tokio::test(start_paused = true)]
async fn max_queue_counts_waiters_on_every_core() {
    let settings = AdmissionSettings {
        max_queue: 3,
        ..capped(2)
    };
    let (a, gates) = two_cores(settings);
    let mut members = Vec::new();
    for k in 0..8 {
        members.push((member_on(&a, k % 2).await, k % 2));
    }
    let (mut granted, mut queued, mut full) = (Vec::new(), Vec::new(), 0);
    for (m, core) in &members {
        match a.request_in(m, (&gates[*core], *core), (10, 20), Hold::Transaction) {
            Ok(Acquired::Granted(g)) => granted.push(g),
            Ok(Acquired::Queued(q)) => queued.push(q),
            Err(r) => {
                assert_eq!(r.reason(), "queue_full");
                full += 1;
            }
        }
    }
    assert_eq!((granted.len(), queued.len(), full), (2, 3, 3));
    drop(queued.pop());
    let (m, core) = &members[7];
    assert!(
        matches!(
            a.request_in(m, (&gates[*core], *core), (10, 20), Hold::Transaction),
            Ok(Acquired::Queued(_))
        ),
        "a place freed on one core is free for the other"
    );
}

#[tokio::test(start_paused = true)]
async fn the_fair_pick_counts_grants_on_other_cores() {
    let (a, gates) = two_cores(AdmissionSettings::default());
    let grant = |r: Result<Acquired<'_>, Refusal>| match r.unwrap() {
        Acquired::Granted(g) => g,
        Acquired::Queued(_) => panic!("a free grant"),
    };
    // "web" holds 3 on core 0; on core 1 (a lease of 1) "other" holds the one grant.
    let web0 = member_as(&a, "web", 0).await;
    let _held: Vec<_> = (0..3)
        .map(|_| grant(a.request_in(&web0, (&gates[0], 0), (10, 11), Hold::Transaction)))
        .collect();
    let other1 = member_as(&a, "other", 1).await;
    let first = grant(a.request_in(&other1, (&gates[1], 1), (1, 11), Hold::Transaction));
    // Both wait on core 1, "web" first.
    let web1 = member_as(&a, "web", 1).await;
    let other2 = member_as(&a, "other", 1).await;
    let Acquired::Queued(mut w) = a.request_in(&web1, (&gates[1], 1), (1, 11), Hold::Transaction).unwrap() else {
        panic!("core 1 is full")
    };
    let Acquired::Queued(mut o) = a
        .request_in(&other2, (&gates[1], 1), (1, 11), Hold::Transaction)
        .unwrap()
    else {
        panic!("core 1 is full")
    };
    a.exchange();
    let id = web0.identity().clone();
    assert_eq!(
        a.core(1).lock().sched.gate_held(&gates[1], &id),
        3,
        "core 0's grants, mirrored"
    );
    drop(first);
    let quick = Duration::from_millis(1);
    let got = tokio::time::timeout(quick, o.next()).await;
    assert!(
        matches!(got, Ok(Ok(Waited::Granted(..)))),
        "the freed grant goes to the identity holding fewer in the whole pool"
    );
    let next = tokio::time::timeout(quick, w.next()).await;
    assert!(!matches!(next, Ok(Ok(Waited::Granted(..)))), "web waits: {next:?}");
}

#[tokio::test(start_paused = true)]
async fn the_headroom_holds_exactly_across_cores() {
    // A pool of 10 split 5 and 5; the default headroom keeps 1 (10%) from an identity that
    // holds for whole sessions beyond its share.
    let (a, gates) = two_cores(AdmissionSettings::default());
    let mut members = Vec::new();
    for k in 0..12 {
        members.push((member_on(&a, k % 2).await, k % 2));
    }
    let (mut granted, mut queued) = (Vec::new(), Vec::new());
    for (m, core) in &members {
        match a.request_in(m, (&gates[*core], *core), (5, 10), Hold::Session).unwrap() {
            Acquired::Granted(g) => granted.push(g),
            Acquired::Queued(q) => queued.push(q),
        }
    }
    assert_eq!(
        granted.len(),
        8,
        "each core alone decides while it has more free than the headroom"
    );
    for _ in 0..3 {
        a.exchange();
    }
    let more = collect_granted(&mut queued, &mut granted).await;
    assert_eq!(
        more, 1,
        "one more, decided with every core locked: the last one stays free"
    );
    assert_eq!(a.identity("web").unwrap().servers, 9);
}

#[tokio::test(start_paused = true)]
async fn a_transaction_of_an_identity_holding_long_on_another_core_keeps_the_headroom() {
    // A pool of 10 split 5 and 5, headroom 1 (10%). "web" holds core 1's five for whole
    // sessions; on core 0 its transactions are judged by those (a pinning identity is judged
    // by all it holds): four go, the last free one is kept for others.
    let (a, gates) = two_cores(AdmissionSettings::default());
    // Both cores' gates exist (in the proxy each pool part's does from its first lease).
    let other = member_as(&a, "other", 0).await;
    drop(
        a.request_in(&other, (&gates[0], 0), (5, 10), Hold::Transaction)
            .unwrap(),
    );
    a.exchange();
    let mut sessions = Vec::new();
    for _ in 0..5 {
        sessions.push(member_on(&a, 1).await);
    }
    let (mut granted, mut last) = (Vec::new(), Vec::new());
    for m in &sessions {
        match a.request_in(m, (&gates[1], 1), (5, 10), Hold::Session).unwrap() {
            Acquired::Granted(g) => granted.push(g),
            Acquired::Queued(q) => last.push(q),
        }
    }
    // (Its last one on core 1 is decided with every core locked.)
    for _ in 0..3 {
        a.exchange();
    }
    collect_granted(&mut last, &mut granted).await;
    assert_eq!(granted.len(), 5);
    a.exchange();
    let m = member_on(&a, 0).await;
    let mut queued = Vec::new();
    for _ in 0..5 {
        match a.request_in(&m, (&gates[0], 0), (5, 10), Hold::Transaction).unwrap() {
            Acquired::Granted(g) => granted.push(g),
            Acquired::Queued(q) => queued.push(q),
        }
    }
    assert_eq!(granted.len(), 9, "the last free connection of the pool is kept");
    for _ in 0..3 {
        a.exchange();
    }
    assert_eq!(collect_granted(&mut queued, &mut granted).await, 0, "still kept");
    // Another identity takes it at once.
    assert!(matches!(
        a.request_in(&other, (&gates[0], 0), (5, 10), Hold::Transaction)
            .unwrap(),
        Acquired::Granted(_)
    ));
}

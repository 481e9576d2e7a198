//! Admission with paused time: caps, login rate, queue timeouts, cancel-safety, surges,
//! reload.

use std::net::IpAddr;

use super::identity::IdentityRule;
use super::*;

fn config(settings: AdmissionSettings, rules: Vec<IdentityRule>) -> AdmissionConfig {
    AdmissionConfig {
        max_clients: 10_000,
        settings,
        rules: rules.into_iter().map(|r| Rule::new(r).unwrap()).collect(),
        query_wait_timeout: Duration::from_secs(30),
        login_wait: Duration::from_secs(5),
    }
}

fn facts(app: &str) -> ClientFacts<'_> {
    ClientFacts {
        application_name: app,
        source: IpAddr::from([10, 0, 0, 1]),
        user: "app",
        database: "app",
    }
}

/// Admission under `c` with its queue clock running (queued NOTICEs and timeouts).
fn started(c: AdmissionConfig) -> Admission {
    let a = Admission::new(c, Default::default());
    let clock = a.clone();
    tokio::spawn(async move { clock.queue_clock().await });
    a
}

fn pool() -> Arc<str> {
    Arc::from("database \"app\" user \"app\"")
}

#[tokio::test(start_paused = true)]
async fn client_cap_per_identity_refuses_before_anything_else() {
    let rule = IdentityRule {
        name: "web".into(),
        application_name: Some("web-*".into()),
        max_client_connections: Some(2),
        ..Default::default()
    };
    let a = started(config(AdmissionSettings::default(), vec![rule]));
    let m1 = a.login(&facts("web-1")).await.unwrap();
    let _m2 = a.login(&facts("web-2")).await.unwrap();
    let r = a.login(&facts("web-3")).await.unwrap_err();
    assert_eq!(
        r.to_string(),
        "pgvalve: client \"web\" has 2 client connections (max_client_connections=2)"
    );
    assert_eq!(r.client_error().code, "53300");
    let _other = a
        .login(&facts("reports"))
        .await
        .expect("other identities are not affected");
    drop(m1);
    let _m3 = a.login(&facts("web-3")).await.expect("a slot came back");
    let s = a.identity("web").unwrap();
    assert_eq!(
        (s.clients, s.counters.admitted, s.counters.refused["client_cap"]),
        (2, 3, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn login_rate_spreads_a_storm_and_refuses_beyond_the_wait() {
    let settings = AdmissionSettings {
        max_connect_rate: 10.0,
        connect_burst: 5,
        queue_timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let a = started(config(settings, vec![]));
    let start = Instant::now();
    let logins: Vec<_> = (0..30)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.login(&facts("storm")).await.map(|_| Instant::now()) })
        })
        .collect();
    let mut ok = Vec::new();
    let mut refused = 0;
    for l in logins {
        match l.await.unwrap() {
            Ok(t) => ok.push(t.duration_since(start)),
            Err(Refusal::ConnectRate { rate, burst, .. }) => {
                assert_eq!((rate, burst), (10.0, 5));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // 5 at once, then one every 100 ms up to the 1 s wait: 10 more; the rest refused.
    assert_eq!((ok.len(), refused), (15, 15));
    assert_eq!(ok.iter().filter(|d| d.is_zero()).count(), 5);
    assert_eq!(ok.iter().max().copied(), Some(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_and_server_cap_have_distinct_messages() {
    let rule = IdentityRule {
        name: "capped".into(),
        application_name: Some("capped".into()),
        max_server_connections: Some(1),
        queue_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let settings = AdmissionSettings {
        queue_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let a = started(config(settings, vec![rule]));
    let (c1, c2) = (
        a.login(&facts("capped")).await.unwrap(),
        a.login(&facts("capped")).await.unwrap(),
    );
    let g = a.acquire(&c1, &pool(), 5, Hold::Transaction).await.unwrap();
    let t = Instant::now();
    let r = a.acquire(&c2, &pool(), 5, Hold::Transaction).await.unwrap_err();
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    assert_eq!(
        r.to_string(),
        "pgvalve: client \"capped\" has 1 server connections (max_server_connections=1); waited 2s (queue_timeout)"
    );
    drop(g);
    let (p1, p2) = (
        a.login(&facts("plain")).await.unwrap(),
        a.login(&facts("plain")).await.unwrap(),
    );
    let _g = a.acquire(&p1, &pool(), 1, Hold::Transaction).await.unwrap();
    let r = a.acquire(&p2, &pool(), 1, Hold::Transaction).await.unwrap_err();
    assert_eq!(
        r.to_string(),
        "pgvalve: client \"plain\" waited 3s for a server connection (queue_timeout): all 1 of database \"app\" user \"app\" are in use (pool_size=1), 1 of them by \"plain\""
    );
    assert_eq!(r.reason(), "queue_timeout");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaves_the_queue_and_a_grant_moves_on() {
    let settings = AdmissionSettings {
        max_queue: 1,
        ..Default::default()
    };
    let a = started(config(settings, vec![]));
    let mut m = Vec::new();
    for _ in 0..3 {
        m.push(a.login(&facts("x")).await.unwrap());
    }
    let g = a.acquire(&m[0], &pool(), 1, Hold::Transaction).await.unwrap();
    {
        let p = pool();
        let waiting = a.acquire(&m[1], &p, 1, Hold::Transaction);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_millis(10), &mut waiting)
            .await
            .is_err());
        let full = a.acquire(&m[2], &pool(), 1, Hold::Transaction).await.unwrap_err();
        assert_eq!(full.reason(), "queue_full");
        assert!(full
            .to_string()
            .contains("already has 1 clients waiting for a server connection (max_queue=1)"));
    }
    assert_eq!(a.identity("x").unwrap().waiting, 0, "the dropped waiter left the queue");
    let next = tokio::spawn({
        let (a, m2) = (a.clone(), a.login(&facts("x")).await.unwrap());
        async move { a.acquire(&m2, &pool(), 1, Hold::Transaction).await.map(|_| ()) }
    });
    tokio::task::yield_now().await;
    drop(g);
    next.await.unwrap().expect("the freed grant went to the waiter");
    assert_eq!(a.identity("x").unwrap().servers, 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_request_is_granted_told_timed_out_or_gives_its_grant_back() {
    let a = started(config(AdmissionSettings::default(), vec![]));
    let (m0, m1) = (a.login(&facts("x")).await.unwrap(), a.login(&facts("x")).await.unwrap());
    let p = pool();
    let Ok(Acquired::Granted(g)) = a.request(&m0, &p, 1, Hold::Transaction) else {
        panic!("the first request is granted at once")
    };
    let Ok(Acquired::Queued(mut q)) = a.request(&m1, &p, 1, Hold::Transaction) else {
        panic!("the second one queues")
    };
    assert_eq!(q.timeout(), Duration::from_secs(30), "query_wait_timeout");
    tokio::time::advance(Duration::from_millis(40)).await;
    drop(g); // the grant moves to the waiter at once
    let Ok(Waited::Granted(g, waited)) = q.next().await else {
        panic!("the grant arrives")
    };
    assert_eq!(waited, Duration::from_millis(40));
    drop(q);
    assert_eq!(a.identity("x").unwrap().servers, 1, "a claimed grant stays claimed");

    // queue_notice_after (5 s by default), then query_wait_timeout (30 s), from the clock.
    let Ok(Acquired::Queued(mut q)) = a.request(&m0, &p, 1, Hold::Transaction) else {
        panic!("queues behind the grant held")
    };
    let t = Instant::now();
    assert!(matches!(q.next().await, Ok(Waited::Notice)));
    assert_eq!(t.elapsed(), Duration::from_secs(5));
    let r = q.next().await.expect_err("no grant arrived");
    assert_eq!(t.elapsed(), Duration::from_secs(30));
    assert_eq!(r.reason(), "queue_timeout");
    drop(q);
    let x = a.identity("x").unwrap();
    assert_eq!((x.servers, x.waiting, x.counters.refused["queue_timeout"]), (1, 0, 1));

    // Dropped with its NOTICE and then its grant unread: the grant goes back.
    let Ok(Acquired::Queued(q)) = a.request(&m0, &p, 1, Hold::Transaction) else {
        panic!("queues")
    };
    tokio::time::sleep(Duration::from_secs(6)).await; // the clock sends the NOTICE
    drop(g);
    drop(q);
    let x = a.identity("x").unwrap();
    assert_eq!((x.servers, x.waiting), (0, 0));
    assert!(
        matches!(a.request(&m1, &p, 1, Hold::Transaction), Ok(Acquired::Granted(_))),
        "the grant is free again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_surge_is_recorded_once_and_damped() {
    let settings = AdmissionSettings {
        surge_min_rate: 20.0,
        surge_damping: 0.5,
        queue_timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let a = started(config(settings, vec![]));
    let mut members = Vec::new();
    for _ in 0..5 {
        members.push(a.login(&facts("django")).await.unwrap());
        a.tick(Duration::from_secs(1));
    }
    for _ in 0..40 {
        members.push(a.login(&facts("django")).await.unwrap());
    }
    a.tick(Duration::from_secs(1));
    let surges = a.surges();
    assert_eq!(surges.len(), 1);
    assert_eq!((surges[0].identity.as_str(), surges[0].rate), ("django", 40.0));
    assert!(a.identity("django").unwrap().surging);
    // Damped to 0.5 x 20/s = 10/s with a burst of 10 and a 100 ms wait: 11 more, then refused.
    let storm: Vec<_> = (0..30)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.login(&facts("django")).await })
        })
        .collect();
    let mut admitted = 0;
    let mut refusal = None;
    for l in storm {
        match l.await.unwrap() {
            Ok(m) => {
                admitted += 1;
                members.push(m);
            }
            Err(r) => refusal = Some(r),
        }
    }
    assert_eq!(admitted, 11);
    let refusal = refusal.expect("some were refused");
    assert!(
        refusal.to_string().contains("while surging (surge_damping)"),
        "{refusal}"
    );
    a.tick(Duration::from_secs(1));
    assert_eq!(a.surges().len(), 1, "one event per episode");
    assert_eq!(a.identity("django").unwrap().counters.surges, 1);
}

#[tokio::test(start_paused = true)]
async fn reload_changes_caps_of_connected_identities() {
    let rule = |max| IdentityRule {
        name: "app:{application_name}".into(),
        max_client_connections: Some(max),
        ..Default::default()
    };
    let a = started(config(AdmissionSettings::default(), vec![rule(1)]));
    let _m = a.login(&facts("web")).await.unwrap();
    assert_eq!(a.login(&facts("web")).await.unwrap_err().reason(), "client_cap");
    a.reload(config(AdmissionSettings::default(), vec![rule(3)]));
    assert_eq!(a.identity("app:web").unwrap().limits.max_clients, 3);
    let _m2 = a.login(&facts("web")).await.expect("raised by reload");
    a.reload(config(AdmissionSettings::default(), vec![]));
    assert_eq!(
        a.identity("app:web").unwrap().limits.max_clients,
        0,
        "rule gone: defaults"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caps_hold_exactly_under_races() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let settings = AdmissionSettings {
        max_client_connections: 7,
        max_server_connections: 3,
        queue_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let a = started(config(settings, vec![]));
    let (clients, servers) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (peak_c, peak_s) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (a, clients, servers, peak_c, peak_s) = (
                a.clone(),
                clients.clone(),
                servers.clone(),
                peak_c.clone(),
                peak_s.clone(),
            );
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..50 {
                    let Ok(m) = a.login(&facts("race")).await else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    admitted += 1;
                    peak_c.fetch_max(clients.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    for _ in 0..5 {
                        let g = a.acquire(&m, &pool(), 100, Hold::Transaction).await.unwrap();
                        peak_s.fetch_max(servers.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        servers.fetch_sub(1, Ordering::SeqCst);
                        drop(g);
                    }
                    clients.fetch_sub(1, Ordering::SeqCst);
                    drop(m);
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert!(admitted > 50, "only {admitted} logins admitted");
    assert_eq!(peak_c.load(Ordering::SeqCst), 7, "client cap");
    assert_eq!(peak_s.load(Ordering::SeqCst), 3, "server cap (pool of 100)");
    let s = a.identity("race").unwrap();
    assert_eq!((s.clients, s.servers, s.waiting), (0, 0, 0));
}

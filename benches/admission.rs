//! Criterion benchmarks of admission's per-client work: matching a client to its identity
//! against a list of rules (once per login), and the fair scheduler's grant + release (once
//! per transaction in transaction pooling), uncontended and with waiters queued.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use pgvalve::admission::identity::{identify, ClientFacts, IdentityRule, Rule};
use pgvalve::admission::queue::{Due, Request, Scheduler, ShareLimits};
use pgvalve::admission::Hold;

/// Queued now, due in an hour: the benchmark never waits.
/// When a queued request is due (asked only if it queues).
fn far() -> impl FnOnce(std::time::Duration) -> (tokio::time::Instant, Due) {
    |_| {
        let now = tokio::time::Instant::now();
        let deadline = now + std::time::Duration::from_secs(3600);
        (now, Due { notice: None, deadline })
    }
}

fn rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            Rule::new(IdentityRule {
                name: format!("app-{i}"),
                application_name: Some(format!("service-{i}-*")),
                source: (i % 3 == 0).then(|| format!("10.{i}.0.0/16")),
                user: (i % 2 == 0).then(|| format!("user{i}")),
                ..Default::default()
            })
            .expect("valid rule")
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("admission");
    for n in [0, 10, 50] {
        let rules = rules(n);
        // A client that matches no rule: the worst case, every rule is tried.
        let facts = ClientFacts {
            application_name: "django-worker-7",
            source: "192.168.1.20".parse().unwrap(),
            user: "app",
            database: "app",
        };
        g.bench_function(format!("identify_{n}_rules_no_match"), |b| {
            b.iter(|| identify(std::hint::black_box(&rules), std::hint::black_box(&facts)))
        });
    }
    let limits = ShareLimits::default();
    let gate: Arc<str> = Arc::from("database \"app\" user \"app\"");
    let ids: Vec<Arc<str>> = (0..8).map(|i| Arc::from(format!("id{i}"))).collect();
    let mut s = Scheduler::default();
    for id in &ids {
        s.set_limits(id, limits);
    }
    g.bench_function("grant_release_uncontended", |b| {
        b.iter(|| {
            assert!(matches!(
                s.request(&gate, 20, &ids[0], Hold::Transaction, far()),
                Request::Granted
            ));
            s.release(&gate, &ids[0], Hold::Transaction);
        })
    });
    // A full gate with 8 identities queued: each release hands the grant to the fairest waiter.
    let mut s = Scheduler::default();
    for id in &ids {
        s.set_limits(id, limits);
    }
    let mut held = Vec::new();
    for i in 0..20 {
        assert!(matches!(
            s.request(&gate, 20, &ids[i % 8], Hold::Transaction, far()),
            Request::Granted
        ));
        held.push(ids[i % 8].clone());
    }
    let mut waiters = Vec::new();
    g.bench_function("release_to_fair_queue_8_identities", |b| {
        b.iter(|| {
            let id = held.remove(0);
            if let Request::Queued(_, rx) = s.request(&gate, 20, &id, Hold::Transaction, far()) {
                waiters.push((id.clone(), rx));
            }
            s.release(&gate, &id, Hold::Transaction);
            // Whoever got the grant now holds it.
            if let Some(pos) = waiters.iter_mut().position(|(_, rx)| rx.try_recv().is_ok()) {
                held.push(waiters.remove(pos).0);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

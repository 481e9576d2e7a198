use std::sync::atomic::AtomicUsize;

use super::*;

const SHORT: Duration = Duration::from_millis(30);

/// A pool stand-in: its idle connections are slots it holds; it records the shares it is told.
#[derive(Default)]
struct FakePool {
    idle: Mutex<Vec<Slot>>,
    share: AtomicUsize,
}

impl Occupant for Arc<FakePool> {
    fn close_idle(&self) -> bool {
        lock(&self.idle).pop().is_some()
    }
    fn resize(&self, share: usize) {
        self.share.store(share, Ordering::Relaxed);
    }
}

fn pool_under(server: &Arc<Budget>, max: usize) -> Arc<Budget> {
    Budget::new(Scale::Pool, max, Some(server.clone()))
}

#[tokio::test]
async fn a_budget_hands_out_its_size_and_no_more() {
    let b = Budget::new(Scale::Pool, 2, None);
    let s1 = b.take(SHORT).await.unwrap();
    let _s2 = b.take(SHORT).await.unwrap();
    assert_eq!(
        b.take(SHORT).await.unwrap_err(),
        Refused::Full {
            scale: Scale::Pool,
            max: 2
        }
    );
    assert_eq!(b.usage().used, 2);
    drop(s1);
    assert_eq!(b.usage().used, 1);
    b.take(SHORT).await.expect("the freed slot");
}

#[tokio::test]
async fn a_waiting_taker_gets_the_slot_given_back() {
    let b = Budget::new(Scale::Pool, 1, None);
    let held = b.take(SHORT).await.unwrap();
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.take(Duration::from_secs(30)).await.map(drop) }
    });
    tokio::task::yield_now().await;
    drop(held);
    waiter.await.unwrap().expect("woken by the slot given back");
}

#[tokio::test]
async fn a_pool_slot_holds_a_server_slot_too() {
    let server = Budget::new(Scale::Server, 2, None);
    let (a, b) = (pool_under(&server, 2), pool_under(&server, 2));
    let a1 = a.take(SHORT).await.unwrap();
    let _a2 = a.take(SHORT).await.unwrap();
    assert_eq!(server.usage().used, 2);
    assert_eq!(
        b.take(SHORT).await.unwrap_err(),
        Refused::Full {
            scale: Scale::Server,
            max: 2
        },
        "pool b has room, the server budget has not"
    );
    assert_eq!(b.usage().used, 0, "a refused take holds nothing");
    drop(a1);
    b.take(SHORT).await.expect("a server slot was given back");
}

#[tokio::test]
async fn a_full_budget_makes_room_by_closing_an_idle_connection() {
    let server = Budget::new(Scale::Server, 2, None);
    let (a, b) = (pool_under(&server, 2), pool_under(&server, 2));
    let fake = Arc::new(FakePool::default());
    a.occupy(Box::new(fake.clone()));
    let busy = a.take(SHORT).await.unwrap();
    let idle = a.take(SHORT).await.unwrap();
    lock(&fake.idle).push(idle);
    // The server budget is full; pool a's idle connection is closed for pool b.
    let _b1 = b.take(SHORT).await.expect("room made");
    assert!(lock(&fake.idle).is_empty());
    assert_eq!((a.usage().used, server.usage().used), (1, 2));
    drop(busy);
}

#[tokio::test]
async fn unlimited_budgets_never_refuse() {
    let server = Budget::new(Scale::Server, 0, None);
    let pool = pool_under(&server, 3);
    let slots: Vec<Slot> = futures_take(&pool, 3).await;
    assert_eq!(server.usage().used, 3);
    assert!(pool.take(SHORT).await.is_err(), "the pool's own size still holds");
    assert_eq!(server.share(), usize::MAX);
    drop(slots);
    assert_eq!(server.usage().used, 0);
}

async fn futures_take(b: &Arc<Budget>, n: usize) -> Vec<Slot> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(b.take(SHORT).await.unwrap());
    }
    v
}

#[tokio::test]
async fn a_claim_goes_before_the_pool_and_shrinks_its_share() {
    let server = Budget::new(Scale::Server, 10, None);
    let pool = pool_under(&server, 3);
    let fake = Arc::new(FakePool::default());
    pool.occupy(Box::new(fake.clone()));
    let mut busy = futures_take(&pool, 3).await;
    let claim = tokio::spawn({
        let pool = pool.clone();
        async move { pool.claim(Hold::Lasting, None).await }
    });
    while pool.usage().own == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        fake.share.load(Ordering::Relaxed),
        2,
        "the pool is told to hold one less"
    );
    assert!(
        busy[0].wanted(),
        "a busy connection is asked to close when it comes back"
    );
    // A pool taker waiting meanwhile does not get the slot the claim waits for.
    let pool_taker = tokio::spawn({
        let pool = pool.clone();
        async move { pool.take(Duration::from_millis(300)).await.map(drop) }
    });
    tokio::task::yield_now().await;
    busy.pop();
    let own = claim.await.unwrap().expect("the claim gets the freed slot");
    assert!(!busy[0].wanted(), "nothing is wanted any more");
    assert_eq!(
        pool_taker.await.unwrap().unwrap_err(),
        Refused::Full {
            scale: Scale::Pool,
            max: 3
        }
    );
    assert_eq!(
        pool.usage(),
        Usage {
            max: 3,
            used: 3,
            own: 1
        }
    );
    assert_eq!(server.usage().own, 1, "the claim holds a server slot too");
    drop(own);
    assert_eq!(fake.share.load(Ordering::Relaxed), 3, "the share comes back");
    assert_eq!(pool.usage().own, 0);
}

#[tokio::test]
async fn a_claim_is_served_first_through_the_server_budget() {
    let server = Budget::new(Scale::Server, 2, None);
    let (a, b) = (pool_under(&server, 5), pool_under(&server, 5));
    let mut busy = futures_take(&a, 2).await;
    let claim = tokio::spawn({
        let b = b.clone();
        async move { b.claim(Hold::Brief, Some(Duration::from_secs(30))).await }
    });
    while server.usage().own == 0 {
        tokio::task::yield_now().await;
    }
    assert!(
        busy[0].wanted(),
        "pool a's connections are asked back for the claim on b"
    );
    busy.pop();
    let own = claim.await.unwrap().unwrap();
    assert_eq!((a.usage().used, b.usage().used, server.usage().used), (1, 1, 2));
    drop(own);
}

#[tokio::test]
async fn a_lasting_claim_never_takes_the_last_slot() {
    let server = Budget::new(Scale::Server, 10, None);
    let one = pool_under(&server, 1);
    assert_eq!(
        one.claim(Hold::Lasting, None).await.unwrap_err(),
        Refused::Last {
            scale: Scale::Pool,
            max: 1
        }
    );
    assert_eq!(
        (one.usage(), server.usage().own),
        (
            Usage {
                max: 1,
                used: 0,
                own: 0
            },
            0
        ),
        "nothing left registered"
    );
    let two = pool_under(&server, 2);
    let held = two.claim(Hold::Lasting, None).await.unwrap();
    assert_eq!(two.share(), 1);
    assert!(matches!(
        two.claim(Hold::Lasting, None).await,
        Err(Refused::Last { .. })
    ));
    // A brief claim may take the last slot (the share stays at least 1).
    let brief = two.claim(Hold::Brief, Some(SHORT)).await.unwrap();
    assert_eq!((two.share(), two.usage().used), (1, 2));
    drop((held, brief));
    let small_server = Budget::new(Scale::Server, 1, None);
    assert_eq!(
        pool_under(&small_server, 5)
            .claim(Hold::Lasting, None)
            .await
            .unwrap_err(),
        Refused::Last {
            scale: Scale::Server,
            max: 1
        }
    );
}

#[tokio::test]
async fn a_claim_dropped_while_waiting_is_withdrawn() {
    let server = Budget::new(Scale::Server, 10, None);
    let pool = pool_under(&server, 2);
    let fake = Arc::new(FakePool::default());
    pool.occupy(Box::new(fake.clone()));
    let busy = futures_take(&pool, 2).await;
    assert_eq!(
        pool.claim(Hold::Brief, Some(SHORT)).await.unwrap_err(),
        Refused::Full {
            scale: Scale::Pool,
            max: 2
        }
    );
    assert_eq!(
        pool.usage(),
        Usage {
            max: 2,
            used: 2,
            own: 0
        }
    );
    assert_eq!((server.usage().own, server.usage().used), (0, 2));
    assert!(!busy[0].wanted());
    assert_eq!(fake.share.load(Ordering::Relaxed), 2);
    drop(busy);
    futures_take(&pool, 2).await;
}

#[tokio::test]
async fn a_resize_tells_the_occupant_and_frees_waiters() {
    let pool = Budget::new(Scale::Pool, 1, None);
    let fake = Arc::new(FakePool::default());
    pool.occupy(Box::new(fake.clone()));
    let _held = pool.take(SHORT).await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.take(Duration::from_secs(30)).await.map(drop) }
    });
    tokio::task::yield_now().await;
    pool.resize(2);
    assert_eq!(fake.share.load(Ordering::Relaxed), 2);
    waiter.await.unwrap().expect("the new slot");
}

#[test]
fn the_registry_keeps_one_budget_per_pool_under_the_server_budget() {
    let budgets = Budgets::new(4);
    let a = budgets.pool("app", "app", 2);
    assert!(Arc::ptr_eq(&a, &budgets.pool("app", "app", 9)), "made once");
    assert_eq!(a.usage().max, 2);
    budgets.pool("other", "app", 2);
    budgets.retain(|d, _| d == "app");
    let left: Vec<String> = budgets.pools().into_iter().map(|(d, _, _)| d).collect();
    assert_eq!(left, ["app"]);
    assert_eq!(budgets.server().usage().max, 4);
}

#[tokio::test]
async fn a_closing_slot_counts_as_coming_free() {
    let server = Budget::new(Scale::Server, 10, None);
    let pool = pool_under(&server, 2);
    let fake = Arc::new(FakePool::default());
    pool.occupy(Box::new(fake.clone()));
    let mut busy = futures_take(&pool, 1).await;
    let idle = pool.take(SHORT).await.unwrap();
    lock(&fake.idle).push(idle);
    busy[0].closing();
    // Full, but a slot is coming free: no idle connection is closed for this taker.
    assert!(pool.take(SHORT).await.is_err());
    assert_eq!(lock(&fake.idle).len(), 1, "the idle connection stays");
    // A claim the closing slot covers asks no other connection back.
    let claim = tokio::spawn({
        let pool = pool.clone();
        async move { pool.claim(Hold::Brief, Some(Duration::from_secs(30))).await }
    });
    while pool.usage().own == 0 {
        tokio::task::yield_now().await;
    }
    assert!(!lock(&fake.idle)[0].wanted(), "the closing slot covers the claim");
    busy.clear();
    let own = claim.await.unwrap().expect("the closed slot goes to the claim");
    assert_eq!((pool.usage().used, server.usage().used), (2, 2));
    drop(own);
}

/// A pool's parts: idle connections handed over (counted) before any is closed.
#[derive(Default)]
struct HandingPool {
    /// Idle connections it can still hand over.
    idle: AtomicUsize,
    handed: AtomicUsize,
    closed: AtomicUsize,
}

impl Occupant for Arc<HandingPool> {
    fn close_idle(&self) -> bool {
        self.closed.fetch_add(1, Ordering::Relaxed);
        false
    }
    fn hand_idle(&self) -> bool {
        let had = self
            .idle
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if had.is_ok() {
            self.handed.fetch_add(1, Ordering::Relaxed);
        }
        had.is_ok()
    }
    fn resize(&self, _: usize) {}
}

#[tokio::test]
async fn a_full_pool_budget_hands_idle_connections_over_before_closing_one() {
    let b = Budget::new(Scale::Pool, 1, None);
    let parts = Arc::new(HandingPool {
        idle: AtomicUsize::new(2),
        ..HandingPool::default()
    });
    b.occupy(Box::new(parts.clone()));
    let _held = b.take(SHORT).await.unwrap();
    // The taker (in the pool, racing the hand-over queue) would take a handed connection;
    // here nobody does: each round hands the next idle one over, and only once the pool has
    // none left to hand does the budget close one.
    assert!(b.take(3 * RETRY + SHORT).await.is_err());
    assert_eq!(parts.handed.load(Ordering::Relaxed), 2, "both idle ones handed over");
    assert!(parts.closed.load(Ordering::Relaxed) >= 1, "then one is closed");
}

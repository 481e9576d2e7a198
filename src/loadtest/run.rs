//! Runs a [`Plan`]: spawns the clients (tokio-postgres), drives rounds, records into
//! per-group reports, samples PostgreSQL when asked to, shows a live progress bar.
//!
//! Part of `pgvalve loadtest`. Every client loop is bounded by its round's deadline (and by
//! `max_transactions` when set) and checks the stop flag (Ctrl-C) at least every 100 ms, so
//! a run always ends by itself and a stopped run still reports what it measured.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use super::measure::{self, GroupReport, Sample};
use super::plan::{Group, Plan, Step};

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The plan that ran.
    pub plan: Plan,
    /// Per group.
    pub groups: Vec<GroupReport>,
    /// `--observe` samples.
    pub samples: Vec<Sample>,
    /// PostgreSQL's max_connections, when observed.
    pub max_connections: Option<i64>,
    /// Server connections before the clients started (other users of the server), when
    /// observed.
    pub before: Option<i64>,
    /// Clients inside a transaction, once a second: (seconds since start, count).
    pub(crate) in_flight: Vec<(f64, i64)>,
    /// Wall time.
    pub elapsed: Duration,
    /// Stopped early (Ctrl-C).
    pub stopped: bool,
}

/// Live counters shared by the clients, for the progress bar.
#[derive(Debug, Default)]
struct Live {
    transactions: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicI64,
}

/// What a client needs.
#[derive(Clone)]
struct Ctx {
    cfg: tokio_postgres::Config,
    group: Group,
    report: Arc<Mutex<GroupReport>>,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    start: Instant,
    rows: u64,
    /// Open loop: the group's next arrival.
    ticket: Arc<AtomicU64>,
}

impl Ctx {
    /// Counts and records an error.
    fn error(&self, e: &tokio_postgres::Error) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        self.report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .error(self.start.elapsed(), describe(e));
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let msg: String = db.message().chars().take(100).collect();
            format!("{} {msg}", db.code().code())
        }
        None => format!("client: {e}"),
    }
}

/// Sleeps `d`, waking early when stopped or at `deadline`. False when it should stop.
async fn nap(d: Duration, stop: &AtomicBool, deadline: Instant) -> bool {
    let until = (Instant::now() + d).min(deadline);
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(100))).await;
    }
    !stop.load(Ordering::Relaxed) && Instant::now() < deadline
}

fn fill(sql: &str, rows: u64, client: usize) -> String {
    let mut out = sql.replace("{client}", &client.to_string());
    while let Some(i) = out.find("{rand}") {
        out.replace_range(i..i + 6, &fastrand::u64(1..=rows.max(1)).to_string());
    }
    out
}

/// Runs one transaction's steps. Err: the error, and whether the connection is gone.
async fn transaction(
    c: &tokio_postgres::Client,
    steps: &[Step],
    ctx: &Ctx,
    n: usize,
    deadline: Instant,
) -> Result<(), Option<tokio_postgres::Error>> {
    for step in steps {
        match step {
            Step::Sql { sql } => {
                let q = fill(sql, ctx.rows, n);
                match tokio::time::timeout_at(deadline.into(), c.simple_query(&q)).await {
                    Err(_) => return Err(None),
                    Ok(Err(e)) => {
                        // Leave no failed transaction behind for the next one.
                        if !c.is_closed() {
                            let _ = tokio::time::timeout_at(deadline.into(), c.simple_query("ROLLBACK")).await;
                        }
                        return Err(Some(e));
                    }
                    Ok(Ok(_)) => {}
                }
            }
            Step::Sleep { sleep } => {
                if !nap(*sleep, &ctx.stop, deadline).await {
                    return Err(None);
                }
            }
        }
    }
    Ok(())
}

/// One client in one round.
async fn client(ctx: Ctx, n: usize, round_start: Instant, deadline: Instant) {
    let g = &ctx.group;
    let deadline = if g.hold.is_zero() {
        deadline
    } else {
        deadline.min(Instant::now() + g.hold)
    };
    let mut done = 0u64;
    let more = |done: u64| {
        !ctx.stop.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && (g.max_transactions == 0 || done < g.max_transactions)
    };
    while more(done) {
        let t = Instant::now();
        let c = match tokio::time::timeout_at(deadline.into(), ctx.cfg.connect(NoTls)).await {
            Err(_) => return,
            Ok(Err(e)) => {
                ctx.error(&e);
                if !nap(Duration::from_millis(100), &ctx.stop, deadline).await {
                    return;
                }
                continue;
            }
            Ok(Ok((c, conn))) => {
                tokio::spawn(conn);
                ctx.report
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .connected(t.elapsed());
                c
            }
        };
        while more(done) {
            // Open loop: wait for this client's next scheduled arrival; latency counts from it.
            let begun = if g.rate > 0.0 {
                let k = ctx.ticket.fetch_add(1, Ordering::Relaxed);
                let at = round_start + Duration::from_secs_f64(k as f64 / g.rate);
                if at >= deadline || !nap(at.saturating_duration_since(Instant::now()), &ctx.stop, deadline).await {
                    return;
                }
                at
            } else {
                Instant::now()
            };
            let steps = if g.alt_ratio > 0.0 && fastrand::f64() < g.alt_ratio {
                &g.alt_steps
            } else {
                &g.steps
            };
            ctx.live.in_flight.fetch_add(1, Ordering::Relaxed);
            let r = transaction(&c, steps, &ctx, n, deadline).await;
            ctx.live.in_flight.fetch_sub(1, Ordering::Relaxed);
            done += 1;
            match r {
                Ok(()) => {
                    ctx.live.transactions.fetch_add(1, Ordering::Relaxed);
                    ctx.report
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .ok(ctx.start.elapsed(), begun.elapsed());
                }
                Err(None) => {
                    ctx.report.lock().unwrap_or_else(|p| p.into_inner()).unfinished += 1;
                    return;
                }
                Err(Some(e)) => {
                    ctx.error(&e);
                    if c.is_closed() {
                        break;
                    }
                }
            }
            if g.rate == 0.0 && !g.think.is_zero() && !nap(g.think, &ctx.stop, deadline).await {
                return;
            }
        }
    }
}

/// The live progress bar on stderr (hidden when stderr is not a terminal); records the
/// in-flight count once a second.
async fn progress(live: Arc<Live>, total: Duration, start: Instant, quit: Arc<AtomicBool>) -> Vec<(f64, i64)> {
    let bar = indicatif::ProgressBar::new(total.as_secs().max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut in_flight = Vec::new();
    let (mut last_tx, mut last_at) = (0u64, Instant::now());
    while !quit.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = Instant::now();
        if now.duration_since(last_at) >= Duration::from_secs(1) {
            let tx = live.transactions.load(Ordering::Relaxed);
            let rate = (tx - last_tx) as f64 / now.duration_since(last_at).as_secs_f64();
            let f = live.in_flight.load(Ordering::Relaxed);
            in_flight.push((start.elapsed().as_secs_f64(), f));
            bar.set_position(start.elapsed().as_secs());
            bar.set_message(format!(
                "{rate:.0} tx/s, {} errors, {f} in flight",
                live.errors.load(Ordering::Relaxed)
            ));
            (last_tx, last_at) = (tx, now);
        }
    }
    bar.finish_and_clear();
    in_flight
}

async fn setup(cfg: &tokio_postgres::Config, plan: &Plan) -> Result<(), String> {
    if plan.setup.is_empty() {
        return Ok(());
    }
    let (c, conn) = cfg.connect(NoTls).await.map_err(|e| format!("setup: {e}"))?;
    tokio::spawn(conn);
    for s in &plan.setup {
        c.batch_execute(s)
            .await
            .map_err(|e| format!("setup {s:?}: {}", describe(&e)))?;
    }
    Ok(())
}

/// Runs `plan` against its target until done or `stop`; `observe` is a postgres:// URL
/// straight to PostgreSQL to sample during the run.
///
/// # Errors
/// A bad URL, or a failed setup statement.
pub async fn run(plan: &Plan, observe: Option<&str>, stop: Arc<AtomicBool>) -> Result<Outcome, String> {
    plan.check()?;
    let base = tokio_postgres::Config::from_str(&plan.target).map_err(|e| format!("target: {e}"))?;
    // Each group's own target, if it has one (several --target).
    let cfgs = plan
        .groups
        .iter()
        .map(|g| match &g.target {
            Some(t) => tokio_postgres::Config::from_str(t).map_err(|e| format!("target: {e}")),
            None => Ok(base.clone()),
        })
        .collect::<Result<Vec<_>, String>>()?;
    setup(&base, plan).await?;
    let observer = connect_observer(observe).await?;
    let start = Instant::now();
    let before = match &observer {
        Some(c) => measure::sample(c, start).await.map(|(s, _)| s.server_connections),
        None => None,
    };
    let live = Arc::new(Live::default());
    let quit = Arc::new(AtomicBool::new(false));
    let total = plan.duration * plan.rounds + plan.pause * plan.rounds.saturating_sub(1);
    let bar = tokio::spawn(progress(live.clone(), total, start, quit.clone()));
    let sampler = observer.map(|c| tokio::spawn(measure::observe(c, start, Duration::from_millis(500), quit.clone())));
    let reports: Vec<_> = plan
        .groups
        .iter()
        .map(|g| {
            let mut r = GroupReport::new(&g.name, g.clients);
            r.target = g.target.as_deref().map(super::plan::target_label);
            Arc::new(Mutex::new(r))
        })
        .collect();
    for round in 0..plan.rounds {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if round > 0 {
            nap(plan.pause, &stop, Instant::now() + plan.pause).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        run_round(plan, &cfgs, &reports, &live, &stop, start).await;
    }
    quit.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let in_flight = bar.await.unwrap_or_default();
    let (samples, max_connections) = match sampler {
        Some(s) => s.await.unwrap_or_default(),
        None => (Vec::new(), None),
    };
    let groups = reports
        .iter()
        .map(|r| {
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner()).clone();
            r.elapsed = elapsed;
            r
        })
        .collect();
    Ok(Outcome {
        plan: plan.clone(),
        groups,
        samples,
        max_connections,
        before,
        in_flight,
        elapsed,
        stopped: stop.load(Ordering::Relaxed),
    })
}

/// The `--observe` connection straight to PostgreSQL, when one is asked for.
async fn connect_observer(observe: Option<&str>) -> Result<Option<tokio_postgres::Client>, String> {
    let Some(url) = observe else {
        return Ok(None);
    };
    let cfg = tokio_postgres::Config::from_str(url).map_err(|e| format!("--observe: {e}"))?;
    let (c, conn) = cfg.connect(NoTls).await.map_err(|e| format!("--observe: {e}"))?;
    tokio::spawn(conn);
    Ok(Some(c))
}

/// One round: every group's clients (to the group's entry of `cfgs`), started over
/// `plan.ramp`, each until the round's deadline (or `stop`); returns when all have ended.
async fn run_round(
    plan: &Plan,
    cfgs: &[tokio_postgres::Config],
    reports: &[Arc<Mutex<GroupReport>>],
    live: &Arc<Live>,
    stop: &Arc<AtomicBool>,
    start: Instant,
) {
    let round_start = Instant::now();
    let deadline = round_start + plan.duration;
    let mut tasks = Vec::new();
    for ((g, report), cfg) in plan.groups.iter().zip(reports).zip(cfgs) {
        let mut cfg = cfg.clone();
        cfg.application_name(g.application_name.as_deref().unwrap_or(&g.name));
        let ctx = Ctx {
            cfg,
            group: g.clone(),
            report: report.clone(),
            live: live.clone(),
            stop: stop.clone(),
            start,
            rows: plan.rows,
            ticket: Arc::new(AtomicU64::new(0)),
        };
        for i in 0..g.clients {
            let delay = plan.ramp.mul_f64(i as f64 / g.clients.max(1) as f64);
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move {
                if nap(delay, &ctx.stop, deadline).await || delay.is_zero() {
                    client(ctx, i, round_start, deadline).await;
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

//! Query and transaction timeouts of the relay: when the timed states began, the one timer set
//! to the earliest deadline, and what happens when a limit passes (a cancel for
//! query_timeout; the end of the session, with an error naming the limit, for
//! idle_transaction_timeout and transaction_timeout).

use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use super::tracker::Tracker;
use crate::cancel::CancelTarget;
use crate::error::PgError;
use crate::protocol::tags::status;

/// Limits on queries and transactions (zero = off).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Timeouts {
    /// A query running longer is cancelled.
    pub query: Duration,
    /// A transaction left idle longer ends the session.
    pub(crate) idle_transaction: Duration,
    /// A transaction open longer ends the session.
    pub transaction: Duration,
}

impl Timeouts {
    /// The `[pool]` timeouts of `config`.
    pub(crate) fn from_config(config: &crate::config::Config) -> Self {
        Self {
            query: config.pool.query_timeout,
            idle_transaction: config.pool.idle_transaction_timeout,
            transaction: config.pool.transaction_timeout,
        }
    }

    pub(super) fn any(&self) -> bool {
        !(self.query.is_zero() && self.idle_transaction.is_zero() && self.transaction.is_zero())
    }
}

/// When the timed states began.
#[derive(Debug, Default)]
pub(super) struct Clocks {
    /// Requests outstanding since.
    pub(super) query: Option<Instant>,
    /// In a transaction with nothing outstanding since.
    pub(super) idle_in_transaction: Option<Instant>,
    /// In a transaction since.
    pub(super) transaction: Option<Instant>,
    /// A cancel was sent for the current query.
    pub(super) cancelled: bool,
}

impl Clocks {
    pub(super) fn update(&mut self, t: &Tracker, client_sent: bool) {
        let now = Instant::now();
        if t.pending > 0 {
            self.query.get_or_insert(now);
        } else {
            self.query = None;
            self.cancelled = false;
        }
        let in_tx = matches!(t.status, status::IN_TRANSACTION | status::FAILED);
        if in_tx {
            self.transaction.get_or_insert(now);
        } else {
            self.transaction = None;
        }
        if in_tx && t.pending == 0 && !client_sent {
            self.idle_in_transaction.get_or_insert(now);
        } else {
            self.idle_in_transaction = None;
        }
    }

    pub(super) fn deadline(&self, to: &Timeouts) -> Option<Instant> {
        let at = |since: Option<Instant>, limit: Duration| since.filter(|_| !limit.is_zero()).map(|s| s + limit);
        [
            at(self.query, to.query).filter(|_| !self.cancelled),
            at(self.idle_in_transaction, to.idle_transaction),
            at(self.transaction, to.transaction),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// The relay's timeouts while any is configured (none by default: then the relay has no
/// timer at all): the clocks, and one timer set to the earliest deadline.
pub(super) struct Timer<'m> {
    /// The session's limits.
    limits: &'m Timeouts,
    /// Where to send a cancel when a query runs past query_timeout.
    cancel: Option<&'m CancelTarget>,
    /// Who the client is, for the log line of a cancel.
    who: &'m str,
    /// When the timed states began.
    clocks: Clocks,
    /// The deadline the timer is set to, while one is due.
    armed: Option<Instant>,
    /// The timer.
    sleep: Pin<Box<Sleep>>,
}

impl<'m> Timer<'m> {
    /// A timer for `limits`, or none when no limit is set.
    pub(super) fn new(limits: &'m Timeouts, cancel: Option<&'m CancelTarget>, who: &'m str) -> Option<Self> {
        limits.any().then(|| Timer {
            limits,
            cancel,
            who,
            clocks: Clocks::default(),
            armed: None,
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(365 * 86400))),
        })
    }

    /// Brings the clocks up to what the tracker says (`client_sent`: the client sent something
    /// this round) and sets the timer to the earliest deadline when that changed.
    #[inline]
    pub(super) fn rearm(&mut self, t: &Tracker, client_sent: bool) {
        self.clocks.update(t, client_sent);
        let due = self.clocks.deadline(self.limits);
        if due != self.armed {
            self.armed = due;
            if let Some(d) = due {
                self.sleep.as_mut().reset(d.into());
            }
        }
    }

    /// Whether a deadline is set (the relay waits for the timer only then).
    #[inline]
    pub(super) fn armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Waits for the deadline; `timer` is `Some` (the relay asks only while one is armed).
    pub(super) async fn fired(timer: &mut Option<Self>) {
        if let Some(t) = timer {
            t.sleep.as_mut().await;
        }
    }

    /// The deadline passed: acts on the timeouts that have passed (cancels a query past
    /// query_timeout) and returns the error that ends the session for
    /// idle_transaction_timeout or transaction_timeout.
    pub(super) fn expired(&mut self) -> Option<PgError> {
        self.armed = None;
        let now = Instant::now();
        let past =
            |since: Option<Instant>, limit: Duration| !limit.is_zero() && since.is_some_and(|s| now >= s + limit);
        let to = *self.limits;
        let clocks = &mut self.clocks;
        if past(clocks.idle_in_transaction, to.idle_transaction) {
            let hint = "Commit or roll back transactions promptly; the transaction was rolled back.";
            return ended(
                "25P03",
                "idle in transaction",
                "idle_transaction_timeout",
                to.idle_transaction,
                hint,
            );
        }
        if past(clocks.transaction, to.transaction) {
            let hint = "Keep transactions short; the transaction was rolled back.";
            return ended("25P04", "transaction open", "transaction_timeout", to.transaction, hint);
        }
        if !clocks.cancelled && past(clocks.query, to.query) {
            clocks.cancelled = true;
            if let Some(t) = self.cancel.cloned() {
                tracing::info!(client = %self.who, limit = %human(to.query), "query_timeout: cancelling the query");
                tokio::spawn(async move {
                    let _ = crate::server::send_cancel(&t.addr, t.pid, &t.secret).await;
                });
            }
        }
        None
    }
}

/// A duration as the configuration spells it.
fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The error that ends a session whose `what` lasted longer than `setting` (`limit`).
fn ended(code: &str, what: &str, setting: &str, limit: Duration, hint: &str) -> Option<PgError> {
    let message = format!(
        "pgvalve: terminating connection: {what} for longer than {setting}={}",
        human(limit)
    );
    Some(PgError::fatal(code, message).with_hint(hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ending_error_names_the_setting_and_its_value() {
        let e = ended(
            "25P04",
            "transaction open",
            "transaction_timeout",
            Duration::from_secs(90),
            "hint",
        )
        .expect("always an error");
        assert_eq!(e.code, "25P04");
        assert_eq!(
            e.message,
            "pgvalve: terminating connection: transaction open for longer than transaction_timeout=1m 30s"
        );
        assert_eq!(e.hint.as_deref(), Some("hint"));
    }

    #[tokio::test]
    async fn the_timer_follows_the_transaction_and_ends_it_when_past() {
        assert!(
            Timer::new(&Timeouts::default(), None, "c").is_none(),
            "no limit, no timer"
        );
        let limits = Timeouts {
            transaction: Duration::from_millis(10),
            ..Timeouts::default()
        };
        let mut timer = Timer::new(&limits, None, "c").expect("a limit is set");
        let mut t = Tracker::new(status::IDLE, false, None, true);
        timer.rearm(&t, false);
        assert!(!timer.armed(), "outside a transaction");
        t.status = status::IN_TRANSACTION;
        timer.rearm(&t, true);
        assert!(timer.armed());
        std::thread::sleep(Duration::from_millis(15));
        let e = timer.expired().expect("the transaction ran past its limit");
        assert_eq!(e.code, "25P04");
        assert!(!timer.armed());
    }
}

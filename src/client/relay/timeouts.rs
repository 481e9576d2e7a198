//! Query and transaction timeouts of the relay: when the timed states began, and what
//! happens when a limit passes (a cancel for query_timeout; the end of the session, with an
//! error naming the limit, for idle_transaction_timeout and transaction_timeout).

use super::*;

/// Limits on queries and transactions (zero = off).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    /// A query running longer is cancelled.
    pub query: Duration,
    /// A transaction left idle longer ends the session.
    pub idle_transaction: Duration,
    /// A transaction open longer ends the session.
    pub transaction: Duration,
}

impl Timeouts {
    /// The `[pool]` timeouts of `config`.
    pub fn from_config(config: &crate::config::Config) -> Self {
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
        let in_tx = matches!(t.status, b'T' | b'E');
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

/// Acts on the timeouts that have passed: cancels a query past query_timeout, and returns
/// the error that ends the session for idle_transaction_timeout or transaction_timeout.
pub(super) fn expired(clocks: &mut Clocks, mode: &Mode) -> Option<PgError> {
    let now = Instant::now();
    let past = |since: Option<Instant>, limit: Duration| !limit.is_zero() && since.is_some_and(|s| now >= s + limit);
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let to = mode.timeouts;
    let ended = |code: &str, what: &str, setting: &str, limit: Duration, hint: &str| {
        let message = format!(
            "pgvalve: terminating connection: {what} for longer than {setting}={}",
            human(limit)
        );
        Some(PgError::fatal(code, message).with_hint(hint))
    };
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
        if let Some(t) = mode.cancel.clone() {
            tracing::info!(client = %mode.who, limit = %human(to.query), "query_timeout: cancelling the query");
            tokio::spawn(async move {
                let _ = crate::server::send_cancel(&t.addr, t.pid, t.secret).await;
            });
        }
    }
    None
}

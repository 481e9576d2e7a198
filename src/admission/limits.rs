//! Per-identity limits: the `[admission]` defaults, the overrides an `[[identity]]` rule may
//! carry, and the resolved [`Limits`] one identity runs under.
//!
//! Part of admission. The config layer parses and validates these; [`super::Admission`]
//! resolves them for each identity at login and again on reload.

use std::time::Duration;

use serde::Deserialize;

/// What the lock monitor does with a session that holds a dangerous lock past `max_lock_hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockAction {
    /// Log and count only.
    #[default]
    Warn,
    /// Cancel the running statement; a holder idle in its transaction has nothing to cancel
    /// and is ended as with `terminate`.
    Cancel,
    /// End the transaction: the server connection is closed (PostgreSQL rolls back) and the
    /// client gets FATAL 57P01 saying why.
    Terminate,
}

impl std::fmt::Display for LockAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockAction::Warn => "warn",
            LockAction::Cancel => "cancel",
            LockAction::Terminate => "terminate",
        })
    }
}

/// `[admission]`: limits that apply to every identity unless its rule overrides them, and
/// the surge detector's thresholds. A 0 means "no limit" for the caps.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSettings {
    /// Client connections one identity may have at once (0 = no per-identity cap).
    pub max_client_connections: u32,
    /// Server connections one identity may hold at once, across pools (0 = no cap).
    pub max_server_connections: u32,
    /// Server connections kept available for the identity in each pool it uses.
    pub min_server_connections: u32,
    /// Share of server connections when several identities wait (1..=1000).
    pub weight: u32,
    /// Clients of one identity that may wait for a server connection (0 = no bound).
    pub max_queue: u32,
    /// How long a client waits for a server connection (default: pool.query_wait_timeout).
    #[serde(with = "humantime_serde::option")]
    pub queue_timeout: Option<Duration>,
    /// Tell a waiting client it is queued (a NOTICE) after this long ("0s" = never).
    #[serde(with = "humantime_serde")]
    pub queue_notice_after: Duration,
    /// New logins per second for one identity (0 = no limit).
    pub max_connect_rate: f64,
    /// Logins allowed at once above the rate (default: the rate, at least 1).
    pub connect_burst: u32,
    /// A surge when an identity's logins in one second reach this (and the multiple below).
    pub surge_min_rate: f64,
    /// ... and this multiple of its own baseline login rate (0 = ignore the baseline).
    pub surge_multiplier: f64,
    /// A surge when an identity's client connections grow by this many within 10 s (0 = off).
    pub surge_delta: u32,
    /// A surge episode ends after this long without a surge condition.
    #[serde(with = "humantime_serde")]
    pub surge_cooldown: Duration,
    /// During a surge, limit the identity's logins to this fraction of its max_connect_rate
    /// (or of surge_min_rate when it has none); 0 = only detect.
    pub surge_damping: f64,
    /// Longest an identity's session may hold a dangerous lock (or block others) before
    /// `lock_action` ("0s" = no limit).
    #[serde(with = "humantime_serde")]
    pub max_lock_hold: Duration,
    /// What happens past `max_lock_hold`.
    pub lock_action: LockAction,
    /// Sessions of one identity that may hold dangerous locks at once (as the lock monitor
    /// last saw); while reached, its new transactions wait in the queue (0 = no limit).
    pub max_lock_holders: u32,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            max_client_connections: 0,
            max_server_connections: 0,
            min_server_connections: 0,
            weight: 1,
            max_queue: 0,
            queue_timeout: None,
            queue_notice_after: Duration::from_secs(5),
            max_connect_rate: 0.0,
            connect_burst: 0,
            surge_min_rate: 20.0,
            surge_multiplier: 5.0,
            surge_delta: 50,
            surge_cooldown: Duration::from_secs(10),
            surge_damping: 0.0,
            max_lock_hold: Duration::ZERO,
            lock_action: LockAction::Warn,
            max_lock_holders: 0,
        }
    }
}

/// Limit overrides an `[[identity]]` rule may carry (same meaning as in `[admission]`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    /// See [`AdmissionSettings::max_client_connections`].
    pub max_client_connections: Option<u32>,
    /// See [`AdmissionSettings::max_server_connections`].
    pub max_server_connections: Option<u32>,
    /// See [`AdmissionSettings::min_server_connections`].
    pub min_server_connections: Option<u32>,
    /// See [`AdmissionSettings::weight`].
    pub weight: Option<u32>,
    /// See [`AdmissionSettings::max_queue`].
    pub max_queue: Option<u32>,
    /// See [`AdmissionSettings::queue_timeout`].
    #[serde(default, with = "humantime_serde::option")]
    pub queue_timeout: Option<Duration>,
    /// See [`AdmissionSettings::max_connect_rate`].
    pub max_connect_rate: Option<f64>,
    /// See [`AdmissionSettings::connect_burst`].
    pub connect_burst: Option<u32>,
    /// See [`AdmissionSettings::surge_damping`].
    pub surge_damping: Option<f64>,
    /// See [`AdmissionSettings::max_lock_hold`].
    pub max_lock_hold: Option<Duration>,
    /// See [`AdmissionSettings::lock_action`].
    pub lock_action: Option<LockAction>,
    /// See [`AdmissionSettings::max_lock_holders`].
    pub max_lock_holders: Option<u32>,
}

/// The limits one identity runs under.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Client connections at once (0 = no cap).
    pub max_clients: u32,
    /// Server connections at once, across pools (0 = no cap).
    pub max_servers: u32,
    /// Server connections reserved in each pool it uses.
    pub min_servers: u32,
    /// Scheduling weight (≥ 1).
    pub weight: u32,
    /// Waiting clients (0 = no bound).
    pub max_queue: u32,
    /// Longest wait for a server connection.
    pub queue_timeout: Duration,
    /// The setting it came from: "queue_timeout", or "query_wait_timeout" when none is set.
    pub queue_timeout_key: &'static str,
    /// NOTICE to a client queued this long (zero = never).
    pub queue_notice_after: Duration,
    /// Logins per second (0 = no limit).
    pub connect_rate: f64,
    /// Token bucket size.
    pub connect_burst: u32,
    /// Fraction of the connect rate allowed during a surge (0 = no damping).
    pub surge_damping: f64,
    /// Longest hold of a dangerous lock (zero = no limit).
    pub max_lock_hold: Duration,
    /// What happens past it.
    pub lock_action: LockAction,
    /// Sessions holding dangerous locks at once (0 = no limit).
    pub max_lock_holders: u32,
}

impl Limits {
    /// `defaults` with `o` applied; `query_wait_timeout` when no queue_timeout is set.
    pub fn resolve(defaults: &AdmissionSettings, o: &LimitOverrides, query_wait_timeout: Duration) -> Limits {
        let rate = o.max_connect_rate.unwrap_or(defaults.max_connect_rate);
        let burst = o.connect_burst.unwrap_or(defaults.connect_burst);
        Limits {
            max_clients: o.max_client_connections.unwrap_or(defaults.max_client_connections),
            max_servers: o.max_server_connections.unwrap_or(defaults.max_server_connections),
            min_servers: o.min_server_connections.unwrap_or(defaults.min_server_connections),
            weight: o.weight.unwrap_or(defaults.weight).max(1),
            max_queue: o.max_queue.unwrap_or(defaults.max_queue),
            queue_timeout: o.queue_timeout.or(defaults.queue_timeout).unwrap_or(query_wait_timeout),
            queue_timeout_key: if o.queue_timeout.or(defaults.queue_timeout).is_some() {
                "queue_timeout"
            } else {
                "query_wait_timeout"
            },
            queue_notice_after: defaults.queue_notice_after,
            connect_rate: rate,
            connect_burst: if burst == 0 { (rate.ceil() as u32).max(1) } else { burst },
            surge_damping: o.surge_damping.unwrap_or(defaults.surge_damping),
            max_lock_hold: o.max_lock_hold.unwrap_or(defaults.max_lock_hold),
            lock_action: o.lock_action.unwrap_or(defaults.lock_action),
            max_lock_holders: o.max_lock_holders.unwrap_or(defaults.max_lock_holders),
        }
    }
}

fn check(field: &str, ok: bool, why: &str) -> Result<(), (String, String)> {
    if ok {
        Ok(())
    } else {
        Err((field.to_string(), why.to_string()))
    }
}

/// Checks the values a rule or `[admission]` gives (field name, reason on error).
///
/// # Errors
/// The first field that cannot work.
pub fn validate(o: &LimitOverrides) -> Result<(), (String, String)> {
    if let Some(w) = o.weight {
        check("weight", (1..=1000).contains(&w), "must be between 1 and 1000")?;
    }
    if let (Some(min), Some(max)) = (o.min_server_connections, o.max_server_connections) {
        check(
            "min_server_connections",
            max == 0 || min <= max,
            "must not exceed max_server_connections",
        )?;
    }
    if let Some(r) = o.max_connect_rate {
        check(
            "max_connect_rate",
            r.is_finite() && r >= 0.0,
            "must be a number of logins per second, 0 or more",
        )?;
    }
    if let Some(d) = o.surge_damping {
        check(
            "surge_damping",
            (0.0..=1.0).contains(&d),
            "must be a fraction between 0 and 1",
        )?;
    }
    if let Some(t) = o.queue_timeout {
        check("queue_timeout", !t.is_zero(), "must be more than 0s")?;
    }
    Ok(())
}

impl AdmissionSettings {
    /// The defaults as overrides (to validate them with the same rules).
    pub fn as_overrides(&self) -> LimitOverrides {
        LimitOverrides {
            max_client_connections: Some(self.max_client_connections),
            max_server_connections: Some(self.max_server_connections),
            min_server_connections: Some(self.min_server_connections),
            weight: Some(self.weight),
            max_queue: Some(self.max_queue),
            queue_timeout: self.queue_timeout,
            max_connect_rate: Some(self.max_connect_rate),
            connect_burst: Some(self.connect_burst),
            surge_damping: Some(self.surge_damping),
            max_lock_hold: Some(self.max_lock_hold),
            lock_action: Some(self.lock_action),
            max_lock_holders: Some(self.max_lock_holders),
        }
    }

    /// Checks the surge thresholds and the defaults.
    ///
    /// # Errors
    /// The first field that cannot work.
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate(&self.as_overrides())?;
        check(
            "surge_min_rate",
            self.surge_min_rate.is_finite() && self.surge_min_rate >= 1.0,
            "must be at least 1 login per second",
        )?;
        check(
            "surge_multiplier",
            self.surge_multiplier.is_finite() && self.surge_multiplier >= 0.0,
            "must be 0 (off) or more",
        )?;
        check(
            "surge_cooldown",
            self.surge_cooldown >= Duration::from_secs(1),
            "must be at least 1s",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_overrides_defaults_and_burst_follows_rate() {
        let d = AdmissionSettings {
            max_server_connections: 10,
            ..Default::default()
        };
        let o = LimitOverrides {
            max_connect_rate: Some(2.5),
            weight: Some(3),
            ..Default::default()
        };
        let l = Limits::resolve(&d, &o, Duration::from_secs(7));
        assert_eq!((l.max_servers, l.weight, l.connect_burst), (10, 3, 3));
        assert_eq!(l.queue_timeout, Duration::from_secs(7));
        assert!(validate(&LimitOverrides {
            weight: Some(0),
            ..Default::default()
        })
        .is_err());
        assert!(validate(&LimitOverrides {
            min_server_connections: Some(5),
            max_server_connections: Some(2),
            ..Default::default()
        })
        .is_err());
    }
}

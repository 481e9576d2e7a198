//! Per-identity limits: the `[admission]` defaults, the overrides an `[[identity]]` rule may
//! carry, and the resolved [`Limits`] one identity runs under.
//!
//! Part of admission. The config layer parses and validates these; [`super::Admission`]
//! resolves them for each identity at login and again on reload.

use std::time::Duration;

pub use crate::config::{AdmissionSettings, Headroom, LimitOverrides, LockAction};

/// The limits one identity runs under.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Client connections at once (0 = no cap).
    pub(crate) max_clients: u32,
    /// Server connections at once, across pools (0 = no cap).
    pub(crate) max_servers: u32,
    /// Server connections at once across every instance of the cluster (0 = no such cap).
    pub(crate) cluster_max_servers: u32,
    /// Server connections reserved in each pool it uses.
    pub(crate) min_servers: u32,
    /// Scheduling weight (≥ 1).
    pub(crate) weight: u32,
    /// Free server connections of a pool it leaves to others while it holds long beyond its
    /// share.
    pub headroom: Headroom,
    /// Waiting clients (0 = no bound).
    pub max_queue: u32,
    /// Longest wait for a server connection.
    pub queue_timeout: Duration,
    /// The setting it came from: "queue_timeout", or "query_wait_timeout" when none is set.
    pub(crate) queue_timeout_key: &'static str,
    /// NOTICE to a client queued this long (zero = never).
    pub queue_notice_after: Duration,
    /// Logins per second (0 = no limit).
    pub(crate) connect_rate: f64,
    /// Token bucket size.
    pub connect_burst: u32,
    /// Fraction of the connect rate allowed during a surge (0 = no damping).
    pub(crate) surge_damping: f64,
    /// Longest hold of a dangerous lock (zero = no limit).
    pub max_lock_hold: Duration,
    /// What happens past it.
    pub lock_action: LockAction,
    /// Sessions holding dangerous locks at once (0 = no limit).
    pub max_lock_holders: u32,
}

impl Limits {
    /// `defaults` with `o` applied; `query_wait_timeout` when no queue_timeout is set.
    pub(crate) fn resolve(defaults: &AdmissionSettings, o: &LimitOverrides, query_wait_timeout: Duration) -> Limits {
        let rate = o.max_connect_rate.unwrap_or(defaults.max_connect_rate);
        let burst = o.connect_burst.unwrap_or(defaults.connect_burst);
        Limits {
            max_clients: o.max_client_connections.unwrap_or(defaults.max_client_connections),
            max_servers: o.max_server_connections.unwrap_or(defaults.max_server_connections),
            cluster_max_servers: o.cluster_max_server_connections.unwrap_or(0),
            min_servers: o.min_server_connections.unwrap_or(defaults.min_server_connections),
            weight: o.weight.unwrap_or(defaults.weight).max(1),
            headroom: o.headroom.unwrap_or(defaults.headroom),
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
        assert_eq!(l.headroom, Headroom::Percent(10), "the default");
        let l = Limits::resolve(
            &d,
            &LimitOverrides {
                headroom: Some(Headroom::Connections(0)),
                ..Default::default()
            },
            Duration::from_secs(7),
        );
        assert_eq!(l.headroom.of(40), 0, "a rule turns it off");
        assert_eq!(
            [1, 4, 5, 20, 40, 100].map(|n| Headroom::Percent(10).of(n)),
            [0, 0, 1, 2, 4, 10],
            "10% rounded to the nearest connection"
        );
        assert!(crate::config::validate_limits(&LimitOverrides {
            headroom: Some(Headroom::Percent(60)),
            ..Default::default()
        })
        .is_err());
        assert_eq!(l.queue_timeout, Duration::from_secs(7));
        assert!(crate::config::validate_limits(&LimitOverrides {
            weight: Some(0),
            ..Default::default()
        })
        .is_err());
        assert!(crate::config::validate_limits(&LimitOverrides {
            min_server_connections: Some(5),
            max_server_connections: Some(2),
            ..Default::default()
        })
        .is_err());
    }
}

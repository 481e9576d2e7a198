//! The `[cluster]` settings: one budget of server connections shared by every pgvalve
//! instance of the same name in front of the same PostgreSQL server.
//!
//! Part of the configuration (owned here, typed and validated); the `cluster` module runs the
//! coordination these settings describe (docs/cluster.md).

use std::time::Duration;

use serde::Deserialize;

/// Largest `max_server_connections` of a cluster (slot numbers must fit the lock keys).
pub const MAX_CLUSTER_BUDGET: u32 = 100_000;

/// `[cluster]`: absent, every cap holds inside this process only (as without clustering).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Instances with the same name in front of the same PostgreSQL server share a budget.
    pub name: String,
    /// Server connections of all instances together: every pool, lock monitor, auth_query
    /// look-up and each instance's coordination connection.
    pub max_server_connections: u32,
    /// The database (a `[databases]` name clients use) the coordination connection logs in
    /// to; default: the first configured one ("postgres" when only `*` is).
    #[serde(default)]
    pub database: Option<String>,
    /// The user (from `[users]`) it logs in as; default: the first user.
    #[serde(default)]
    pub user: Option<String>,
    /// How often each instance looks at the cluster and moves slots (the time demand takes
    /// to be followed is about two of these).
    #[serde(default = "default_rebalance", with = "humantime_serde")]
    pub rebalance_interval: Duration,
    /// After an instance is seen gone, how long the others wait before taking free slots
    /// (so connections that instance was still opening are gone; docs/cluster.md).
    #[serde(default = "default_takeover", with = "humantime_serde")]
    pub takeover_delay: Duration,
    /// `host:port` where the other instances reach this one's listener, to forward the
    /// CancelRequests of its clients that land on them; default: the listener's address
    /// unless it is a wildcard (docs/cluster.md, "Cancel requests").
    #[serde(default)]
    pub advertise: Option<String>,
}

fn default_rebalance() -> Duration {
    Duration::from_millis(200)
}

fn default_takeover() -> Duration {
    Duration::from_millis(500)
}

impl ClusterSettings {
    /// Settings for `name` with `max` slots and every other field at its default.
    pub fn new(name: &str, max: u32) -> Self {
        ClusterSettings {
            name: name.to_string(),
            max_server_connections: max,
            database: None,
            user: None,
            rebalance_interval: default_rebalance(),
            takeover_delay: default_takeover(),
            advertise: None,
        }
    }

    /// The field and reason of the first value that cannot work.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if self.name.trim().is_empty() {
            return Err(("name", "must name the cluster".into()));
        }
        if !(2..=MAX_CLUSTER_BUDGET).contains(&self.max_server_connections) {
            return Err((
                "max_server_connections",
                format!("must be 2 to {MAX_CLUSTER_BUDGET} (each instance's coordination connection takes one slot)"),
            ));
        }
        if self.rebalance_interval < Duration::from_millis(10) || self.rebalance_interval > Duration::from_secs(60) {
            return Err(("rebalance_interval", "must be 10ms to 60s".into()));
        }
        if self.takeover_delay > Duration::from_secs(600) || self.takeover_delay <= self.rebalance_interval {
            return Err((
                "takeover_delay",
                "must be longer than rebalance_interval (every instance must see a newcomer before it leases) and at most 600s".into(),
            ));
        }
        if let Some(a) = &self.advertise {
            check_advertise(a).map_err(|r| ("advertise", r))?;
        }
        Ok(())
    }

    /// The advisory lock class of this cluster: a stable hash of its name, positive and
    /// non-zero (PostgreSQL shows it in pg_locks.classid).
    pub fn lock_class(&self) -> i32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.name.as_bytes() {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        i32::try_from(h & 0x7fff_ffff).unwrap_or(1).max(1)
    }
}

/// Longest `advertise` value (a host name is resolved by the instance itself; the address is
/// published in the coordination connection's application_name).
const MAX_ADVERTISE: usize = 255;

/// `host:port` with a port and no wildcard host, short enough to be published.
fn check_advertise(a: &str) -> Result<(), String> {
    let (host, port) = a.rsplit_once(':').ok_or("must be host:port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("must be host:port with a port of 1 to 65535".into());
    }
    if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return Err("must be an address the other instances can reach, not a wildcard".into());
    }
    if a.len() > MAX_ADVERTISE || a.contains(|c: char| c.is_whitespace() || c == '\'' || !c.is_ascii()) {
        return Err(format!(
            "must be at most {MAX_ADVERTISE} ASCII characters without spaces or quotes "
        ));
    }
    Ok(())
}

//! The `[admission]` and `[[identity]]` settings: the limits that apply to every identity,
//! the overrides a rule may carry, and the rules themselves, parsed and validated.
//!
//! Part of config, which owns every settings type it parses; admission resolves these into
//! the limits each identity runs under (`admission::Limits`) and matches the rules
//! against clients.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Highest cluster-wide cap of one identity (each of its server connections is a grant, an
/// advisory lock numbered below this; docs/cluster.md).
pub const MAX_CLUSTER_GRANTS: u32 = 255;

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

/// How many free server connections of a pool an identity holding more than its share must
/// leave for the others (see [`AdmissionSettings::headroom`]): a number of connections, or a
/// percentage of the pool's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headroom {
    /// This many server connections (0 = off).
    Connections(u32),
    /// This percentage of the pool's size (0..=50), rounded to the nearest connection.
    Percent(u32),
}

impl Headroom {
    /// The headroom in a pool of `pool_size` connections.
    pub fn of(self, pool_size: u32) -> u32 {
        match self {
            Headroom::Connections(n) => n,
            Headroom::Percent(p) => ((u64::from(pool_size) * u64::from(p) + 50) / 100) as u32,
        }
    }
}

impl std::fmt::Display for Headroom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Headroom::Connections(n) => write!(f, "{n}"),
            Headroom::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Headroom {
    type Err = String;

    /// "4" (connections) or "10%" (of the pool's size).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!("invalid headroom {s:?}: expected a number of connections such as 4, or a percentage of the pool such as \"10%\"")
        };
        match t.strip_suffix('%') {
            Some(p) => p.trim().parse().map(Headroom::Percent).map_err(|_| bad()),
            None => t.parse().map(Headroom::Connections).map_err(|_| bad()),
        }
    }
}

impl<'de> Deserialize<'de> for Headroom {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Headroom::Connections(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
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
    /// Free server connections of a pool kept for identities holding less than their share:
    /// an identity that holds more than its share of the pool (for whole sessions: session
    /// mode, or pinned sessions) may not take the last ones. 0 = off.
    pub headroom: Headroom,
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
    /// PostgreSQL settings applied on every client's server connections (a rule's
    /// `server_settings` win per setting; the client's own settings win over both).
    pub server_settings: super::ServerSettings,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        Self {
            max_client_connections: 0,
            max_server_connections: 0,
            min_server_connections: 0,
            weight: 1,
            headroom: Headroom::Percent(10),
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
            server_settings: super::ServerSettings::default(),
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
    /// See [`AdmissionSettings::headroom`].
    pub headroom: Option<Headroom>,
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
    /// Server connections the identity may hold across every instance of the `[cluster]`
    /// (rules only; docs/cluster.md, "Per-identity caps").
    pub cluster_max_server_connections: Option<u32>,
}

impl AdmissionSettings {
    /// The defaults as overrides (to validate them with the same rules).
    pub(crate) fn as_overrides(&self) -> LimitOverrides {
        LimitOverrides {
            max_client_connections: Some(self.max_client_connections),
            max_server_connections: Some(self.max_server_connections),
            min_server_connections: Some(self.min_server_connections),
            weight: Some(self.weight),
            headroom: Some(self.headroom),
            max_queue: Some(self.max_queue),
            queue_timeout: self.queue_timeout,
            max_connect_rate: Some(self.max_connect_rate),
            connect_burst: Some(self.connect_burst),
            surge_damping: Some(self.surge_damping),
            max_lock_hold: Some(self.max_lock_hold),
            lock_action: Some(self.lock_action),
            max_lock_holders: Some(self.max_lock_holders),
            cluster_max_server_connections: None,
        }
    }

    /// Checks the surge thresholds and the defaults.
    ///
    /// # Errors
    /// The first field that cannot work.
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_limits(&self.as_overrides())?;
        self.server_settings.validate()?;
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
pub fn validate_limits(o: &LimitOverrides) -> Result<(), (String, String)> {
    if let Some(w) = o.weight {
        check("weight", (1..=1000).contains(&w), "must be between 1 and 1000")?;
    }
    if let Some(Headroom::Percent(p)) = o.headroom {
        check(
            "headroom",
            p <= 50,
            "must be at most 50% of the pool (or a number of connections)",
        )?;
    }
    if let (Some(min), Some(max)) = (o.min_server_connections, o.max_server_connections) {
        check(
            "min_server_connections",
            max == 0 || min <= max,
            "must not exceed max_server_connections",
        )?;
    }
    if let Some(n) = o.cluster_max_server_connections {
        check(
            "cluster_max_server_connections",
            (1..=MAX_CLUSTER_GRANTS).contains(&n),
            &format!("must be 1 to {MAX_CLUSTER_GRANTS}"),
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

/// One `[[identity]]` rule as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRule {
    /// The identity's name; may use {application_name}, {user}, {database}, {source}.
    pub name: String,
    /// Glob on application_name (`*` any run, `?` one character).
    pub application_name: Option<String>,
    /// Source address range, e.g. "10.1.0.0/16" or "::1/128".
    pub source: Option<String>,
    /// User name, exactly.
    pub user: Option<String>,
    /// Database name, exactly.
    pub database: Option<String>,
    /// Limit overrides for this rule's identities (see `[admission]`).
    pub max_client_connections: Option<u32>,
    /// See `[admission]`.
    pub max_server_connections: Option<u32>,
    /// See `[admission]`.
    pub min_server_connections: Option<u32>,
    /// See `[admission]`.
    pub weight: Option<u32>,
    /// See `[admission]`.
    pub headroom: Option<Headroom>,
    /// See `[admission]`.
    pub max_queue: Option<u32>,
    /// See `[admission]`.
    #[serde(default, with = "humantime_serde::option")]
    pub queue_timeout: Option<std::time::Duration>,
    /// See `[admission]`.
    pub max_connect_rate: Option<f64>,
    /// See `[admission]`.
    pub connect_burst: Option<u32>,
    /// See `[admission]`.
    pub surge_damping: Option<f64>,
    /// See `[admission]`.
    #[serde(default, with = "humantime_serde::option")]
    pub max_lock_hold: Option<std::time::Duration>,
    /// See `[admission]`.
    pub lock_action: Option<LockAction>,
    /// See `[admission]`.
    pub max_lock_holders: Option<u32>,
    /// Server connections this rule's identities may hold across every instance of the
    /// `[cluster]` together (each identity its own; needs `[cluster]`).
    pub cluster_max_server_connections: Option<u32>,
    /// PostgreSQL settings for this rule's identities, over `[admission] server_settings`.
    pub server_settings: Option<super::ServerSettings>,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub(crate) name: String,
    pub(crate) application_name: Option<String>,
    pub(crate) source: Option<(IpAddr, u8)>,
    pub(crate) user: Option<String>,
    pub(crate) database: Option<String>,
    /// The limits this rule sets for its identities.
    pub limits: LimitOverrides,
    /// The PostgreSQL settings this rule sets for its identities' server connections.
    pub server_settings: Option<super::ServerSettings>,
}

impl Rule {
    /// Validates a rule from the file.
    ///
    /// # Errors
    /// What is wrong with which field.
    pub fn new(r: IdentityRule) -> Result<Rule, (String, String)> {
        if r.name.trim().is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        let source = r
            .source
            .as_deref()
            .map(parse_cidr)
            .transpose()
            .map_err(|e| ("source".to_string(), e))?;
        let limits = LimitOverrides {
            max_client_connections: r.max_client_connections,
            max_server_connections: r.max_server_connections,
            min_server_connections: r.min_server_connections,
            weight: r.weight,
            headroom: r.headroom,
            max_queue: r.max_queue,
            queue_timeout: r.queue_timeout,
            max_connect_rate: r.max_connect_rate,
            connect_burst: r.connect_burst,
            surge_damping: r.surge_damping,
            max_lock_hold: r.max_lock_hold,
            lock_action: r.lock_action,
            max_lock_holders: r.max_lock_holders,
            cluster_max_server_connections: r.cluster_max_server_connections,
        };
        validate_limits(&limits)?;
        if let Some(s) = &r.server_settings {
            s.validate()?;
        }
        Ok(Rule {
            server_settings: r.server_settings,
            name: r.name,
            application_name: r.application_name,
            source,
            user: r.user,
            database: r.database,
            limits,
        })
    }

    /// The rule's name as written (a template); rules are told apart by it on reload.
    pub(crate) fn template(&self) -> &str {
        &self.name
    }
}

/// Whether `ip` is in the range `(net, bits)` (an IPv4-mapped IPv6 address counts as its
/// IPv4 address).
pub fn cidr_contains((net, bits): (IpAddr, u8), ip: IpAddr) -> bool {
    let (a, b, width): (u128, u128, u32) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a).into(), u32::from(b).into(), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.into(), b.into(), 128),
        (IpAddr::V6(a), IpAddr::V4(b)) => match a.to_ipv4_mapped() {
            Some(a) => (u32::from(a).into(), u32::from(b).into(), 32),
            None => return false,
        },
        _ => return false,
    };
    let shift = width - u32::from(bits);
    bits == 0 || (a >> shift) == (b >> shift)
}

/// Parses "addr/bits" (or a bare address, meaning that one host).
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, bits) = s.split_once('/').unwrap_or((s, ""));
    let addr: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address range like 10.0.0.0/8"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = if bits.is_empty() {
        max
    } else {
        bits.parse().map_err(|_| format!("bad prefix length in {s:?}"))?
    };
    if bits > max {
        return Err(format!("prefix length {bits} is too long for {addr}"));
    }
    Ok((addr, bits))
}

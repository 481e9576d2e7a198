//! `[pool] max_server_connections` as written (a number, `"auto"` or a percentage) and as
//! sized: the number in force and where it came from.
//!
//! Part of config, which owns every settings type. Config only parses and checks the value;
//! reading PostgreSQL's `max_connections` is the server side's (`server::sizing`), done at
//! start and at each reload before the value is used.

use serde::{Deserialize, Deserializer};

/// `[pool] max_server_connections`: server connections across all pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCap {
    /// This many (0 = no cap across pools).
    Connections(u32),
    /// What PostgreSQL allows pgvalve: `max_connections - superuser_reserved_connections -
    /// reserved_connections`, read at start and at each reload.
    Auto,
    /// This percentage (1..=100) of what `Auto` would give, rounded down, at least 1.
    Percent(u32),
}

impl Default for ServerCap {
    fn default() -> Self {
        ServerCap::Connections(100)
    }
}

impl From<u32> for ServerCap {
    fn from(n: u32) -> Self {
        ServerCap::Connections(n)
    }
}

impl ServerCap {
    /// Whether the value comes from PostgreSQL (`"auto"` or a percentage).
    pub fn from_postgres(self) -> bool {
        !matches!(self, ServerCap::Connections(_))
    }

    /// The cap under `limits`: a number stays as written; `"auto"` and a percentage are what
    /// PostgreSQL allows (or that share of it), at least 1 (0 would mean "no cap").
    pub fn of(self, limits: &PgLimits) -> u32 {
        let available = limits.available();
        match self {
            ServerCap::Connections(n) => n,
            ServerCap::Auto => available.max(1),
            ServerCap::Percent(p) => ((u64::from(available) * u64::from(p) / 100) as u32).max(1),
        }
    }

    /// The cap in force under `limits`, and a sentence saying how it was reached.
    pub fn sized(self, limits: &PgLimits) -> ServerBudget {
        let max = self.of(limits);
        let read = limits.describe();
        let source = match self {
            ServerCap::Connections(_) => "config".to_string(),
            ServerCap::Auto => format!("auto: {read}"),
            ServerCap::Percent(p) => format!("{p}% of {read}, rounded down"),
        };
        ServerBudget { max, source }
    }
}

impl std::fmt::Display for ServerCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerCap::Connections(n) => write!(f, "{n}"),
            ServerCap::Auto => f.write_str("auto"),
            ServerCap::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for ServerCap {
    type Err = String;

    /// "90" (connections), "auto", or "80%" (of what PostgreSQL allows, 1..=100).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!(
                "max_server_connections: {s:?} is not a number of connections (such as 90, 0 = no cap), \"auto\" (what PostgreSQL's max_connections allows) or a percentage of that from \"1%\" to \"100%\""
            )
        };
        if t.eq_ignore_ascii_case("auto") {
            return Ok(ServerCap::Auto);
        }
        match t.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(ServerCap::Percent(p)),
                _ => Err(bad()),
            },
            None => t.parse().map(ServerCap::Connections).map_err(|_| bad()),
        }
    }
}

impl<'de> Deserialize<'de> for ServerCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::N(n)) => u32::try_from(n).map(ServerCap::Connections).map_err(|_| {
                serde::de::Error::custom(format!(
                    "max_server_connections: {n} is not a number of connections from 0 to {}",
                    u32::MAX
                ))
            }),
            Ok(Raw::S(s)) => s.parse().map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "max_server_connections: expected a number of connections, \"auto\" or a percentage such as \"80%\"",
            )),
        }
    }
}

/// What PostgreSQL said about its connection limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgLimits {
    /// The server read ("host:port").
    pub server: String,
    /// `max_connections`.
    pub max_connections: u32,
    /// `superuser_reserved_connections`.
    pub superuser_reserved_connections: u32,
    /// `reserved_connections` (PostgreSQL 16 and later; 0 before).
    pub reserved_connections: u32,
}

impl PgLimits {
    /// Connections PostgreSQL gives roles without superuser or `pg_use_reserved_connections`.
    pub fn available(&self) -> u32 {
        self.max_connections
            .saturating_sub(self.superuser_reserved_connections)
            .saturating_sub(self.reserved_connections)
    }

    /// "max_connections 20 - superuser_reserved_connections 3 - reserved_connections 0 = 17
    /// (127.0.0.1:5432)".
    pub fn describe(&self) -> String {
        format!(
            "max_connections {} - superuser_reserved_connections {} - reserved_connections {} = {} ({})",
            self.max_connections,
            self.superuser_reserved_connections,
            self.reserved_connections,
            self.available(),
            self.server
        )
    }
}

/// `max_server_connections` in force, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBudget {
    /// Server connections across all pools (0 = no cap).
    pub max: u32,
    /// "config", or how it was sized from PostgreSQL (SHOW CONFIG shows it).
    pub source: String,
}

impl ServerBudget {
    /// A number written in the configuration.
    pub fn written(max: u32) -> Self {
        ServerBudget {
            max,
            source: "config".into(),
        }
    }
}

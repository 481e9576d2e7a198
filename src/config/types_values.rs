//! The typed values settings are written in: a secret never printed, a size in bytes or
//! "64MiB", a list of address ranges; each parsed when the file is read.
//!
//! Part of `config::types`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// A secret string: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A size in bytes, written as an integer or as "64MiB", "512kB", "1GB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n as usize)),
            Raw::S(s) => parse_size(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "123", "64kB", "64KiB", "10MB", "1GiB" (kB/MB/GB are 1024-based, as in PostgreSQL).
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 65536 or \"64MiB\""))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "KiB" => 1 << 10,
        "MB" | "MiB" => 1 << 20,
        "GB" | "GiB" => 1 << 30,
        u => return Err(format!("invalid size unit {u:?} in {s:?}: use B, kB, MB or GB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Address ranges, written as a list of "10.0.0.0/8" (or bare addresses, one host each) and
/// parsed when the file is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<(IpAddr, u8)>);

impl Cidrs {
    /// Whether `ip` is in one of the ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|&r| crate::config::cidr_contains(r, ip))
    }

    /// Whether there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for Cidrs {
    type Err = String;

    /// Parses a comma-separated list (the command line's form); "" is the empty list.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts = s.split(',').map(str::trim).filter(|p| !p.is_empty());
        parts
            .map(crate::config::parse_cidr)
            .collect::<Result<_, _>>()
            .map(Cidrs)
    }
}

impl fmt::Display for Cidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (ip, bits)) in self.0.iter().enumerate() {
            write!(f, "{}{ip}/{bits}", if i > 0 { "," } else { "" })?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Cidrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        let parsed = raw
            .iter()
            .map(|s| crate::config::parse_cidr(s))
            .collect::<Result<_, _>>();
        parsed.map(Cidrs).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64kB"), Ok(64 << 10));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MB").is_err());
    }
}

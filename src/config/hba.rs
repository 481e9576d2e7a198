//! `hba_file` (pg_hba.conf's format) and `ident_file` (pg_ident.conf's): which way each
//! client must authenticate, by connection type, database, user and address.
//!
//! Part of config: both files are read when the configuration is validated (so a reload reads
//! them again and a broken file changes nothing); the client session asks [`Hba::find`] for
//! the first matching line. Lines: `host | hostssl | hostnossl  DATABASE  USER  ADDRESS
//! METHOD [map=NAME]` (ADDRESS a CIDR, an address with a mask column, or `all`); `local`
//! lines are accepted and never match (pgvalve listens on TCP only). DATABASE and USER are
//! comma-separated names or `all` (DATABASE also `sameuser`); METHOD is `scram-sha-256`,
//! `md5`, `cert`, `trust` or `reject`. What pgvalve cannot honour (`+group`, `@file`,
//! `samehost`, regular expressions, other methods) is refused with its line number.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use super::parse_cidr;

/// How a matching client must authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HbaMethod {
    /// SCRAM-SHA-256 against the user's verifier.
    ScramSha256,
    /// MD5 against the user's md5 verifier (SCRAM when the user has only a SCRAM verifier,
    /// as in PostgreSQL).
    Md5,
    /// A TLS client certificate signed by `client_tls_ca_file`, its CN the user (or mapped to
    /// it by the `ident_file` map named).
    Cert {
        /// `map=NAME`.
        map: Option<String>,
    },
    /// No password.
    Trust,
    /// Refused.
    Reject,
}

/// The connection types of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnType {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
}

/// One line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaLine {
    /// Line number in the file (1-based).
    pub line: usize,
    conn: ConnType,
    /// None: `all`.
    databases: Option<Vec<String>>,
    /// None: `all`.
    users: Option<Vec<String>>,
    /// None: `all`.
    address: Option<(IpAddr, u8)>,
    /// What the client must do.
    pub method: HbaMethod,
}

/// The parsed files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hba {
    lines: Vec<HbaLine>,
    /// `ident_file`: map name -> (certificate CN, user) pairs.
    maps: BTreeMap<String, Vec<(String, String)>>,
}

impl Hba {
    /// Reads `hba` (and `ident`, when given).
    ///
    /// # Errors
    /// What is wrong, with the file and line.
    pub fn load(hba: &Path, ident: Option<&Path>) -> Result<Hba, String> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let maps = match ident {
            Some(p) => parse_ident(&read(p)?).map_err(|e| format!("{}:{e}", p.display()))?,
            None => BTreeMap::new(),
        };
        let lines = parse_hba(&read(hba)?).map_err(|e| format!("{}:{e}", hba.display()))?;
        for l in &lines {
            if let HbaMethod::Cert { map: Some(m) } = &l.method {
                if !maps.contains_key(m) {
                    return Err(format!(
                        "{}:{}: map \"{m}\" is not in ident_file",
                        hba.display(),
                        l.line
                    ));
                }
            }
        }
        Ok(Hba { lines, maps })
    }

    /// The first line for a TCP client from `addr` (over TLS or not) asking for `database`
    /// as `user`.
    pub fn find(&self, tls: bool, addr: IpAddr, database: &str, user: &str) -> Option<&HbaLine> {
        self.lines.iter().find(|l| {
            let conn = match l.conn {
                ConnType::Local => false,
                ConnType::Host => true,
                ConnType::HostSsl => tls,
                ConnType::HostNoSsl => !tls,
            };
            let db = l
                .databases
                .as_ref()
                .is_none_or(|d| d.iter().any(|d| d == database || (d == "sameuser" && database == user)));
            let u = l.users.as_ref().is_none_or(|u| u.iter().any(|u| u == user));
            conn && db && u && l.address.is_none_or(|a| super::cidr_contains(a, addr))
        })
    }

    /// Whether the ident map `map` lets certificate name `cn` log in as `user`.
    pub fn mapped(&self, map: &str, cn: &str, user: &str) -> bool {
        self.maps
            .get(map)
            .is_some_and(|m| m.iter().any(|(c, u)| c == cn && u == user))
    }

    /// Whether any line authenticates by certificate (then client_tls_ca_file is needed).
    pub fn uses_cert(&self) -> bool {
        self.lines.iter().any(|l| matches!(l.method, HbaMethod::Cert { .. }))
    }
}

/// The words of a line, without its comment (quoted words keep spaces and `#`).
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            '#' if !quoted => break,
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => (cur, any) = (cur + &c.to_string(), true),
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn names(field: &str, what: &str, n: usize) -> Result<Option<Vec<String>>, String> {
    let list: Vec<String> = field.split(',').map(str::to_string).collect();
    if list.iter().any(|x| x == "all") {
        return Ok(None);
    }
    if let Some(x) = list.iter().find(|x| x.is_empty() || x.starts_with(['+', '@', '/'])) {
        return Err(format!("{n}: {what} \"{x}\" is not supported (use names or all)"));
    }
    Ok(Some(list))
}

fn parse_hba(text: &str) -> Result<Vec<HbaLine>, String> {
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let w = words(raw);
        if w.is_empty() {
            continue;
        }
        let conn = match w[0].as_str() {
            "local" => ConnType::Local,
            "host" => ConnType::Host,
            "hostssl" => ConnType::HostSsl,
            "hostnossl" => ConnType::HostNoSsl,
            t => {
                return Err(format!(
                    "{n}: connection type \"{t}\" is not supported (host, hostssl, hostnossl, local)"
                ))
            }
        };
        let fixed = if conn == ConnType::Local { 3 } else { 4 };
        if w.len() < fixed + 1 {
            return Err(format!("{n}: expected TYPE DATABASE USER ADDRESS METHOD"));
        }
        let databases = names(&w[1], "database", n)?;
        let users = names(&w[2], "user", n)?;
        let (address, rest) = match conn {
            ConnType::Local => (None, &w[3..]),
            _ => address(&w[3..], n)?,
        };
        let (method, options) = rest.split_first().ok_or_else(|| format!("{n}: no method"))?;
        let method = method_of(method, options, conn, n)?;
        lines.push(HbaLine {
            line: n,
            conn,
            databases,
            users,
            address,
            method,
        });
    }
    Ok(lines)
}

/// An address range (None: `all`).
type Range = Option<(IpAddr, u8)>;

/// The address column (a CIDR, `all`, or an address and a mask column), and what follows.
fn address(w: &[String], n: usize) -> Result<(Range, &[String]), String> {
    let a = w[0].as_str();
    if a == "all" {
        return Ok((None, &w[1..]));
    }
    if a.contains('/') {
        return Ok((Some(parse_cidr(a).map_err(|e| format!("{n}: {e}"))?), &w[1..]));
    }
    let ip: IpAddr = a
        .parse()
        .map_err(|_| format!("{n}: address \"{a}\" is not supported (a CIDR such as 10.0.0.0/8, or all)"))?;
    // An address with a netmask column, as pg_hba.conf allows.
    match w.get(1).and_then(|m| m.parse::<IpAddr>().ok()) {
        Some(mask) => {
            let bits = match mask {
                IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
                IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
            };
            Ok((Some((ip, bits)), &w[2..]))
        }
        None => Ok((Some(parse_cidr(a).map_err(|e| format!("{n}: {e}"))?), &w[1..])),
    }
}

fn method_of(method: &str, options: &[String], conn: ConnType, n: usize) -> Result<HbaMethod, String> {
    let mut map = None;
    for o in options {
        match o.split_once('=') {
            Some(("map", m)) if method == "cert" => map = Some(m.to_string()),
            Some(("clientcert", _)) => {}
            _ => return Err(format!("{n}: option \"{o}\" is not supported")),
        }
    }
    Ok(match method {
        "scram-sha-256" => HbaMethod::ScramSha256,
        "md5" | "password" => HbaMethod::Md5,
        "trust" => HbaMethod::Trust,
        "reject" => HbaMethod::Reject,
        "cert" if conn == ConnType::HostSsl => HbaMethod::Cert { map },
        "cert" => return Err(format!("{n}: cert authentication needs a hostssl line")),
        m => {
            return Err(format!(
                "{n}: method \"{m}\" is not supported (scram-sha-256, md5, cert, trust, reject)"
            ))
        }
    })
}

fn parse_ident(text: &str) -> Result<BTreeMap<String, Vec<(String, String)>>, String> {
    let mut maps: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let w = words(raw);
        match w.as_slice() {
            [] => {}
            [_, system, _] if system.starts_with('/') => {
                return Err(format!("{}: regular expressions are not supported", i + 1))
            }
            [map, system, user] => maps
                .entry(map.clone())
                .or_default()
                .push((system.clone(), user.clone())),
            _ => return Err(format!("{}: expected MAPNAME SYSTEM-USERNAME PG-USERNAME", i + 1)),
        }
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hba(text: &str) -> Hba {
        Hba {
            lines: parse_hba(text).unwrap(),
            maps: parse_ident("certs alice-laptop app\n").unwrap(),
        }
    }

    #[test]
    fn the_first_matching_line_wins() {
        let h = hba(
            "# comment\nlocal all all trust\nhostssl app app 10.0.0.0/8 cert map=certs\n\
             hostnossl app,other all 10.0.0.0 255.0.0.0 md5\nhost \"sameuser\" all ::1/128 trust\n\
             host all bad 0.0.0.0/0 reject\nhost all all 0.0.0.0/0 scram-sha-256 # rest\n",
        );
        let ten: IpAddr = "10.1.1.1".parse().unwrap();
        let m = |tls, ip, db, user| h.find(tls, ip, db, user).map(|l| (l.line, l.method.clone()));
        assert_eq!(
            m(true, ten, "app", "app"),
            Some((
                3,
                HbaMethod::Cert {
                    map: Some("certs".into())
                }
            ))
        );
        assert_eq!(m(false, ten, "other", "app"), Some((4, HbaMethod::Md5)));
        assert_eq!(m(true, ten, "other", "app").unwrap().0, 7);
        assert_eq!(
            m(false, "::1".parse().unwrap(), "bob", "bob"),
            Some((5, HbaMethod::Trust))
        );
        assert_eq!(
            m(false, "::1".parse().unwrap(), "app", "bob"),
            None,
            "v6 but not sameuser"
        );
        assert_eq!(
            m(false, "1.2.3.4".parse().unwrap(), "app", "bad"),
            Some((6, HbaMethod::Reject))
        );
        assert!(h.mapped("certs", "alice-laptop", "app") && !h.mapped("certs", "app", "app"));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_its_line() {
        for (text, want) in [
            ("host all +admins 0.0.0.0/0 md5", "1: user \"+admins\""),
            ("\nhost all all samehost md5", "2: address \"samehost\""),
            ("host all all 0.0.0.0/0 ldap", "1: method \"ldap\""),
            ("host all all 0.0.0.0/0 cert", "1: cert authentication needs a hostssl"),
            ("hostgssenc all all 0.0.0.0/0 md5", "1: connection type"),
            ("host all all 0.0.0.0/0", "1: expected"),
            ("host all all 10.0.0.0/40 md5", "1: prefix length 40"),
        ] {
            let e = parse_hba(text).unwrap_err();
            assert!(e.starts_with(want), "{text}: {e}");
        }
        assert!(parse_ident("m /^(.*)$ \\1").is_err());
    }
}

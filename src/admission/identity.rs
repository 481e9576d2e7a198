//! Client identities: which application a client connection belongs to.
//!
//! Part of admission, decided right after the startup packet (before authentication). Ordered
//! rules from `[[identity]]` match on application_name (a glob), source address (CIDR), user
//! and database; the first rule that matches names the identity, from a template such as
//! `app:{application_name}`. With no rule matching (or none configured) every distinct
//! application_name is its own identity, or, when a client sends none, its source address —
//! so apps are told apart with zero configuration.

use std::net::IpAddr;

pub use crate::config::{parse_cidr, IdentityRule, Rule};

/// What a client says about itself.
#[derive(Debug, Clone, Copy)]
pub struct ClientFacts<'a> {
    /// application_name from the startup packet ("" when none).
    pub application_name: &'a str,
    /// Source address.
    pub source: IpAddr,
    /// User.
    pub user: &'a str,
    /// Database.
    pub database: &'a str,
}

fn in_range(ip: IpAddr, range: (IpAddr, u8)) -> bool {
    crate::config::cidr_contains(range, ip)
}

/// Glob match with `*` and `?`.
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    // Byte indices that always sit on char boundaries ('*' and '?' are one byte); no allocation.
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let width = |s: &str, i: usize| s[i..].chars().next().map_or(1, char::len_utf8);
    let (mut pi, mut ti) = (0, 0);
    // After a '*': where the pattern resumes and the text position it last tried.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            pi += 1;
            star = Some((pi, ti));
        } else if pi < p.len() && p[pi] == b'?' {
            pi += 1;
            ti += width(text, ti);
        } else if pi < p.len() && text[ti..].starts_with(&pattern[pi..pi + width(pattern, pi)]) {
            let n = width(pattern, pi);
            pi += n;
            ti += n;
        } else if let Some((resume, tried)) = star {
            let next = tried + width(text, tried);
            star = Some((resume, next));
            pi = resume;
            ti = next;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// True when `rule` applies to the client `c`.
fn matches(rule: &Rule, c: &ClientFacts<'_>) -> bool {
    rule.application_name
        .as_deref()
        .is_none_or(|g| glob(g, c.application_name))
        && rule.source.is_none_or(|r| in_range(c.source, r))
        && rule.user.as_deref().is_none_or(|u| u == c.user)
        && rule.database.as_deref().is_none_or(|d| d == c.database)
}

fn expand(template: &str, c: &ClientFacts<'_>) -> String {
    template
        .replace("{application_name}", c.application_name)
        .replace("{user}", c.user)
        .replace("{database}", c.database)
        .replace("{source}", &c.source.to_string())
}

/// The identity of a client under `rules` (first match wins; see the module docs for the
/// default).
pub fn identify(rules: &[Rule], c: &ClientFacts<'_>) -> String {
    identify_with_rule(rules, c).0
}

/// The identity and the rule that named it (None: the default identity).
pub(crate) fn identify_with_rule<'r>(rules: &'r [Rule], c: &ClientFacts<'_>) -> (String, Option<&'r Rule>) {
    match rules.iter().find(|r| matches(r, c)) {
        Some(r) => (expand(&r.name, c), Some(r)),
        None if !c.application_name.is_empty() => (c.application_name.to_string(), None),
        None => (c.source.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(app: &'a str, ip: &str, user: &'a str) -> ClientFacts<'a> {
        ClientFacts {
            application_name: app,
            source: ip.parse().unwrap(),
            user,
            database: "app",
        }
    }

    fn rule(name: &str, app: Option<&str>, src: Option<&str>, user: Option<&str>) -> Rule {
        Rule::new(IdentityRule {
            name: name.into(),
            application_name: app.map(Into::into),
            source: src.map(Into::into),
            user: user.map(Into::into),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn default_is_application_name_then_address() {
        assert_eq!(identify(&[], &facts("reports", "10.0.0.5", "app")), "reports");
        assert_eq!(identify(&[], &facts("", "10.0.0.5", "app")), "10.0.0.5");
    }

    #[test]
    fn first_matching_rule_wins_and_templates_expand() {
        let rules = vec![
            rule("batch", Some("celery-*"), None, None),
            rule("office:{user}", None, Some("192.168.0.0/16"), None),
            rule("app:{application_name}", None, None, Some("app")),
        ];
        assert_eq!(identify(&rules, &facts("celery-worker-3", "10.1.1.1", "app")), "batch");
        assert_eq!(identify(&rules, &facts("psql", "192.168.4.2", "alice")), "office:alice");
        assert_eq!(identify(&rules, &facts("web", "10.1.1.1", "app")), "app:web");
        assert_eq!(identify(&rules, &facts("web", "10.1.1.1", "bob")), "web");
    }

    #[test]
    fn globs_and_ranges() {
        assert!(glob("web-*", "web-checkout") && glob("*", "") && glob("a?c", "abc") && glob("*-api-*", "x-api-y"));
        assert!(!glob("web-*", "worker") && !glob("a?c", "ac"));
        assert!(glob("caf?-*", "café-1") && glob("*é", "thé") && !glob("?", "éé") && glob("**a", "ba"));
        let r = parse_cidr("10.0.0.0/8").unwrap();
        assert!(in_range("10.200.1.1".parse().unwrap(), r) && !in_range("11.0.0.1".parse().unwrap(), r));
        assert!(in_range("::ffff:10.1.2.3".parse().unwrap(), r), "IPv4-mapped IPv6");
        assert!(in_range("fd00::1".parse().unwrap(), parse_cidr("fd00::/8").unwrap()));
        assert!(in_range("1.2.3.4".parse().unwrap(), parse_cidr("0.0.0.0/0").unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_err() && parse_cidr("ten/8").is_err());
        assert_eq!(parse_cidr("127.0.0.1").unwrap().1, 32);
    }
}

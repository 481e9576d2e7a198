//! sqlcommenter tags in statement text: `/*controller='checkout',route='/api/pay/'*/`, the
//! comment Django's sqlcommenter and OpenTelemetry middlewares append to every statement.
//!
//! Bottom layer, pure parsing, cold path only: whoever shows a statement it recorded anyway
//! (SHOW LOCKS, SHOW DEADLOCKS, lock-policy messages, long transactions, surges) reads the
//! view that sent it from here. The relay never calls this per statement. Values are
//! URL-decoded, stripped of control characters and bounded; they are for display only.

/// Longest comment looked at (longer ones are not tags).
const MAX_COMMENT: usize = 4096;
/// Longest value shown, in characters.
pub const MAX_VALUE: usize = 200;
/// Comments looked at in one statement, at most.
const MAX_COMMENTS: usize = 16;

/// The tags pgvalve shows of a statement's sqlcommenter comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    /// `route`: the URL pattern of the view (Django).
    pub route: Option<String>,
    /// `controller`: the view's name.
    pub controller: Option<String>,
    /// `action`: the view's action, where the framework has one.
    pub action: Option<String>,
    /// `traceparent`: the W3C trace the statement ran in.
    pub traceparent: Option<String>,
}

impl Tags {
    /// The tags of the last sqlcommenter comment in `sql` (none: all empty). Never fails:
    /// a malformed comment gives what could be read of it, or nothing.
    pub fn parse(sql: &str) -> Tags {
        let mut best = Tags::default();
        let mut rest = sql;
        for _ in 0..MAX_COMMENTS {
            let Some(open) = rest.find("/*") else { break };
            let after = &rest[open + 2..];
            let Some(close) = after.find("*/") else { break };
            let body = &after[..close];
            if body.len() <= MAX_COMMENT {
                let t = Tags::from_comment(body);
                if !t.is_empty() {
                    best = t;
                }
            }
            rest = &after[close + 2..];
        }
        best
    }

    /// Whether no tag was found.
    pub fn is_empty(&self) -> bool {
        self.route.is_none() && self.controller.is_none() && self.action.is_none() && self.traceparent.is_none()
    }

    /// The tags of one comment's body: `key='value'` pairs separated by commas.
    fn from_comment(body: &str) -> Tags {
        let mut t = Tags::default();
        let mut rest = body.trim();
        while !rest.is_empty() {
            let Some(eq) = rest.find('=') else { break };
            let key = decode(rest[..eq].trim());
            let Some(quoted) = rest[eq + 1..].trim_start().strip_prefix('\'') else {
                break;
            };
            let Some((raw, after)) = quoted_value(quoted) else {
                break;
            };
            let value = Some(decode(&raw)).filter(|v| !v.is_empty());
            match key.as_str() {
                "route" => t.route = value,
                "controller" => t.controller = value,
                "action" => t.action = value,
                "traceparent" => t.traceparent = value,
                _ => {}
            }
            rest = after.trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None => break,
            }
        }
        t
    }
}

/// The value up to its closing quote (`\'` and `\\` unescaped) and what follows it.
fn quoted_value(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, n)) = chars.next() {
                    out.push(n);
                }
            }
            '\'' => return Some((out, &s[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// URL-decodes `s` (a `%` not followed by two hex digits stays as it is), drops control
/// characters, and keeps at most [`MAX_VALUE`] characters.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut bytes = Vec::with_capacity(b.len().min(4 * MAX_VALUE));
    let mut i = 0;
    while i < b.len() && bytes.len() < 4 * MAX_VALUE {
        let hex = |x: u8| (x as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                bytes.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                bytes.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_VALUE)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn django_tags_are_read_and_decoded() {
        let t = Tags::parse(
            "UPDATE acct SET n = n + 1 WHERE id = 1 /*controller='checkout',db_driver='django.db.backends.postgresql',framework='django%3A5.2',route='%2Fapi%2Fpay%2F',traceparent='00-4bf9-00f0-01'*/",
        );
        assert_eq!(t.route.as_deref(), Some("/api/pay/"));
        assert_eq!(t.controller.as_deref(), Some("checkout"));
        assert_eq!(t.traceparent.as_deref(), Some("00-4bf9-00f0-01"));
        assert_eq!(t.action, None);
    }

    #[test]
    fn malformed_or_huge_comments_give_nothing_or_bounded_values() {
        assert!(Tags::parse("SELECT 1 /* just a note */").is_empty());
        assert!(Tags::parse("SELECT 1 /*route='unterminated*/").is_empty());
        assert!(Tags::parse("SELECT 1 /*route='x'").is_empty());
        let big = format!("SELECT 1 /*route='{}'*/", "a".repeat(1 << 20));
        assert!(Tags::parse(&big).is_empty());
        let long = format!("SELECT 1 /*route='{}%ZZ\u{7}'*/", "b".repeat(1000));
        assert_eq!(Tags::parse(&long).route.map(|r| r.chars().count()), Some(MAX_VALUE));
        let esc = Tags::parse(r"SELECT /*controller='it\'s',route='%E2%82%AC%'*/");
        assert_eq!(esc.controller.as_deref(), Some("it's"));
        assert_eq!(esc.route.as_deref(), Some("€%"));
    }
}

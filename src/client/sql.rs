//! Finds statements that change session state, in SQL text a client sends (Query and Parse).
//!
//! Part of the client session in transaction mode: such a statement would leave state on a
//! server connection that the next client would inherit, so the session is pinned to its
//! server connection instead. A small lexer skips comments, string literals, quoted
//! identifiers and dollar quotes, splits statements at `;` and looks at keywords only.

/// Keywords one of which any session-changing statement contains (lower case).
const TRIGGERS: &[&[u8]] = &[
    b"set",
    b"listen",
    b"load",
    b"prepare",
    b"declare",
    b"temp",
    b"advisory",
    b"discard",
];

/// For each byte, which of `words` (at most 8, lower case letters, at least two) have it,
/// in either case, at position `at`, as a bit mask of their indices.
const fn letter_at(words: &[&[u8]], at: usize) -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < words.len() {
        let b = words[i][at];
        t[b as usize] |= 1 << i;
        t[(b & !0x20) as usize] |= 1 << i;
        i += 1;
    }
    t
}

/// The first two letters of some words, for [`contains_any`].
struct Filter {
    first: [u8; 256],
    second: [u8; 256],
}

impl Filter {
    const fn of(words: &[&[u8]]) -> Self {
        Self {
            first: letter_at(words, 0),
            second: letter_at(words, 1),
        }
    }
}

const DEALLOCATES: &[&[u8]] = &[b"deallocate", b"discard"];
static TRIGGER_FILTER: Filter = Filter::of(TRIGGERS);
static DEALLOCATE_FILTER: Filter = Filter::of(DEALLOCATES);

/// Whether any of `words` appears in `sql`, in any case. Only the words starting with the
/// two bytes at a position (`filter`) are compared there: in ordinary SQL that is rare, so
/// the scan costs about two table lookups per byte.
fn contains_any(sql: &[u8], words: &[&[u8]], filter: &Filter) -> bool {
    let next = sql.get(1..).unwrap_or_default();
    for (i, (&a, &b)) in sql.iter().zip(next).enumerate() {
        let m0 = filter.first[a as usize];
        if m0 == 0 {
            continue;
        }
        let mut m = m0 & filter.second[b as usize];
        while m != 0 {
            let w = words[m.trailing_zeros() as usize];
            m &= m - 1;
            if sql.len() - i >= w.len() && sql[i..i + w.len()].eq_ignore_ascii_case(w) {
                return true;
            }
        }
    }
    false
}

/// Cheap pre-check, no allocation: false when `sql` cannot change session state (none of the
/// trigger words appears, in any case), so the lexer is skipped for ordinary queries.
pub(crate) fn might_change_session(sql: &[u8]) -> bool {
    contains_any(sql, TRIGGERS, &TRIGGER_FILTER)
}

/// Cheap pre-check for [`deallocates_all`]: false when neither DEALLOCATE nor DISCARD appears.
pub(crate) fn might_deallocate(sql: &[u8]) -> bool {
    contains_any(sql, DEALLOCATES, &DEALLOCATE_FILTER)
}

/// Why a statement ties the client to its server connection, or None.
pub(crate) fn session_state_change(sql: &str) -> Option<&'static str> {
    let mut words: Vec<String> = Vec::new();
    let mut reason = None;
    let mut lexer = Lexer {
        s: sql.as_bytes(),
        i: 0,
    };
    while let Some(tok) = lexer.next() {
        match tok {
            Tok::Semicolon => {
                reason = reason.or_else(|| statement_reason(&words));
                words.clear();
            }
            Tok::Word(w) => {
                if lexer.peek_open_paren() && is_session_function(&w) && !sets_tracked_parameter(&w, &lexer) {
                    reason = reason.or(Some("session-level function (advisory lock or set_config)"));
                }
                if words.len() < 12 {
                    words.push(w);
                }
            }
            Tok::Other(_) | Tok::Str(_) | Tok::Quoted(_) => {
                if words.len() < 12 {
                    words.push(String::new());
                }
            }
        }
    }
    reason.or_else(|| statement_reason(&words))
}

/// Whether `sql` contains DEALLOCATE ALL or DISCARD ALL (the session's prepared statements
/// are gone afterwards).
pub(crate) fn deallocates_all(sql: &str) -> bool {
    let mut lexer = Lexer {
        s: sql.as_bytes(),
        i: 0,
    };
    let mut words: Vec<String> = Vec::new();
    let check = |w: &[String]| match w {
        [a, b, ..] if a == "DISCARD" && b == "ALL" => true,
        [a, b, ..] if a == "DEALLOCATE" && b == "ALL" => true,
        [a, b, c, ..] if a == "DEALLOCATE" && b == "PREPARE" && c == "ALL" => true,
        _ => false,
    };
    while let Some(tok) = lexer.next() {
        match tok {
            Tok::Semicolon => {
                if check(&words) {
                    return true;
                }
                words.clear();
            }
            Tok::Word(w) if words.len() < 3 => words.push(w),
            _ => {}
        }
    }
    check(&words)
}

/// `set_config('<tracked parameter>', ...)`: reported by the server, re-applied by the proxy.
fn sets_tracked_parameter(word: &str, lexer: &Lexer<'_>) -> bool {
    if word != "SET_CONFIG" {
        return false;
    }
    let mut ahead = Lexer { s: lexer.s, i: lexer.i };
    let _open_paren = ahead.next();
    matches!(ahead.next(), Some(Tok::Str(name)) if tracked(&name.to_ascii_uppercase()))
}

fn is_session_function(w: &str) -> bool {
    matches!(
        w,
        "PG_ADVISORY_LOCK"
            | "PG_ADVISORY_LOCK_SHARED"
            | "PG_TRY_ADVISORY_LOCK"
            | "PG_TRY_ADVISORY_LOCK_SHARED"
            | "SET_CONFIG"
    )
}

/// Parameters PostgreSQL reports with ParameterStatus whenever they change: a SET or RESET of
/// one of them does not pin, because the proxy learns the new value from the server and
/// re-applies it on every server connection the client gets.
pub(crate) const TRACKED_PARAMETERS: &[&str] = &[
    "APPLICATION_NAME",
    "CLIENT_ENCODING",
    "DATESTYLE",
    "INTERVALSTYLE",
    "TIMEZONE",
    "STANDARD_CONFORMING_STRINGS",
];

fn tracked(name: &str) -> bool {
    TRACKED_PARAMETERS.contains(&name)
}

/// The reason for one statement, from its leading keywords (upper-cased).
fn statement_reason(w: &[String]) -> Option<&'static str> {
    let at = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    match at(0) {
        "SET" => {
            let i = if at(1) == "SESSION" { 2 } else { 1 };
            match at(i) {
                "LOCAL" | "TRANSACTION" | "CONSTRAINTS" if i == 1 => None,
                "CHARACTERISTICS" => Some("SET SESSION CHARACTERISTICS"),
                "TIME" if at(i + 1) == "ZONE" => None,
                "NAMES" => None,
                name if tracked(name) => None,
                _ => Some("SET"),
            }
        }
        "RESET" if tracked(at(1)) => None,
        "RESET" => Some("RESET"),
        "LISTEN" => Some("LISTEN"),
        "DISCARD" => Some("DISCARD"),
        "LOAD" => Some("LOAD"),
        "PREPARE" if at(1) != "TRANSACTION" => Some("PREPARE"),
        "DECLARE" => {
            let upto = w.iter().position(|x| x == "FOR").unwrap_or(w.len());
            w[..upto]
                .windows(2)
                .any(|p| p[0] == "WITH" && p[1] == "HOLD")
                .then_some("DECLARE ... WITH HOLD")
        }
        // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} [UNLOGGED] {TABLE | VIEW | ...}
        "CREATE" => w[1..]
            .iter()
            .take_while(|x| {
                !matches!(
                    x.as_str(),
                    "TABLE" | "VIEW" | "SEQUENCE" | "RECURSIVE" | "FUNCTION" | "INDEX"
                )
            })
            .any(|x| x == "TEMP" || x == "TEMPORARY")
            .then_some("temporary object"),
        _ => None,
    }
}

/// A token of SQL text.
pub(super) enum Tok {
    /// A keyword or unquoted identifier, upper-cased.
    Word(String),
    /// A single-quoted literal (its text, with '' unescaped).
    Str(String),
    /// A double-quoted identifier (its text, with "" unescaped).
    Quoted(String),
    Semicolon,
    /// Anything else, by its first byte (a dollar-quoted string is `$`).
    Other(u8),
}

/// Splits SQL text into [`Tok`]s, skipping whitespace and comments.
pub(super) struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Lexer<'a> {
    /// A lexer at the start of `sql`.
    pub(super) fn new(sql: &'a str) -> Self {
        Lexer {
            s: sql.as_bytes(),
            i: 0,
        }
    }
    fn peek_open_paren(&self) -> bool {
        self.s[self.i..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'(')
    }

    fn skip_until(&mut self, end: &[u8]) {
        match self.s[self.i..].windows(end.len()).position(|w| w == end) {
            Some(p) => self.i += p + end.len(),
            None => self.i = self.s.len(),
        }
    }

    fn skip_quoted(&mut self, q: u8, backslash: bool) {
        while self.i < self.s.len() {
            let b = self.s[self.i];
            self.i += 1;
            if backslash && b == b'\\' {
                self.i += 1;
            } else if b == q {
                if self.s.get(self.i) == Some(&q) {
                    self.i += 1;
                } else {
                    return;
                }
            }
        }
    }

    fn skip_block_comment(&mut self) {
        let mut depth = 1;
        while self.i < self.s.len() && depth > 0 {
            if self.s[self.i..].starts_with(b"/*") {
                depth += 1;
                self.i += 2;
            } else if self.s[self.i..].starts_with(b"*/") {
                depth -= 1;
                self.i += 2;
            } else {
                self.i += 1;
            }
        }
    }

    /// `$tag$ ... $tag$` starting at `self.i` (which is at `$`); false if not a dollar quote.
    fn skip_dollar_quote(&mut self) -> bool {
        let rest = &self.s[self.i + 1..];
        let Some(end) = rest.iter().position(|&b| !(b.is_ascii_alphanumeric() || b == b'_')) else {
            return false;
        };
        if rest[end] != b'$' || rest.first().is_some_and(u8::is_ascii_digit) {
            return false;
        }
        let tag = self.s[self.i..self.i + end + 2].to_vec();
        self.i += tag.len();
        self.skip_until(&tag);
        true
    }

    /// The next token, or None at the end.
    pub(super) fn next(&mut self) -> Option<Tok> {
        loop {
            let b = *self.s.get(self.i)?;
            match b {
                b if b.is_ascii_whitespace() => self.i += 1,
                b'-' if self.s.get(self.i + 1) == Some(&b'-') => self.skip_until(b"\n"),
                b'/' if self.s.get(self.i + 1) == Some(&b'*') => {
                    self.i += 2;
                    self.skip_block_comment();
                }
                b'\'' => {
                    let escaped = self.i > 0 && matches!(self.s[self.i - 1], b'E' | b'e');
                    self.i += 1;
                    let start = self.i;
                    self.skip_quoted(b'\'', escaped);
                    let end = self.i.saturating_sub(1).max(start);
                    let text = String::from_utf8_lossy(&self.s[start..end]).replace("''", "'");
                    return Some(Tok::Str(text));
                }
                b'"' => {
                    self.i += 1;
                    let start = self.i;
                    self.skip_quoted(b'"', false);
                    let end = self.i.saturating_sub(1).max(start);
                    let text = String::from_utf8_lossy(&self.s[start..end]).replace("\"\"", "\"");
                    return Some(Tok::Quoted(text));
                }
                b'$' if self.skip_dollar_quote() => return Some(Tok::Other(b'$')),
                b';' => {
                    self.i += 1;
                    return Some(Tok::Semicolon);
                }
                // Identifiers may hold any non-ASCII letter (bytes of UTF-8 sequences).
                b if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 => {
                    let start = self.i;
                    while self
                        .s
                        .get(self.i)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'$' || *c >= 0x80)
                    {
                        self.i += 1;
                    }
                    let w = String::from_utf8_lossy(&self.s[start..self.i]).to_ascii_uppercase();
                    // E'...' strings: the E is a prefix, not a word.
                    if (w == "E") && self.s.get(self.i) == Some(&b'\'') {
                        continue;
                    }
                    return Some(Tok::Word(w));
                }
                b => {
                    self.i += 1;
                    return Some(Tok::Other(b));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::session_state_change as f;

    #[test]
    fn detects_session_state() {
        for sql in [
            "SET search_path = a",
            "set statement_timeout to 5",
            "SET SESSION work_mem = '1MB'",
            "RESET ALL",
            "LISTEN chan",
            "SELECT pg_advisory_lock(1)",
            "select PG_TRY_ADVISORY_LOCK (1, 2)",
            "RESET search_path",
            "SET SESSION statement_timeout = 1",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT set_config('search_path', 'x', false)",
            "CREATE TEMP TABLE t (x int)",
            "create temporary table t (x int)",
            "CREATE GLOBAL TEMPORARY TABLE t (x int)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE p AS SELECT 1",
            "SELECT 1; SET x = 1",
            "/* hi */ SET x = 1",
            "BEGIN; SET work_mem = '2MB'; COMMIT",
        ] {
            assert!(f(sql).is_some(), "{sql}");
        }
    }

    #[test]
    fn prefilter_never_hides_a_change() {
        for sql in [
            "SET x = 1",
            "reset all",
            "LISTEN c",
            "select pg_advisory_lock(1)",
            "CREATE TEMP TABLE t()",
            "Discard All",
        ] {
            assert!(super::might_change_session(sql.as_bytes()), "{sql}");
        }
        assert!(!super::might_change_session(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        ));
        // A false alarm only costs the lexer, which then finds UPDATE ... SET harmless.
        assert!(super::might_change_session(b"UPDATE t SET x = 1"));
        for sql in ["DEALLOCATE ALL", "deallocate prepare all", "select 1; DISCARD ALL"] {
            assert!(
                super::might_deallocate(sql.as_bytes()) && super::deallocates_all(sql),
                "{sql}"
            );
        }
        assert!(!super::might_deallocate(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
    }

    /// The first-letter filter finds exactly what a plain case-insensitive search finds.
    #[test]
    fn prefilter_matches_a_plain_search() {
        let naive = |sql: &[u8], words: &[&[u8]]| {
            let lower = sql.to_ascii_lowercase();
            words.iter().any(|w| lower.windows(w.len()).any(|x| x == *w))
        };
        let alphabet = b"sSeEtTlLiInNoOaAdDpPrRvVyYcCmMfF _;'\"$\xc3\xa9";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..24);
            let sql: Vec<u8> = (0..len).map(|_| alphabet[rng.usize(0..alphabet.len())]).collect();
            assert_eq!(
                super::might_change_session(&sql),
                naive(&sql, super::TRIGGERS),
                "{sql:?}"
            );
            assert_eq!(
                super::might_deallocate(&sql),
                naive(&sql, super::DEALLOCATES),
                "{sql:?}"
            );
        }
    }

    #[test]
    fn ignores_transaction_scoped_and_quoted() {
        for sql in [
            "SELECT 1",
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SET TIME ZONE 'UTC'",
            "SET timezone = 'UTC'",
            "SET SESSION DateStyle = ISO",
            "SET application_name = 'x'",
            "SET NAMES 'UTF8'",
            "SELECT set_config('TimeZone', 'UTC', false)",
            "SELECT pg_catalog.set_config( 'application_name' , $1, false)",
            "RESET TimeZone",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT 'SET x = 1'",
            "SELECT $$ LISTEN x $$",
            "SELECT $tag$ ; SET x $tag$",
            "SELECT E'it\\'s; SET x = 1'",
            "SELECT 1 -- ; SET x = 1",
            "SELECT \"set\" FROM t",
            "DECLARE c CURSOR FOR SELECT 1",
            "PREPARE TRANSACTION 'x'",
            "CREATE TABLE temp (x int)",
            "UPDATE t SET x = 1",
            "INSERT INTO t VALUES ('pg_advisory_lock(1)')",
            "",
        ] {
            assert_eq!(f(sql), None, "{sql}");
        }
    }
}

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

/// The SQL text of a Query or Parse message body (`body`, after the header): up to its
/// terminating NUL; the whole body when it is malformed (the pre-checks then scan more).
#[inline]
pub(crate) fn query_text(tag: u8, body: &[u8]) -> &[u8] {
    let text = if tag == crate::protocol::tags::frontend::PARSE {
        match memchr::memchr(0, body) {
            Some(i) => &body[i + 1..],
            None => return body,
        }
    } else {
        body
    };
    memchr::memchr(0, text).map_or(text, |i| &text[..i])
}

/// `text` without a trailing block comment (sqlcommenter's tags: `SELECT ... /*route='..'*/`),
/// which the pre-checks then need not scan; `text` itself when it has none.
///
/// Sound for text PostgreSQL accepts (text it rejects runs none of its statements: a simple
/// Query is parsed whole before any statement runs). Text ending in `*/` (before blanks and
/// semicolons) ends either inside a block comment, which began at or before the last `/*`,
/// so nothing from that `/*` on is SQL; or inside a line comment, which is refused here when
/// a `--` follows the last `/*` (one before it starts a comment that covers the rest). In a
/// string, quoted name or dollar quote the text could not end there.
#[inline]
pub(crate) fn code_part(text: &[u8]) -> &[u8] {
    let end = text
        .iter()
        .rposition(|&b| !(b.is_ascii_whitespace() || b == b';'))
        .map_or(0, |i| i + 1);
    let t = &text[..end];
    if !t.ends_with(b"*/") {
        return text;
    }
    let Some(start) = last_comment_start(&t[..end - 2]) else {
        return text;
    };
    if memchr::memmem::find(&t[start..], b"--").is_some() {
        return text;
    }
    &text[..start]
}

/// Where the last `/*` of `s` is (by `/`, which sqlcommenter's URL-encoded tags lack).
fn last_comment_start(s: &[u8]) -> Option<usize> {
    let mut end = s.len();
    while let Some(i) = memchr::memrchr(b'/', &s[..end]) {
        if s.get(i + 1) == Some(&b'*') {
            return Some(i);
        }
        end = i;
    }
    None
}

/// The first word of `sql` after blanks and comments (nested block comments as PostgreSQL
/// nests them); empty when something else comes first. No allocation: a pre-check.
#[inline]
pub(crate) fn first_word(sql: &[u8]) -> &[u8] {
    let mut i = 0;
    loop {
        match sql.get(i..) {
            Some([b, ..]) if b.is_ascii_whitespace() => i += 1,
            Some([b'-', b'-', rest @ ..]) => i += 2 + memchr::memchr(b'\n', rest).unwrap_or(rest.len()),
            Some(rest @ [b'/', b'*', ..]) => i += block_comment_len(rest),
            Some(rest) => {
                let end = rest
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$' || *b >= 0x80))
                    .unwrap_or(rest.len());
                return &rest[..end];
            }
            None => return &[],
        }
    }
}

/// The length of the block comment `s` starts with (nested ones inside it included); all of
/// `s` when it does not end.
fn block_comment_len(s: &[u8]) -> usize {
    let (mut depth, mut i) = (0usize, 0);
    while i + 1 < s.len() {
        match &s[i..i + 2] {
            b"/*" => (depth, i) = (depth + 1, i + 2),
            b"*/" => {
                (depth, i) = (depth - 1, i + 2);
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
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

/// What SQL text does to the session's state (transaction mode).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Effect {
    /// Why it ties the session to its server connection (the first reason found).
    pub(crate) pin: Option<&'static str>,
    /// It may set a parameter the proxy tracks by reading it back at the end of the
    /// transaction (`search_path`, `track_parameters`; see `client::tracked`).
    pub(crate) track: bool,
    /// It contains `RESET ALL`.
    pub(crate) reset_all: bool,
}

impl Effect {
    fn add(&mut self, s: Stmt) {
        match s {
            Stmt::Keep => {}
            Stmt::Pin(reason) => self.pin = self.pin.or(Some(reason)),
            Stmt::Track => self.track = true,
            Stmt::ResetAll => {
                self.track = true;
                self.reset_all = true;
            }
        }
    }
}

/// What one statement does to session state.
enum Stmt {
    /// Nothing the next transaction would notice (or a parameter the server reports).
    Keep,
    /// It ties the session to its server connection, for this reason.
    Pin(&'static str),
    /// It sets a parameter tracked by reading it back.
    Track,
    /// `RESET ALL`.
    ResetAll,
}

/// Why a statement ties the client to its server connection, or None (with no parameters
/// tracked beyond `search_path`).
pub(crate) fn session_state_change(sql: &str) -> Option<&'static str> {
    session_effect(sql, &[]).pin
}

/// What `sql` does to session state; `extra`: the parameters tracked besides `search_path`
/// (`track_parameters`, upper case).
pub(crate) fn session_effect(sql: &str, extra: &[String]) -> Effect {
    let mut words: Vec<String> = Vec::new();
    let mut effect = Effect::default();
    let mut lexer = Lexer::new(sql);
    while let Some(tok) = lexer.next() {
        match tok {
            Tok::Semicolon => {
                effect.add(statement_reason(&words, extra));
                words.clear();
            }
            Tok::Word(w) => {
                if lexer.peek_open_paren() && is_session_function(&w) {
                    effect.add(function_effect(&w, &lexer, extra));
                }
                if words.len() < 12 {
                    words.push(w);
                }
            }
            Tok::Other(b) => {
                if words.len() < 12 {
                    words.push(if b == b'.' { ".".into() } else { String::new() });
                }
            }
            Tok::Str(_) | Tok::Quoted(_) => {
                if words.len() < 12 {
                    words.push(String::new());
                }
            }
        }
    }
    effect.add(statement_reason(&words, extra));
    effect
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

/// A call of a session-level function: advisory locks pin; `set_config` of a parameter the
/// server reports keeps (the proxy learns the value), of a parameter tracked by reading back
/// tracks, with `true` as its third argument (transaction-scoped) keeps, else pins.
fn function_effect(word: &str, lexer: &Lexer<'_>, extra: &[String]) -> Stmt {
    const SESSION_FUNCTION: &str = "session-level function (advisory lock or set_config)";
    if word != "SET_CONFIG" {
        return Stmt::Pin(SESSION_FUNCTION);
    }
    let mut ahead = Lexer { s: lexer.s, i: lexer.i };
    let _open_paren = ahead.next();
    let name = match ahead.next() {
        Some(Tok::Str(name)) => Some(name.to_ascii_uppercase()),
        _ => None,
    };
    if name.as_deref().is_some_and(tracked) {
        return Stmt::Keep;
    }
    // The arguments after the name: depth, commas at depth 0, tokens of the current one.
    let (mut depth, mut commas, mut arg, mut local) = (0u32, 0u32, 0u32, false);
    while let Some(tok) = ahead.next() {
        match tok {
            Tok::Other(b'(') => depth += 1,
            Tok::Other(b')') if depth == 0 => break,
            Tok::Other(b')') => depth -= 1,
            Tok::Other(b',') if depth == 0 => {
                commas += 1;
                (arg, local) = (0, false);
                continue;
            }
            Tok::Semicolon => break,
            _ => {}
        }
        arg += 1;
        local = arg == 1 && matches!(&tok, Tok::Word(w) if w == "TRUE");
    }
    if commas == 2 && local {
        Stmt::Keep
    } else if name.as_deref().is_some_and(|n| read_back(n, extra)) {
        Stmt::Track
    } else {
        Stmt::Pin(SESSION_FUNCTION)
    }
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

/// Parameters tracked by reading them back after the transaction (`search_path`, and
/// `extra`: `track_parameters` in upper case).
fn read_back(name: &str, extra: &[String]) -> bool {
    name == "SEARCH_PATH" || extra.iter().any(|e| e == name)
}

/// The parameter named at `w[i..]`: a word, or `word.word` (a custom parameter).
fn parameter_name(w: &[String], i: usize) -> String {
    let at = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    if at(i + 1) == "." && !at(i + 2).is_empty() {
        format!("{}.{}", at(i), at(i + 2))
    } else {
        at(i).to_string()
    }
}

/// What one statement does, from its leading keywords (upper-cased).
fn statement_reason(w: &[String], extra: &[String]) -> Stmt {
    let at = |i: usize| w.get(i).map(String::as_str).unwrap_or("");
    match at(0) {
        "SET" => {
            let i = if at(1) == "SESSION" { 2 } else { 1 };
            match at(i) {
                "LOCAL" | "TRANSACTION" | "CONSTRAINTS" if i == 1 => Stmt::Keep,
                "CHARACTERISTICS" => Stmt::Pin("SET SESSION CHARACTERISTICS"),
                "TIME" if at(i + 1) == "ZONE" => Stmt::Keep,
                "NAMES" => Stmt::Keep,
                name if tracked(name) => Stmt::Keep,
                _ if read_back(&parameter_name(w, i), extra) => Stmt::Track,
                _ => Stmt::Pin("SET"),
            }
        }
        "RESET" if at(1) == "ALL" => Stmt::ResetAll,
        "RESET" if tracked(at(1)) || (at(1) == "TIME" && at(2) == "ZONE") => Stmt::Keep,
        "RESET" if read_back(&parameter_name(w, 1), extra) => Stmt::Track,
        "RESET" => Stmt::Pin("RESET"),
        "LISTEN" => Stmt::Pin("LISTEN"),
        "DISCARD" => Stmt::Pin("DISCARD"),
        "LOAD" => Stmt::Pin("LOAD"),
        "PREPARE" if at(1) != "TRANSACTION" => Stmt::Pin("PREPARE"),
        "DECLARE" => {
            let upto = w.iter().position(|x| x == "FOR").unwrap_or(w.len());
            let hold = w[..upto].windows(2).any(|p| p[0] == "WITH" && p[1] == "HOLD");
            if hold {
                Stmt::Pin("DECLARE ... WITH HOLD")
            } else {
                Stmt::Keep
            }
        }
        // CREATE [OR REPLACE] [GLOBAL | LOCAL] {TEMP | TEMPORARY} [UNLOGGED] {TABLE | VIEW | ...}
        "CREATE" => {
            let temp = w[1..]
                .iter()
                .take_while(|x| {
                    !matches!(
                        x.as_str(),
                        "TABLE" | "VIEW" | "SEQUENCE" | "RECURSIVE" | "FUNCTION" | "INDEX"
                    )
                })
                .any(|x| x == "TEMP" || x == "TEMPORARY");
            if temp {
                Stmt::Pin("temporary object")
            } else {
                Stmt::Keep
            }
        }
        _ => Stmt::Keep,
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
#[path = "sql_tests.rs"]
mod tests;

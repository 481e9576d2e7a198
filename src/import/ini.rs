//! Reading PgBouncer's files: `pgbouncer.ini` (sections, `key = value` lines, `%include`),
//! the connection strings of `[databases]` and `[users]` entries, and `userlist.txt`.
//!
//! Part of `import` (a tool beside the proxy): it only reads and remembers where each value
//! came from (file and line), so every mapped and unmapped setting can be told by its line,
//! and every malformed line is refused naming it.

use std::path::{Path, PathBuf};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    /// The file as named on the command line (or in `%include`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A file that cannot be imported: where, and why.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not what PgBouncer accepts there.
    #[error("{at}: {reason}")]
    Line {
        /// The line.
        at: At,
        /// What is wrong with it.
        reason: String,
    },
    /// The files parse but name nothing pgvalve could serve.
    #[error("{0}")]
    Incomplete(String),
}

impl ImportError {
    pub(crate) fn line(at: &At, reason: impl Into<String>) -> Self {
        ImportError::Line {
            at: at.clone(),
            reason: reason.into(),
        }
    }
}

/// One `key = value` line of a section.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The section, lower case (`pgbouncer`, `databases`, `users`, `peers`).
    pub section: String,
    /// The key: lower case in `[pgbouncer]`, as written elsewhere (database and user names).
    pub key: String,
    /// The value, trimmed.
    pub value: String,
    /// Where it was written.
    pub at: At,
}

const SECTIONS: &[&str] = &["pgbouncer", "databases", "users", "peers"];

/// Reads `pgbouncer.ini` and the files it `%include`s, in order.
///
/// # Errors
/// A file that cannot be read, or a line that is not a comment, a section header, a
/// `key = value` line inside a known section, or `%include FILE`.
pub fn read_ini(path: &Path) -> Result<Vec<Entry>, ImportError> {
    let mut out = Vec::new();
    let mut section = None;
    read_into(path, &mut section, &mut out, 0)?;
    Ok(out)
}

fn read_file(path: &Path) -> Result<String, ImportError> {
    std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn read_into(path: &Path, section: &mut Option<String>, out: &mut Vec<Entry>, depth: usize) -> Result<(), ImportError> {
    let text = read_file(path)?;
    let file = path.display().to_string();
    for (i, raw) in text.lines().enumerate() {
        let at = At {
            file: file.clone(),
            line: i + 1,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("%include") {
            if depth >= 10 {
                return Err(ImportError::line(&at, "%include nested more than 10 deep"));
            }
            let name = rest.trim();
            if name.is_empty() {
                return Err(ImportError::line(&at, "%include needs a file name"));
            }
            read_into(&include_path(path, name), section, out, depth + 1)?;
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| ImportError::line(&at, format!("section header {line:?} has no closing ']'")))?
                .trim()
                .to_ascii_lowercase();
            if !SECTIONS.contains(&name.as_str()) {
                return Err(ImportError::line(
                    &at,
                    format!("unknown section [{name}] (PgBouncer has [pgbouncer], [databases], [users], [peers])"),
                ));
            }
            *section = Some(name);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(ImportError::line(
                &at,
                format!("expected `key = value`, found {line:?}"),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(ImportError::line(&at, "a setting without a name before '='"));
        }
        let Some(s) = section.clone() else {
            return Err(ImportError::line(
                &at,
                format!("setting {key:?} before any section header such as [pgbouncer]"),
            ));
        };
        let key = if s == "pgbouncer" {
            key.to_ascii_lowercase()
        } else {
            key.to_string()
        };
        out.push(Entry {
            section: s,
            key,
            value: value.trim().to_string(),
            at,
        });
    }
    Ok(())
}

/// PgBouncer takes a relative `%include` from the working directory; a file next to the one
/// including it is what operators mean more often, so that is tried when the first is absent.
fn include_path(from: &Path, name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.is_absolute() || p.exists() {
        return p;
    }
    from.parent().map(|d| d.join(name)).unwrap_or(p)
}

/// Splits a libpq-style connection string (`host=a port=5432 password='it''s'`) into pairs.
///
/// # Errors
/// A word without `=`, or an unterminated quote.
pub fn conn_string(s: &str, at: &At) -> Result<Vec<(String, String)>, ImportError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ImportError::line(
                at,
                format!("connection string: expected `{key}=value`, found {key:?} without '='"),
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let value = conn_value(&mut chars, &key, at)?;
        out.push((key.to_ascii_lowercase(), value));
    }
}

fn conn_value(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, key: &str, at: &At) -> Result<String, ImportError> {
    let mut value = String::new();
    if chars.peek() != Some(&'\'') {
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            value.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
        }
        return Ok(value);
    }
    chars.next();
    loop {
        match chars.next() {
            None => {
                return Err(ImportError::line(
                    at,
                    format!("connection string: the quoted value of {key} is not closed with '"),
                ))
            }
            Some('\\') => value.push(chars.next().unwrap_or('\\')),
            Some('\'') if chars.peek() == Some(&'\'') => {
                chars.next();
                value.push('\'');
            }
            Some('\'') => return Ok(value),
            Some(c) => value.push(c),
        }
    }
}

/// One user of `userlist.txt`: `"name" "secret"` (the rest of the line is ignored).
#[derive(Debug, Clone)]
pub struct ListedUser {
    /// The user name.
    pub name: String,
    /// A cleartext password, an `md5...` hash or a `SCRAM-SHA-256$...` verifier.
    pub secret: String,
    /// Where.
    pub at: At,
}

/// Reads `userlist.txt` (PgBouncer's `auth_file` format).
///
/// # Errors
/// The file cannot be read, or a line that is not two double-quoted fields.
pub fn read_userlist(path: &Path) -> Result<Vec<ListedUser>, ImportError> {
    let text = read_file(path)?;
    let file = path.display().to_string();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let at = At {
            file: file.clone(),
            line: i + 1,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let bad = || {
            ImportError::line(
                &at,
                "expected \"user\" \"password or verifier\" (two double-quoted fields)",
            )
        };
        let (name, rest) = quoted(line).ok_or_else(bad)?;
        let (secret, _) = quoted(rest.trim_start()).ok_or_else(bad)?;
        if name.is_empty() {
            return Err(ImportError::line(&at, "empty user name"));
        }
        out.push(ListedUser { name, secret, at });
    }
    Ok(out)
}

/// A `"..."` field (a doubled `""` is one quote) and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut it = rest.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if c == '"' {
            if it.peek().map(|&(_, n)| n) == Some('"') {
                it.next();
                out.push('"');
            } else {
                return Some((out, &rest[i + 1..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

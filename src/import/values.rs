//! PgBouncer's value syntaxes, read into what pgvalve writes: counts, times in
//! seconds (PgBouncer's unit; "1.5" or "1500ms") into humantime strings, sizes, lists.
//!
//! Part of `import`; every reader refuses a malformed value naming its line.

use super::ini::{At, ImportError};

/// A non-negative whole number.
///
/// # Errors
/// Not a number, naming the setting and the line.
pub fn count(v: &str, setting: &str, at: &At) -> Result<u32, ImportError> {
    v.trim()
        .parse()
        .map_err(|_| ImportError::line(at, format!("{setting}: expected a whole number, found {v:?}")))
}

/// A time in PgBouncer's syntax (seconds, fractions allowed, or with a unit: us, ms, s, min,
/// h, d), in milliseconds.
///
/// # Errors
/// Anything else.
pub fn millis(v: &str, setting: &str, at: &At) -> Result<u64, ImportError> {
    let t = v.trim();
    let bad = || {
        ImportError::line(
            at,
            format!("{setting}: expected a time in seconds such as 15 or 2.5, found {v:?}"),
        )
    };
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "s" => 1000.0,
        "us" => 0.001,
        "ms" => 1.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err(bad()),
    };
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok((n * scale).round() as u64)
}

/// Milliseconds as a pgvalve duration string: "15s", "1500ms", "0s".
pub fn duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A comma-separated list, trimmed, empty items dropped.
pub fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A database or user name as written in `[databases]` / `[users]`: bare, or SQL-quoted
/// (`"my-db"`, `""` for a quote inside).
pub fn name(key: &str) -> String {
    match key.strip_prefix('"').and_then(|k| k.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => key.to_string(),
    }
}

/// Value shown in a note: secrets are never repeated.
pub fn shown(key: &str, value: &str) -> String {
    if key.contains("password") {
        "<secret>".to_string()
    } else {
        value.to_string()
    }
}

/// A file a setting names, as PgBouncer looks for it: relative to the working directory, else
/// to the ini file's directory `ini_dir`.
pub fn located(value: &str, ini_dir: &std::path::Path) -> std::path::PathBuf {
    let p = std::path::PathBuf::from(value.trim());
    if p.is_relative() && !p.exists() {
        ini_dir.join(p)
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> At {
        At {
            file: "f".into(),
            line: 3,
        }
    }

    #[test]
    fn times_in_seconds_and_units() {
        assert_eq!(millis("15", "x", &at()).unwrap(), 15_000);
        assert_eq!(millis("2.5", "x", &at()).unwrap(), 2_500);
        assert_eq!(millis("1500ms", "x", &at()).unwrap(), 1_500);
        assert_eq!(millis("2min", "x", &at()).unwrap(), 120_000);
        let e = millis("soon", "query_timeout", &at()).unwrap_err().to_string();
        assert!(e.starts_with("f:3: query_timeout"), "{e}");
        assert_eq!(duration(15_000), "15s");
        assert_eq!(duration(1_500), "1500ms");
    }

    #[test]
    fn names_and_lists() {
        assert_eq!(name("\"my-db\""), "my-db");
        assert_eq!(name("app"), "app");
        assert_eq!(list("a, b,,c "), ["a", "b", "c"]);
        assert_eq!(shown("password", "hunter2"), "<secret>");
    }
}

//! Finds statements that need a database to themselves, in SQL text a client sends (Query
//! and Parse): `DROP DATABASE x`, `ALTER DATABASE x RENAME TO ...` or `SET TABLESPACE ...`,
//! and `CREATE DATABASE ... TEMPLATE x` (x is template1 when no TEMPLATE is named).
//! PostgreSQL refuses each while another session is connected to x.
//!
//! Part of the client session, in both pool modes: the relay raises a hold on x (see
//! [`crate::dbgate`]) before it forwards such a statement. A look at the first word comes
//! first ([`might_need_database`], no allocation); only text starting with DROP, ALTER or
//! CREATE is lexed, and only its first statement (PostgreSQL runs these statements only on
//! their own).

use super::sql::{Lexer, Tok};

/// A statement that needs a database to itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DatabaseNeed {
    /// Which statement: `DROP DATABASE`, `ALTER DATABASE` or `CREATE DATABASE`.
    pub(crate) statement: &'static str,
    /// The database (on the server) it needs: dropped, renamed or moved, or copied.
    pub(crate) dbname: String,
}

/// PostgreSQL's default template.
const DEFAULT_TEMPLATE: &str = "template1";

/// Options of CREATE DATABASE (or their last word) that a value follows: a TEMPLATE right
/// after one of them is that value, not the option.
const VALUED_OPTIONS: &[&str] = &[
    "OWNER",
    "TEMPLATE",
    "ENCODING",
    "STRATEGY",
    "LOCALE",
    "LC_COLLATE",
    "LC_CTYPE",
    "BUILTIN_LOCALE",
    "ICU_LOCALE",
    "ICU_RULES",
    "LOCALE_PROVIDER",
    "COLLATION_VERSION",
    "TABLESPACE",
    "ALLOW_CONNECTIONS",
    "LIMIT",
    "IS_TEMPLATE",
    "OID",
];

/// Cheap pre-check, no allocation: whether the first word of `sql` (after whitespace and
/// comments) is DROP, ALTER or CREATE, in any case.
#[inline]
pub(crate) fn might_need_database(sql: &[u8]) -> bool {
    let word = super::sql::first_word(sql);
    [&b"drop"[..], b"alter", b"create"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
}

/// The database the first statement of `sql` needs to itself, if it is one of those in the
/// module doc.
pub(crate) fn database_needed(sql: &str) -> Option<DatabaseNeed> {
    let mut lx = Lexer::new(sql);
    let first = word(lx.next()?)?;
    if word(lx.next()?)? != "DATABASE" {
        return None;
    }
    let (statement, dbname) = match first.as_str() {
        "DROP" => {
            let mut t = lx.next()?;
            if matches!(&t, Tok::Word(w) if w == "IF") {
                lx.next();
                t = lx.next()?;
            }
            ("DROP DATABASE", name(t)?)
        }
        "ALTER" => {
            let n = name(lx.next()?)?;
            match word(lx.next()?)?.as_str() {
                "RENAME" => {}
                "SET" if word(lx.next()?)? == "TABLESPACE" => {}
                _ => return None,
            }
            ("ALTER DATABASE", n)
        }
        "CREATE" => {
            name(lx.next()?)?;
            ("CREATE DATABASE", template(&mut lx))
        }
        _ => return None,
    };
    Some(DatabaseNeed { statement, dbname })
}

/// The TEMPLATE of CREATE DATABASE's options, from the lexer's position (template1 when none,
/// or DEFAULT, is named).
fn template(lx: &mut Lexer<'_>) -> String {
    // Whether the last token was an option name that takes a value, or `=`.
    let mut value_next = false;
    while let Some(t) = lx.next() {
        match t {
            Tok::Semicolon => break,
            Tok::Word(w) if w == "TEMPLATE" && !value_next => {
                let mut v = lx.next();
                if matches!(v, Some(Tok::Other(b'='))) {
                    v = lx.next();
                }
                return match v {
                    Some(Tok::Word(w)) if w == "DEFAULT" => DEFAULT_TEMPLATE.into(),
                    Some(Tok::Str(s)) => s,
                    Some(t) => name(t).unwrap_or_else(|| DEFAULT_TEMPLATE.into()),
                    None => DEFAULT_TEMPLATE.into(),
                };
            }
            Tok::Word(w) => value_next = !value_next && VALUED_OPTIONS.contains(&w.as_str()),
            Tok::Other(b'=') => value_next = true,
            _ => value_next = false,
        }
    }
    DEFAULT_TEMPLATE.into()
}

fn word(t: Tok) -> Option<String> {
    match t {
        Tok::Word(w) => Some(w),
        _ => None,
    }
}

/// An identifier as PostgreSQL reads it: unquoted ones folded to lower case, quoted ones
/// as written.
fn name(t: Tok) -> Option<String> {
    match t {
        Tok::Word(w) => Some(w.to_ascii_lowercase()),
        Tok::Quoted(q) if !q.is_empty() => Some(q),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(sql: &str) -> Option<(&'static str, String)> {
        assert!(
            might_need_database(sql.as_bytes()),
            "the pre-check lets {sql:?} through"
        );
        database_needed(sql).map(|n| (n.statement, n.dbname))
    }

    #[test]
    fn finds_the_database_each_statement_needs() {
        let cases = [
            ("DROP DATABASE test_app", "DROP DATABASE", "test_app"),
            ("drop database \"test_app\"", "DROP DATABASE", "test_app"),
            ("DROP DATABASE IF EXISTS Test_App", "DROP DATABASE", "test_app"),
            (
                "DROP DATABASE \"Mixed \"\"Case\"\"\" WITH (FORCE)",
                "DROP DATABASE",
                "Mixed \"Case\"",
            ),
            ("  /* django */ Drop   Database x (force);", "DROP DATABASE", "x"),
            ("-- c\nDROP DATABASE tést", "DROP DATABASE", "tést"),
            ("ALTER DATABASE old RENAME TO new", "ALTER DATABASE", "old"),
            ("alter database \"Old\" set tablespace ts", "ALTER DATABASE", "Old"),
            ("CREATE DATABASE test_app", "CREATE DATABASE", "template1"),
            (
                "CREATE DATABASE \"test_app_1\" WITH TEMPLATE \"test_app\"",
                "CREATE DATABASE",
                "test_app",
            ),
            (
                "create database c template = Tmpl encoding 'UTF8'",
                "CREATE DATABASE",
                "tmpl",
            ),
            ("CREATE DATABASE c TEMPLATE 'quoted' ", "CREATE DATABASE", "quoted"),
            (
                "CREATE DATABASE c OWNER template TEMPLATE src",
                "CREATE DATABASE",
                "src",
            ),
            ("CREATE DATABASE c OWNER = template", "CREATE DATABASE", "template1"),
            ("CREATE DATABASE c TEMPLATE DEFAULT", "CREATE DATABASE", "template1"),
            (
                "CREATE DATABASE c WITH CONNECTION LIMIT = -1 TEMPLATE template0",
                "CREATE DATABASE",
                "template0",
            ),
        ];
        for (sql, statement, db) in cases {
            assert_eq!(need(sql), Some((statement, db.to_string())), "{sql}");
        }
    }

    #[test]
    fn other_statements_need_no_database() {
        for sql in [
            "DROP TABLE database",
            "ALTER DATABASE x SET search_path = a",
            "ALTER DATABASE x OWNER TO bob",
            "CREATE TABLE t (x int)",
            "CREATE DATABASE",
            "DROP DATABASE",
            "DROP DATABASE 'x'",
            "alter table t add column database int",
        ] {
            assert_eq!(need(sql), None, "{sql}");
        }
        for sql in [
            "SELECT 'DROP DATABASE x'",
            "select 1; DROP DATABASE x",
            "/* DROP DATABASE x */ SELECT 1",
            "INSERT INTO t VALUES (1)",
            "dropped",
            "",
            "   ",
            "-- DROP DATABASE x",
        ] {
            assert!(!might_need_database(sql.as_bytes()), "{sql}");
        }
    }
}

//! Tests of [`super`] (the session-state lexer): what pins, what is tracked, the prefilters.

use super::session_state_change as f;

#[test]
fn detects_session_state() {
    for sql in [
        "set statement_timeout to 5",
        "SET SESSION work_mem = '1MB'",
        "LISTEN chan",
        "SELECT pg_advisory_lock(1)",
        "select PG_TRY_ADVISORY_LOCK (1, 2)",
        "SET SESSION statement_timeout = 1",
        "SELECT set_config('a.b', 'c', false)",
        "SELECT set_config('a.b', 'c', true OR false)",
        "SELECT set_config('a.b', f(1, true), is_local)",
        "SET app.tenant = 5",
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
fn tracked_parameters_are_read_back_not_pinned() {
    use super::{session_effect as e, Effect};
    let extra = vec!["STATEMENT_TIMEOUT".to_string(), "APP.TENANT".to_string()];
    let track = Effect {
        track: true,
        ..Effect::default()
    };
    for sql in [
        "SET search_path = a",
        "set search_path to \"$user\", public",
        "SET SESSION search_path TO DEFAULT",
        "RESET search_path",
        "SELECT set_config('search_path', 'x', false)",
        "SELECT pg_catalog.set_config('search_path', $1, false)",
        "SET statement_timeout = '5s'",
        "SET app.tenant = 5",
        "select set_config('app.tenant', '7', false)",
        "RESET app.tenant",
        "SET search_path = a; SELECT 1",
    ] {
        assert_eq!(e(sql, &extra), track, "{sql}");
    }
    let reset_all = e("RESET ALL", &extra);
    assert!(reset_all.track && reset_all.reset_all && reset_all.pin.is_none());
    for sql in [
        "SET LOCAL search_path = a",
        "SELECT set_config('search_path', 'x', true)",
        "SELECT set_config('a.b', 'c', true)",
        "SELECT set_config('work_mem', pg_catalog.concat('6', 'MB'), TRUE)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = a AS 'SELECT 1'",
        "ALTER ROLE x SET search_path = a",
    ] {
        assert_eq!(e(sql, &extra), Effect::default(), "{sql}");
    }
    // Beyond search_path, only the configured ones.
    assert_eq!(e("SET statement_timeout = 1", &[]).pin, Some("SET"));
    assert_eq!(e("SET app.other = 1", &extra).pin, Some("SET"));
    assert_eq!(e("SET search_path = a; SET work_mem = 1", &extra).pin, Some("SET"));
    assert!(e("SET search_path = a; SET work_mem = 1", &extra).track);
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

#[test]
fn a_trailing_comment_is_not_scanned_but_statements_before_it_are() {
    use super::{code_part, might_change_session as pre};
    let tagged = "SELECT abalance FROM t WHERE aid = 1 /*action='pay',controller='checkout',route='%2Fapi%2Fset%2F',traceparent='00-5bd6-c532-01'*/";
    assert_eq!(
        code_part(tagged.as_bytes()),
        &b"SELECT abalance FROM t WHERE aid = 1 "[..]
    );
    // The tags' "set" is not a statement; a real SET before the comment is still seen.
    assert!(!pre(code_part(tagged.as_bytes())));
    let set = "SET search_path = a /*route='/x/'*/ ;  ";
    assert!(pre(code_part(set.as_bytes())));
    // Nested comments: everything from the last `/*` on is comment.
    let nested = "SET x = 1 /* a /* b */ c */";
    assert_eq!(code_part(nested.as_bytes()), &b"SET x = 1 /* a "[..]);
    // A `/*` in a string followed by a line comment that ends in `*/`: all scanned.
    for sql in [
        "SELECT '/*'; SET x = 1; -- */",
        "SELECT '/*'; SET x = 1; --*/\n",
        "SELECT 1 /*- x --*/",
    ] {
        assert_eq!(code_part(sql.as_bytes()), sql.as_bytes(), "{sql}");
    }
    // No trailing comment, or an unfinished one: all scanned.
    for sql in ["SELECT 1", "SELECT 1 /* x", "", "*/", "SELECT '*/'"] {
        assert_eq!(code_part(sql.as_bytes()), sql.as_bytes(), "{sql}");
    }
}

#[test]
fn query_text_is_the_sql_of_a_query_or_parse_body() {
    use super::query_text;
    use crate::protocol::tags::frontend::{PARSE, QUERY};
    assert_eq!(query_text(QUERY, b"SELECT 1\0"), b"SELECT 1");
    assert_eq!(query_text(PARSE, b"s1\0SELECT $1\0\0\x01\0\0\0\x17"), b"SELECT $1");
    assert_eq!(query_text(PARSE, b"no-nul"), b"no-nul");
    assert_eq!(query_text(QUERY, b"unterminated"), b"unterminated");
}

#[test]
fn the_first_word_skips_blanks_and_nested_comments() {
    use super::first_word;
    assert_eq!(first_word(b"  LISTEN a"), b"LISTEN");
    assert_eq!(first_word(b"-- x\n/* a /* b */ DROP */ create table"), b"create");
    assert_eq!(first_word(b"/* open"), b"");
    assert_eq!(first_word(b"(SELECT 1)"), b"");
    assert_eq!(first_word(b""), b"");
}

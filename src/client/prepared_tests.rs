//! Unit tests of the statement tracker: shared statements by text and shape, the order of
//! answers, the messages it builds (no I/O).

use super::registry::{shape_of, with_described_types};
use super::responses::CACHED_PLAN_CHANGED;
use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// ParameterDescription with these type OIDs.
fn params(oids: &[u32]) -> Vec<u8> {
    let mut b = (oids.len() as u16).to_be_bytes().to_vec();
    for o in oids {
        b.extend_from_slice(&o.to_be_bytes());
    }
    msg(backend::PARAMETER_DESCRIPTION, &b)
}

/// RowDescription of one column `v` of type `oid`, from table `table`.
fn row(table: u32, oid: u32) -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    b.extend_from_slice(b"v\0");
    b.extend_from_slice(&table.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&oid.to_be_bytes());
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(backend::ROW_DESCRIPTION, &b)
}

const INT4: u32 = 23;
const TEXT: u32 = 25;

#[test]
fn same_text_and_shape_share_a_statement_and_a_changed_shape_does_not() {
    let r = Registry::default();
    let def = Bytes::from_static(b"insert into t values ($1)\0\0\0");
    let int = shape_of(&params(&[INT4]), &msg(backend::NO_DATA, b""));
    let text = shape_of(&params(&[TEXT]), &msg(backend::NO_DATA, b""));
    let (a, b, c) = (r.fresh_id(), r.fresh_id(), r.fresh_id());
    let (first, server_def) = r.resolve(0, &def, a, int.clone(), 1);
    assert_eq!(first, a);
    assert_eq!(
        &server_def[..],
        b"insert into t values ($1)\0\0\x01\0\0\0\x17",
        "parameter types as described"
    );
    assert_eq!(r.resolve(0, &def, b, int.clone(), 1).0, a, "same text, same shape");
    assert_eq!(
        r.resolve(0, &def, c, text.clone(), 1).0,
        c,
        "the table changed: a new one"
    );
    assert!(r.known(0, &def));
    let e = r.fresh_id();
    assert_eq!(r.resolve(1, &def, e, text.clone(), 1).0, e, "another pool: its own");
    // A plan that changed result type: its clients are told so where no copy is prepared,
    // until a fresh Parse describes as it did.
    r.mark_changed(a);
    assert!(r.changed(a));
    assert_eq!(r.resolve(0, &def, r.fresh_id(), int, 1).0, a);
    assert!(!r.changed(a));
    assert_eq!(r.live(), 3);
}

#[test]
fn a_table_made_again_alike_describes_alike() {
    let before = shape_of(&params(&[]), &row(16384, INT4));
    assert_eq!(before, shape_of(&params(&[]), &row(16999, INT4)));
    assert_ne!(before, shape_of(&params(&[]), &row(16384, TEXT)));
    // Malformed answers are kept as they came (never matched by accident).
    assert_eq!(&shape_of(b"t", b"T\0")[..], b"tT\0");
    let def = Bytes::from_static(b"select $1\0\0\0");
    assert_eq!(with_described_types(&def, b"t\0\0"), def);
}

#[test]
fn statements_no_client_uses_die_and_their_copies_are_closed() {
    let r = Registry::default();
    let def = Bytes::from_static(b"select 1\0\0\0");
    let shape = shape_of(&params(&[]), &row(0, INT4));
    let a = r.fresh_id();
    r.resolve(0, &def, a, shape.clone(), 1);
    r.resolve(0, &def, r.fresh_id(), shape, 1);
    let mut conn = ServerStatements::default();
    conn.insert(a, 10);
    conn.insert(99, 10);
    r.sweep(&mut conn);
    r.release([a]);
    r.sweep(&mut conn);
    assert!(!conn.has_closing(), "another client still uses it");
    r.release([a]);
    assert!(!r.known(0, &def));
    r.sweep(&mut conn);
    assert_eq!(conn.take_closing(), vec![a]);
    assert!(conn.touch(99).is_some(), "only the dead statement is closed");
    // A connection that was empty when a statement died has nothing to close.
    let mut fresh = ServerStatements::default();
    r.sweep(&mut fresh);
    assert!(!fresh.has_closing());
}

#[test]
fn synthetic_answers_wait_their_turn() {
    let mut conn = ServerStatements::default();
    let mut r = Responses::default();
    assert!(r.push(Expect::Bind(Some(1)), &mut conn).is_empty());
    // A Close behind an outstanding Bind is answered after BindComplete.
    assert!(r.push(Expect::Synthetic(CLOSE_COMPLETE), &mut conn).is_empty());
    r.push(Expect::Sync, &mut conn);
    assert_eq!(
        r.on_server(b'2', b"", false, &mut conn),
        OnServer::Forward(vec![CLOSE_COMPLETE])
    );
    assert_eq!(r.on_server(b'Z', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
    // With nothing ahead, the answer is due at once.
    assert_eq!(
        r.push(Expect::Synthetic(CLOSE_COMPLETE), &mut conn),
        vec![CLOSE_COMPLETE]
    );
}

#[test]
fn injected_parse_is_swallowed_and_errors_skip_to_sync() {
    let mut conn = ServerStatements::default();
    conn.insert(7, 10);
    conn.insert(8, 10);
    let mut r = Responses::default();
    r.push(Expect::SwallowParse(7), &mut conn);
    r.push(Expect::Probe { id: 7, forward: false }, &mut conn);
    r.push(Expect::Bind(Some(7)), &mut conn);
    r.push(Expect::Execute(Some(7)), &mut conn);
    r.push(Expect::SwallowParse(8), &mut conn);
    r.push(Expect::Synthetic(CLOSE_COMPLETE), &mut conn);
    r.push(Expect::Sync, &mut conn);
    assert_eq!(r.on_server(b'1', b"", false, &mut conn), OnServer::Swallow(vec![]));
    let (p, d) = (params(&[INT4]), row(1, INT4));
    assert_eq!(r.on_server(b't', &p, false, &mut conn), OnServer::Swallow(vec![]));
    assert_eq!(r.on_server(b'T', &d, false, &mut conn), OnServer::Swallow(vec![]));
    assert_eq!(r.probed, vec![(7, shape_of(&p, &d))]);
    assert_eq!(r.on_server(b'2', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(r.on_server(b'D', b"", false, &mut conn), OnServer::Forward(vec![]));
    // The Execute fails: the injected Parse of 8 and the synthetic answer are skipped.
    assert_eq!(r.on_server(b'E', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert!(
        conn.touch(7).is_some() && conn.touch(8).is_none(),
        "statement 8 was never prepared"
    );
    assert_eq!(r.on_server(b'Z', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
}

#[test]
fn requests_sent_after_an_error_arrived_get_no_answer_until_sync() {
    let mut conn = ServerStatements::default();
    let mut r = Responses::default();
    r.push(Expect::Bind(None), &mut conn);
    assert_eq!(r.on_server(b'E', b"", false, &mut conn), OnServer::Forward(vec![]));
    // The rest of the client's batch comes after the error: the server skips it.
    conn.insert(5, 10);
    r.push(Expect::SwallowParse(5), &mut conn);
    r.push(Expect::SwallowClose(4), &mut conn);
    assert!(r.push(Expect::Synthetic(CLOSE_COMPLETE), &mut conn).is_empty());
    assert!(conn.touch(5).is_none(), "the injected Parse was skipped");
    assert_eq!(conn.take_closing(), vec![4], "the skipped Close is done later");
    r.push(Expect::Sync, &mut conn);
    assert_eq!(r.on_server(b'Z', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty() && r.is_idle());
}

#[test]
fn syncs_sent_during_copy_in_get_no_answer() {
    let mut conn = ServerStatements::default();
    let mut r = Responses::default();
    // Bind, Execute, Sync (sent before the server said COPY), data, CopyDone, Sync, Close, Sync.
    r.push(Expect::Bind(None), &mut conn);
    r.push(Expect::Execute(None), &mut conn);
    r.push(Expect::Sync, &mut conn);
    assert_eq!(r.on_server(b'2', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(r.on_server(b'G', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(r.ignored_syncs, 1);
    r.push(Expect::Sync, &mut conn); // during COPY IN: ignored by the server too
    assert_eq!(r.ignored_syncs, 2);
    r.push(Expect::CopyEnd, &mut conn);
    r.push(Expect::Sync, &mut conn);
    r.push(Expect::Synthetic(CLOSE_COMPLETE), &mut conn);
    r.push(Expect::Sync, &mut conn);
    assert_eq!(r.on_server(b'C', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(
        r.on_server(b'Z', b"", false, &mut conn),
        OnServer::Forward(vec![CLOSE_COMPLETE])
    );
    assert_eq!(r.on_server(b'Z', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
}

#[test]
fn stale_plan_forgets_the_copy_and_the_statement_is_not_offered_again() {
    let mut conn = ServerStatements::default();
    conn.insert(3, 10);
    let mut r = Responses::default();
    r.push(Expect::Bind(Some(3)), &mut conn);
    r.push(Expect::Sync, &mut conn);
    r.on_server(b'E', b"", true, &mut conn);
    assert!(conn.touch(3).is_none());
    assert_eq!(r.stale, vec![3]);
    assert_eq!(conn.take_stale(3), Some(3), "closed before it is prepared again");
}

/// One client message handled by `st` on `conn`: (to the server, to the client).
fn handle(st: &mut ClientStatements, r: &mut Responses, conn: &mut ServerStatements, m: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut server, mut client) = (BytesMut::new(), BytesMut::new());
    let mut out = Outputs {
        server: &mut server,
        client: &mut client,
        responses: r,
        conn,
    };
    st.on_client(Bytes::copy_from_slice(m), &mut out);
    (server.to_vec(), client.to_vec())
}

#[test]
fn every_parse_reaches_the_server_and_its_description_picks_the_shared_statement() {
    let reg = Arc::new(Registry::default());
    let mut conn = ServerStatements::default();
    let def: &[u8] = b"select $1::int\0\0\0";
    let (p, d) = (params(&[INT4]), row(0, INT4));
    let (mut ids, mut users) = (Vec::new(), Vec::new());
    for client in 0..2 {
        let mut st = ClientStatements::new(reg.clone(), 10, 0);
        let mut r = Responses::default();
        let parse = msg(frontend::PARSE, &[b"s\0", def].concat());
        let (server, _) = handle(&mut st, &mut r, &mut conn, &parse);
        let id = st.by_name[&b"s"[..]].id;
        let mut expected = BytesMut::new();
        parse_message(id, def, &mut expected);
        assert_eq!(
            server,
            expected.to_vec(),
            "client {client}: the Parse goes to the server"
        );
        // The client's own Describe is the one whose answer is learnt: nothing is added.
        let (server, _) = handle(&mut st, &mut r, &mut conn, &msg(frontend::DESCRIBE, b"Ss\0"));
        let mut expected = BytesMut::new();
        describe_message(id, &mut expected);
        assert_eq!(server, expected.to_vec());
        handle(&mut st, &mut r, &mut conn, &msg(frontend::SYNC, b""));
        assert_eq!(r.on_server(b'1', b"", false, &mut conn), OnServer::Forward(vec![]));
        assert_eq!(r.on_server(b't', &p, false, &mut conn), OnServer::Forward(vec![]));
        assert_eq!(r.on_server(b'T', &d, false, &mut conn), OnServer::Forward(vec![]));
        r.on_server(b'Z', b"", false, &mut conn);
        st.settle(&mut r, &mut conn);
        ids.push((id, st.by_name[&b"s"[..]].id));
        users.push(st);
    }
    let (first, second) = (ids[0], ids[1]);
    assert_eq!(first.0, first.1, "the first Parse became the shared statement");
    assert_ne!(second.0, first.0);
    assert_eq!(second.1, first.0, "the second joined it");
    assert_eq!(conn.take_closing(), vec![second.0], "its own copy is closed");
    assert_eq!(conn.touch(first.0), Some(first.0));
}

#[test]
fn known_parses_are_answered_without_a_server_and_parsed_when_used() {
    let reg = Arc::new(Registry::default());
    let def = Bytes::from_static(b"SELECT 1\0\0\0");
    let mut st = ClientStatements::new(reg.clone(), 10, 0);
    let mut batch = BytesMut::new();
    batch.put_slice(b"P\0\0\0\x12s1\0SELECT 1\0\0\0");
    batch.put_slice(b"S\0\0\0\x04");
    let mut answer = BytesMut::new();
    // Unknown to any server yet: the server must see it.
    assert!(!st.answer_known_parses(&mut batch.clone(), &mut answer));
    let shared = reg.fresh_id();
    reg.resolve(0, &def, shared, shape_of(&params(&[]), &row(0, INT4)), 1);
    let mut buf = batch.clone();
    assert!(st.answer_known_parses(&mut buf, &mut answer));
    assert!(buf.is_empty());
    assert_eq!(&answer[..], b"1\0\0\0\x04Z\0\0\0\x05I");
    let s1 = st.by_name[&b"s1"[..]].clone();
    assert_ne!(s1.id, shared, "parsed afresh when first used");
    let (mut r, mut conn) = (Responses::default(), ServerStatements::default());
    let bind = msg(frontend::BIND, b"\0s1\0\0\0\0\0\0\0");
    let (server, _) = handle(&mut st, &mut r, &mut conn, &bind);
    let mut expected = BytesMut::new();
    parse_message(s1.id, &def, &mut expected);
    describe_message(s1.id, &mut expected);
    assert!(server.starts_with(&expected), "Parse and Describe before the Bind");
    // Anything else in the batch (here a Bind) needs the server.
    let mut other = BytesMut::from(&b"B\0\0\0\x0c\0s1\0\0\0\0\0S\0\0\0\x04"[..]);
    assert!(!st.answer_known_parses(&mut other, &mut answer));
}

#[test]
fn a_request_sent_to_fail_gets_postgresqls_cached_plan_error() {
    let len = i32::from_be_bytes(CACHED_PLAN_CHANGED[1..5].try_into().unwrap());
    assert_eq!(len as usize + 1, CACHED_PLAN_CHANGED.len());
    let fields = &CACHED_PLAN_CHANGED[5..];
    for field in [&b"C0A000\0"[..], b"RRevalidateCachedQuery\0"] {
        assert!(
            fields.windows(field.len()).any(|w| w == field),
            "asyncpg knows it by its routine"
        );
    }
    let mut conn = ServerStatements::default();
    let mut r = Responses::default();
    r.push(Expect::Fail, &mut conn);
    r.push(Expect::Execute(None), &mut conn);
    r.push(Expect::Sync, &mut conn);
    // The server's own error (no such statement) is replaced; the Execute is skipped.
    assert_eq!(
        r.on_server(b'E', b"", false, &mut conn),
        OnServer::Swallow(vec![CACHED_PLAN_CHANGED])
    );
    assert_eq!(r.on_server(b'Z', b"", false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
}

#[test]
fn messages_encode() {
    let mut b = BytesMut::new();
    parse_message(5, b"SELECT 1\0\0\0", &mut b);
    assert_eq!(&b[..], b"P\0\0\0\x15pgv_5\0SELECT 1\0\0\0");
    let mut b = BytesMut::new();
    close_message(5, &mut b);
    assert_eq!(&b[..], b"C\0\0\0\x0bSpgv_5\0");
}

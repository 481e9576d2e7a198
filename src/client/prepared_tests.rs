//! Unit tests of the statement tracker: the proxy-wide ids, the order of answers, the
//! messages it builds (no I/O).

use super::*;

#[test]
fn registry_shares_ids_for_identical_definitions() {
    let r = Registry::default();
    let a = r.id_for(&Bytes::from_static(b"SELECT 1\0\0\0"));
    let b = r.id_for(&Bytes::from_static(b"SELECT 2\0\0\0"));
    assert_ne!(a, b);
    assert_eq!(r.id_for(&Bytes::from_static(b"SELECT 1\0\0\0")), a);
}

#[test]
fn synthetic_answers_wait_their_turn() {
    let mut conn = ServerStatements::default();
    let mut r = Responses::default();
    assert!(r.push(Expect::Bind(Some(1))).is_empty());
    // A skipped Parse behind an outstanding Bind is answered after BindComplete.
    assert!(r.push(Expect::Synthetic(PARSE_COMPLETE)).is_empty());
    r.push(Expect::Sync);
    assert_eq!(
        r.on_server(b'2', false, &mut conn),
        OnServer::Forward(vec![PARSE_COMPLETE])
    );
    assert_eq!(r.on_server(b'Z', false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
    // With nothing ahead, the answer is due at once.
    assert_eq!(r.push(Expect::Synthetic(CLOSE_COMPLETE)), vec![CLOSE_COMPLETE]);
}

#[test]
fn injected_parse_is_swallowed_and_errors_skip_to_sync() {
    let mut conn = ServerStatements::default();
    conn.insert(7, 10);
    conn.insert(8, 10);
    let mut r = Responses::default();
    r.push(Expect::SwallowParse(7));
    r.push(Expect::Bind(Some(7)));
    r.push(Expect::Execute(Some(7)));
    r.push(Expect::SwallowParse(8));
    r.push(Expect::Synthetic(PARSE_COMPLETE));
    r.push(Expect::Sync);
    assert_eq!(r.on_server(b'1', false, &mut conn), OnServer::Swallow(vec![]));
    assert_eq!(r.on_server(b'2', false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(r.on_server(b'D', false, &mut conn), OnServer::Forward(vec![]));
    // The Execute fails: the injected Parse of 8 and the synthetic answer are skipped.
    assert_eq!(r.on_server(b'E', false, &mut conn), OnServer::Forward(vec![]));
    assert!(conn.touch(7) && !conn.touch(8), "statement 8 was never prepared");
    assert_eq!(r.on_server(b'Z', false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
}

#[test]
fn syncs_sent_during_copy_in_get_no_answer() {
    let mut conn = ServerStatements::default();
    let mut r = Responses::default();
    // Bind, Execute, Sync (sent before the server said COPY), data, CopyDone, Sync, Close, Sync.
    r.push(Expect::Bind(None));
    r.push(Expect::Execute(None));
    r.push(Expect::Sync);
    assert_eq!(r.on_server(b'2', false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(r.on_server(b'G', false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(r.ignored_syncs, 1);
    r.push(Expect::Sync); // during COPY IN: ignored by the server too
    assert_eq!(r.ignored_syncs, 2);
    r.push(Expect::CopyEnd);
    r.push(Expect::Sync);
    r.push(Expect::Synthetic(CLOSE_COMPLETE));
    r.push(Expect::Sync);
    assert_eq!(r.on_server(b'C', false, &mut conn), OnServer::Forward(vec![]));
    assert_eq!(
        r.on_server(b'Z', false, &mut conn),
        OnServer::Forward(vec![CLOSE_COMPLETE])
    );
    assert_eq!(r.on_server(b'Z', false, &mut conn), OnServer::Forward(vec![]));
    assert!(r.is_empty());
}

#[test]
fn stale_plan_forgets_the_statement() {
    let mut conn = ServerStatements::default();
    conn.insert(3, 10);
    let mut r = Responses::default();
    r.push(Expect::Bind(Some(3)));
    r.push(Expect::Sync);
    r.on_server(b'E', true, &mut conn);
    assert!(!conn.touch(3));
}

#[test]
fn known_parses_are_answered_without_a_server() {
    let reg = Arc::new(Registry::default());
    let def = Bytes::from_static(b"SELECT 1\0\0\0");
    let mut st = ClientStatements::new(reg.clone(), 10);
    let mut batch = BytesMut::new();
    batch.put_slice(b"P\0\0\0\x12s1\0SELECT 1\0\0\0");
    batch.put_slice(b"S\0\0\0\x04");
    let mut answer = BytesMut::new();
    // Unknown to any server yet: the server must see it.
    let id = reg.id_for(&def);
    assert!(!st.answer_known_parses(&mut batch.clone(), &mut answer));
    reg.mark_accepted(id);
    let mut buf = batch.clone();
    assert!(st.answer_known_parses(&mut buf, &mut answer));
    assert!(buf.is_empty());
    assert_eq!(&answer[..], b"1\0\0\0\x04Z\0\0\0\x05I");
    assert_eq!(st.by_name[&b"s1"[..]].id, id);
    // Anything else in the batch (here a Bind) needs the server.
    let mut other = BytesMut::from(&b"B\0\0\0\x0c\0s1\0\0\0\0\0S\0\0\0\x04"[..]);
    assert!(!st.answer_known_parses(&mut other, &mut answer));
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

//! The relay's message handling run on arbitrary bytes, for the fuzz targets (`fuzz/`) and
//! the property tests: the same code the relay runs on a session's traffic, without sockets.

use super::*;

/// Runs the transaction-mode relay's handling of `client` bytes (statement tracking,
/// renaming, pins, rejection) and then of `server` bytes (answers, swallowed replies,
/// ParameterStatus), as one session would see them, `reads` bytes at a time.
pub fn transaction_traffic(client: &[u8], server: &[u8], reads: usize, reject: bool) {
    let registry = std::sync::Arc::new(super::super::prepared::Registry::default());
    let mut st = ClientStatements::new(registry, 3);
    let mut t = Tracker::new(b'I', true, None, false);
    let (mut responses, mut conn, mut reported) = (Responses::default(), ServerStatements::default(), Vec::new());
    let (mut c_out, mut s_out) = (BytesMut::new(), BytesMut::new());
    let reads = reads.max(1);
    let mut c_in = BytesMut::new();
    for chunk in client.chunks(reads) {
        c_in.extend_from_slice(chunk);
        let _ = st.answer_known_parses(&mut c_in, &mut s_out);
        let mut outs = Outputs {
            server: &mut c_out,
            client: &mut s_out,
            responses: &mut responses,
            conn: &mut conn,
        };
        if client_frames(&mut c_in, 1 << 16, &mut t, &mut st, &mut outs, reject).is_err() {
            break;
        }
    }
    let mut walk = MessageWalker::new(1 << 16);
    let mut s_in = BytesMut::new();
    for chunk in server.chunks(reads) {
        s_in.extend_from_slice(chunk);
        let r = server_messages(
            &mut s_in,
            &mut s_out,
            &mut walk,
            &mut t,
            &mut responses,
            &mut conn,
            &mut reported,
        );
        if r.is_err() {
            break;
        }
    }
    st.note_accepted(&mut responses);
    st.forget_all(&mut conn);
}

/// Runs the plain relay's header walk (session mode, or transaction mode without statement
/// tracking) on `bytes` as client and as server traffic, `reads` bytes at a time.
pub fn plain_traffic(bytes: &[u8], reads: usize) {
    let mut t = Tracker::new(b'I', true, None, true);
    let mut reported = Vec::new();
    let (mut cwalk, mut swalk) = (MessageWalker::new(1 << 16), MessageWalker::new(1 << 16));
    let (mut c_in, mut s_in) = (BytesMut::new(), BytesMut::new());
    for chunk in bytes.chunks(reads.max(1)) {
        c_in.extend_from_slice(chunk);
        s_in.extend_from_slice(chunk);
        let Ok(n) = t.scan_client(&mut cwalk, &c_in) else {
            return;
        };
        c_in.advance(n);
        let Ok(n) = t.scan_server(&mut swalk, &s_in, Some(&mut reported), true) else {
            return;
        };
        s_in.advance(n);
    }
}

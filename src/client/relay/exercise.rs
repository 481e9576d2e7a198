//! The relay's message handling run on arbitrary bytes, for the fuzz targets (`fuzz/`) and
//! the property tests: the same code the relay runs on a session's traffic, without sockets.

use bytes::{Buf, BytesMut};

use super::statements::{Statements, ToClient, ToServer, Tracked};
use super::tracker::Tracker;
use super::Reuse;
use crate::client::prepared::{ClientStatements, Registry, ServerStatements};
use crate::protocol::frame::MessageWalker;
use crate::protocol::tags::status;

/// Runs the transaction-mode relay's handling of `client` bytes (statement tracking,
/// renaming, pins, rejection) and then of `server` bytes (answers, swallowed replies,
/// ParameterStatus), as one session would see them, `reads` bytes at a time.
pub fn transaction_traffic(client: &[u8], server: &[u8], reads: usize, reject: bool) {
    let mut st = ClientStatements::new(std::sync::Arc::new(Registry::default()), 3, 0);
    let mut reuse = Reuse::default();
    let mut t = Tracker::new(status::IDLE, true, None, false);
    let mut reported = Vec::new();
    let mut s_out = BytesMut::new();
    let reads = reads.max(1);
    let (mut cwalk, mut swalk) = (MessageWalker::new(1 << 16), MessageWalker::new(1 << 16));
    let tracked = Tracked::new(&mut st, &mut reuse, ServerStatements::default(), reject, 1 << 16);
    let mut statements = Statements::Tracked(tracked);
    let mut c_in = BytesMut::new();
    for chunk in client.chunks(reads) {
        c_in.extend_from_slice(chunk);
        if let Statements::Tracked(tr) = &mut statements {
            let _ = tr.st.answer_known_parses(&mut c_in, &mut s_out);
        }
        let r = statements.client(&mut c_in, &mut cwalk, &mut t, &mut s_out);
        t.needs.clear(); // (no gates here: nothing to hold)
        match r {
            Ok(ToServer::Renamed(scratch)) => scratch.clear(), // as if sent
            Ok(ToServer::Scanned(_)) => {}
            Err(_) => break,
        }
    }
    let mut s_in = BytesMut::new();
    for chunk in server.chunks(reads) {
        s_in.extend_from_slice(chunk);
        let r = statements.server(&mut s_in, &mut s_out, &mut swalk, &mut t, Some(&mut reported));
        if r.is_err() {
            break;
        }
    }
    let mut conn = match statements {
        Statements::Tracked(tr) => tr.finish(),
        Statements::Plain => ServerStatements::default(),
    };
    st.forget_all(&mut conn);
}

/// Runs the plain relay's header walk (session mode, or transaction mode without statement
/// tracking) on `bytes` as client and as server traffic, `reads` bytes at a time.
pub fn plain_traffic(bytes: &[u8], reads: usize) {
    let mut t = Tracker::new(status::IDLE, true, None, true);
    let mut reported = Vec::new();
    let mut plain = Statements::Plain;
    let (mut cwalk, mut swalk) = (MessageWalker::new(1 << 16), MessageWalker::new(1 << 16));
    let (mut c_in, mut s_in, mut s_out) = (BytesMut::new(), BytesMut::new(), BytesMut::new());
    for chunk in bytes.chunks(reads.max(1)) {
        c_in.extend_from_slice(chunk);
        s_in.extend_from_slice(chunk);
        let r = plain.client(&mut c_in, &mut cwalk, &mut t, &mut s_out);
        t.needs.clear();
        let Ok(ToServer::Scanned(n)) = r else {
            return;
        };
        c_in.advance(n);
        let Ok(ToClient::Scanned(n)) = plain.server(&mut s_in, &mut s_out, &mut swalk, &mut t, Some(&mut reported))
        else {
            return;
        };
        s_in.advance(n);
    }
}

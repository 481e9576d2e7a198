//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and the property tests: each runs
//! one of the parsers the proxy runs on bytes from the network, on arbitrary input, exactly as
//! the proxy does. Beside the flow; not a stable API.

use bytes::{BufMut, BytesMut};

use crate::protocol::frame::{split_frame, MessageWalker, Walk};
use crate::protocol::{messages, startup, tags};

pub use crate::client::exercise::{plain_traffic, transaction_traffic};

/// The frame splitter and the header walker on `data`, split into reads at `cut`: the
/// splitter's frames never exceed the limit, the walker never claims more than it was given.
pub fn frames(data: &[u8], max: usize, cut: usize) {
    let mut buf = BytesMut::new();
    let cut = cut.min(data.len());
    for part in [&data[..cut], &data[cut..]] {
        buf.put_slice(part);
        while let Ok(Some(f)) = split_frame(&mut buf, max) {
            assert!(f.bytes.len() <= max.max(5));
        }
    }
    let mut w = MessageWalker::new(max);
    for part in [&data[..cut], &data[cut..]] {
        match w.scan(part, |t| t == tags::backend::READY_FOR_QUERY, |_, _| Walk::Continue) {
            Ok(n) => assert!(n <= part.len()),
            Err(_) => break,
        }
    }
}

/// The first packet of a session (startup, SSLRequest, GSSENCRequest, CancelRequest) and,
/// for a startup packet, everything the session reads from it (options included).
pub fn startup_packet(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(startup::InitialPacket::Startup(p))) = startup::split_initial(&mut buf, 10_000) {
        let _ = (p.user(), p.database(), p.application_name(), p.needs_negotiation());
        let _ = p.protocol_options();
        let _ = p.session_params().count();
        if let Some(o) = p.params.get("options") {
            let _ = crate::client::parse_options(o);
        }
    }
}

/// Every decoder of a single message body the proxy runs: the client's SASL messages (and
/// the SCRAM exchange on them, the key recovery of auth_query logins), the server's
/// ErrorResponse and login messages (the key-based SCRAM client on them), and auth_query's
/// verifier text.
pub fn message_bodies(tag: u8, body: &[u8]) {
    let mut b = BytesMut::with_capacity(body.len() + 5);
    b.put_u8(tag);
    b.put_i32((body.len() + 4) as i32);
    b.put_slice(body);
    let Ok(Some(f)) = split_frame(&mut b.clone(), usize::MAX >> 1) else {
        return;
    };
    let _ = messages::parse_server_error(&f);
    let _ = crate::server::parse_login_message(&f);
    if let Some((_, data)) = messages::sasl_initial_response(f.clone()) {
        crate::client::scram_exchange(&data, &data);
    }
    if let Some(data) = messages::sasl_response(f) {
        crate::client::scram_exchange(b"n,,n=u,r=abcdefghijklmnop", &data);
        let _ = crate::server::scram::client_key_of(b"n,,n=,r=a", "r=ab", &data, &[0; 32]);
        let mut keyed = crate::server::scram::KeyScram::new(crate::server::scram::ScramKeys {
            client_key: vec![1; 32],
            server_key: vec![2; 32],
            salt: vec![3; 16],
            iterations: 4096,
        });
        let _ = keyed.update(&data);
        let _ = keyed.finish(&data);
    }
    // What auth_query returns as a verifier.
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = text.parse::<crate::config::ScramVerifier>();
    }
}

/// The SQL classifiers run on Query and Parse text in transaction mode.
pub fn sql(text: &[u8]) {
    let _ = crate::client::sql_might_change_session(text);
    let s = String::from_utf8_lossy(text);
    let _ = crate::client::sql_session_state_change(&s);
}

//! Property tests of every parser the proxy runs on bytes from the network (stable Rust, in
//! the normal test run): none panics on arbitrary input, lengths are bounded by the limit,
//! and the relay's framing re-frames any concatenation of valid messages however it is split
//! across reads.

use bytes::{BufMut, BytesMut};
use pgvalve::protocol::frame::{split_frame, MessageWalker, Walk, HEADER_LEN};
use pgvalve::protocol::{messages, startup};
use proptest::prelude::*;

/// A valid message: type byte, length, body.
fn message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(b"DZCTEQPBSHXdcfNIn123tsKR".to_vec()),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(tag, body)| {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            m.extend_from_slice(&body);
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn split_frame_never_panics_and_respects_the_limit(bytes in prop::collection::vec(any::<u8>(), 0..64), max in 0usize..100) {
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(f)) = split_frame(&mut buf, max) {
            prop_assert!(f.bytes.len() <= max && f.bytes.len() >= HEADER_LEN);
        }
    }

    #[test]
    fn walker_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), max in 5usize..400, cut in 0usize..256) {
        let mut w = MessageWalker::new(max);
        let cut = cut.min(bytes.len());
        for part in [&bytes[..cut], &bytes[cut..]] {
            match w.scan(part, |t| t == b'Z', |_, _| Walk::Continue) {
                Ok(n) => prop_assert!(n <= part.len()),
                Err(_) => break,
            }
        }
    }

    #[test]
    fn split_frame_reframes_any_split(msgs in prop::collection::vec(message(), 1..12), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let stream: Vec<u8> = msgs.concat();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        points.push(stream.len());
        let (mut buf, mut got, mut at) = (BytesMut::new(), Vec::new(), 0);
        for p in points {
            buf.put_slice(&stream[at..p]);
            at = p;
            while let Some(f) = split_frame(&mut buf, 1 << 20).unwrap() {
                got.push(f.bytes.to_vec());
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn walker_forwards_every_byte_and_sees_inspected_messages_whole(msgs in prop::collection::vec(message(), 1..12), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        // As the relay does: append what was read, scan, forward the first n bytes, keep the rest.
        let stream: Vec<u8> = msgs.concat();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort_unstable();
        points.push(stream.len());
        let mut w = MessageWalker::new(1 << 20);
        let (mut buf, mut out, mut tags, mut whole_z, mut at) = (BytesMut::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for p in points {
            buf.put_slice(&stream[at..p]);
            at = p;
            let n = w
                .scan(&buf, |t| t == b'Z', |s, m| {
                    tags.push(s.tag);
                    if s.tag == b'Z' {
                        assert!(s.complete, "an inspected message is seen whole");
                        whole_z.push(m.to_vec());
                    }
                    Walk::Continue
                })
                .unwrap();
            out.extend_from_slice(&buf.split_to(n));
        }
        prop_assert_eq!(out, stream);
        prop_assert!(w.at_boundary() && buf.is_empty());
        // Every header is seen once, in order.
        let want_tags: Vec<u8> = msgs.iter().map(|m| m[0]).collect();
        prop_assert_eq!(tags, want_tags);
        let want_z: Vec<Vec<u8>> = msgs.iter().filter(|m| m[0] == b'Z').cloned().collect();
        prop_assert_eq!(whole_z, want_z);
    }

    #[test]
    fn startup_packet_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = startup::split_initial(&mut buf, 10_000);
    }

    #[test]
    fn decoded_messages_never_panic(body in prop::collection::vec(any::<u8>(), 0..200), tag in any::<u8>()) {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32((body.len() + 4) as i32);
        b.put_slice(&body);
        let f = split_frame(&mut b, 1 << 20).unwrap().unwrap();
        let _ = messages::parse_server_error(&f);
        let _ = messages::sasl_initial_response(f.clone());
        let _ = messages::sasl_response(f);
        pgvalve::fuzzing::message_bodies(tag, &body);
        pgvalve::fuzzing::sql(&body);
    }

    #[test]
    fn relay_message_handling_never_panics(
        client in prop::collection::vec(message(), 0..10),
        server in prop::collection::vec(message(), 0..10),
        noise in prop::collection::vec(any::<u8>(), 0..40),
        reads in 1usize..64,
        reject in any::<bool>(),
    ) {
        let (mut c, s) = (client.concat(), server.concat());
        pgvalve::fuzzing::transaction_traffic(&c, &s, reads, reject);
        c.extend_from_slice(&noise);
        pgvalve::fuzzing::transaction_traffic(&c, &noise, reads, reject);
        pgvalve::fuzzing::plain_traffic(&c, reads);
        pgvalve::fuzzing::frames(&c, 300, reads);
    }
}

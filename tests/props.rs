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

/// A client address and a destination of the same family (v4, or v6 with any address).
fn proxied_pair() -> impl Strategy<Value = (std::net::SocketAddr, std::net::SocketAddr)> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let v4 = (any::<[u8; 4]>(), any::<[u8; 4]>(), any::<u16>(), any::<u16>()).prop_map(|(a, b, p, q)| {
        (
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), q),
        )
    });
    let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>()).prop_map(|(a, b, p, q)| {
        (
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), q),
        )
    });
    prop_oneof![v4, v6]
}

/// A PROXY header of either version (v2 with `tlvs` bytes of TLVs after the addresses).
fn proxy_header_bytes((src, dst): (std::net::SocketAddr, std::net::SocketAddr), v2: bool, tlvs: &[u8]) -> Vec<u8> {
    use pgvalve::protocol::proxy_header::{encode_v1, encode_v2};
    if !v2 {
        return encode_v1(src, dst);
    }
    let mut h = encode_v2(src, dst);
    let len = u16::from_be_bytes([h[14], h[15]]) as usize + tlvs.len();
    h[14..16].copy_from_slice(&(len as u16).to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes (and arbitrary bytes after either signature): no panic, a header never
    /// longer than the buffer or the bound, and `wanted` always asks for more than it has.
    #[test]
    fn proxy_header_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), sig in 0u8..3) {
        use pgvalve::protocol::proxy_header::{parse, wanted, MAX_HEADER, V2_SIGNATURE};
        let mut buf = match sig {
            0 => V2_SIGNATURE.to_vec(),
            1 => b"PROXY ".to_vec(),
            _ => Vec::new(),
        };
        buf.extend_from_slice(&bytes);
        match parse(&buf) {
            Ok(Some((_, n))) => prop_assert!(n <= buf.len() && n <= MAX_HEADER),
            Ok(None) => prop_assert!(wanted(&buf) > buf.len()),
            Err(_) => {}
        }
    }

    /// Any header parses back to its addresses whatever follows it; every strict prefix is
    /// "not yet" (Ok(None)), and `wanted` on it never asks past the header's end.
    #[test]
    fn proxy_headers_round_trip_and_are_read_exactly(
        pair in proxied_pair(),
        v2 in any::<bool>(),
        tlvs in prop::collection::vec(any::<u8>(), 0..64),
        after in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        use pgvalve::protocol::proxy_header::{parse, wanted, ProxyHeader};
        let header = proxy_header_bytes(pair, v2, &tlvs);
        let mut stream = header.clone();
        stream.extend_from_slice(&after);
        let expected = ProxyHeader::Proxied { source: pair.0, destination: pair.1 };
        prop_assert_eq!(parse(&stream), Ok(Some((expected, header.len()))));
        for cut in 0..header.len() {
            prop_assert_eq!(parse(&header[..cut]), Ok(None), "prefix of {}", cut);
            let want = wanted(&header[..cut]);
            prop_assert!(want > cut && want <= header.len(), "wanted {} at {} of {}", want, cut, header.len());
        }
    }

    /// A v2 header whose length field says more than the bound is refused as soon as the
    /// fixed part is there, before any of it is read.
    #[test]
    fn proxy_header_length_is_bounded_before_reading(len in 2033u16..=u16::MAX) {
        use pgvalve::protocol::proxy_header::{parse, HeaderError, V2_SIGNATURE};
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x21, 0x11]);
        h.extend_from_slice(&len.to_be_bytes());
        prop_assert_eq!(parse(&h), Err(HeaderError::TooLong));
    }
}

/// A sqlcommenter value: text URL-encoded the way the middleware does it.
fn encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn deadlock_detail_parser_never_panics_and_is_bounded(text in ".{0,400}") {
        let waits = pgvalve::protocol::deadlock::parse_detail(&text);
        prop_assert!(waits.len() <= 64);
        prop_assert!(waits.iter().all(|w| w.lock.chars().count() <= 200));
    }

    #[test]
    fn deadlock_detail_parser_reads_every_well_formed_line(
        procs in prop::collection::vec((1i32..i32::MAX, "[A-Za-z]{1,20}Lock", "[a-z ()0-9,]{1,40}", 1i32..i32::MAX), 1..8),
        noise in prop::collection::vec(".{0,40}", 0..4),
    ) {
        let mut lines: Vec<String> = procs
            .iter()
            .map(|(p, mode, what, by)| format!("Process {p} waits for {mode} on {what}; blocked by process {by}."))
            .collect();
        // Lines of another shape are skipped, the rest still read.
        lines.extend(noise.iter().filter(|n| !n.contains("Process")).cloned());
        let waits = pgvalve::protocol::deadlock::parse_detail(&lines.join("\n"));
        prop_assert_eq!(waits.len(), procs.len());
        for (w, (p, mode, what, by)) in waits.iter().zip(&procs) {
            prop_assert_eq!((w.pid, w.blocked_by), (*p, *by));
            prop_assert_eq!(&w.lock, &format!("{mode} on {what}"));
        }
    }

    #[test]
    fn comment_parser_never_panics_and_bounds_values(text in ".{0,600}", junk in prop::collection::vec(any::<u8>(), 0..300)) {
        use pgvalve::protocol::sqlcomment::{Tags, MAX_VALUE};
        let lossy = String::from_utf8_lossy(&junk).into_owned();
        for sql in [text.clone(), format!("SELECT 1 /*{text}*/"), format!("/*route='{lossy}*/ {text}")] {
            let t = Tags::parse(&sql);
            for v in [&t.route, &t.controller, &t.action, &t.traceparent].into_iter().flatten() {
                prop_assert!(v.chars().count() <= MAX_VALUE && !v.chars().any(char::is_control));
            }
        }
    }

    #[test]
    fn comment_parser_reads_back_what_the_middleware_writes(route in "[ -~]{1,100}", controller in "[a-zA-Z0-9_. ]{1,50}", sql in "[A-Za-z0-9 =,()]{0,200}") {
        let comment = format!("/*controller='{}',framework='django%3A5.2',route='{}'*/", encoded(&controller), encoded(&route));
        let t = pgvalve::protocol::sqlcomment::Tags::parse(&format!("{sql} {comment}"));
        prop_assert_eq!(t.route.as_deref(), Some(route.as_str()));
        prop_assert_eq!(t.controller.as_deref(), Some(controller.as_str()));
    }
}

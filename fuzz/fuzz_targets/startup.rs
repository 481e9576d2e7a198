//! The first packet of a session (startup, SSL/GSSENC/cancel requests, options).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pgvalve::fuzzing::startup_packet(data);
});

//! The transaction-mode relay's message handling (statement renaming, pins, rejection,
//! answers) on arbitrary client and server traffic. Byte 0 picks the read size and the
//! policy; byte 1 where the client's bytes end and the server's begin.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (reads, reject) = ((data[0] >> 1) as usize + 1, data[0] & 1 == 1);
    let rest = &data[2..];
    let split = (data[1] as usize * rest.len()) / 255;
    let (client, server) = rest.split_at(split.min(rest.len()));
    pgvalve::fuzzing::transaction_traffic(client, server, reads, reject);
});

//! Every single-message decoder: SASL messages and the SCRAM exchange, ErrorResponse, the
//! server's login messages; and the SQL classifiers on the rest of the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&tag, body)) = data.split_first() {
        pgvalve::fuzzing::message_bodies(tag, body);
        pgvalve::fuzzing::sql(body);
    }
});

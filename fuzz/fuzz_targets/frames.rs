//! The frame splitter, the header walker and the plain relay's header handling on arbitrary
//! bytes, split into reads at every size the first two bytes choose.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (max, cut, rest) = (data[0] as usize * 4, data[1] as usize, &data[2..]);
    pgvalve::fuzzing::frames(rest, max, cut);
    pgvalve::fuzzing::plain_traffic(rest, cut + 1);
});

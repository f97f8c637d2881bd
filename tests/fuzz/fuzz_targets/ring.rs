//! A hostile guest against the REPL's shared-memory ring, with host sends,
//! polls and pauses in between (see `podflare_fuzz::ring`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use podflare_fuzz::ring::RingRig;
use podflare_fuzz::Reader;

fuzz_target!(|data: &[u8]| {
    RingRig::new().run(&mut Reader::new(data));
});

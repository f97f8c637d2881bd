//! Bytes as a snapshot `state` file through `snapshot::decode_state` (the
//! checks of `read_state`), and what decodes through the device half of a
//! restore. Input starting with the file magic is taken as a whole file;
//! anything else as a payload, framed with a correct checksum so the
//! fuzzer gets past it to the JSON and the device state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podflare_fuzz::snapshot::{expect_meta, frame, restore_devices, MAGIC};
use podflare_hostd::vmm::snapshot::decode_state;

fuzz_target!(|data: &[u8]| {
    let framed;
    let bytes = if data.starts_with(MAGIC) {
        data
    } else {
        framed = frame(data);
        &framed
    };
    if let Ok(snap) = decode_state(bytes, "fuzz", &expect_meta()) {
        restore_devices(&snap);
    }
});

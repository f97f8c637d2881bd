//! A hostile driver against the multiport console behind the mmio
//! transport, with host-side sends, kicks and sink pauses in between (see
//! `podflare_fuzz::virtio`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use podflare_fuzz::virtio::{Kind, Rig};
use podflare_fuzz::Reader;

fuzz_target!(|data: &[u8]| {
    Rig::new(Kind::Console).run(&mut Reader::new(data));
});

//! A hostile driver against the network card behind the mmio transport:
//! register accesses, descriptor tables, avail indices, notifies, snapshots
//! restored as saved or mutated, frames the refusing backend answers, a tap
//! attached mid-run and frames arriving on it (see `podflare_fuzz::virtio`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use podflare_fuzz::virtio::{Kind, Rig};
use podflare_fuzz::Reader;

fuzz_target!(|data: &[u8]| {
    Rig::new(Kind::Net).run(&mut Reader::new(data));
});

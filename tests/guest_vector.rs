//! Issue 15: no silent data corruption through vector registers on PVM.
//!
//! On a PVM host the guest kernel runs with `noxsave`: a context switch saves
//! only the low 128 bits of XMM0-15, so AVX register state (YMM/ZMM upper
//! halves, YMM16-31, mask registers) leaks between processes. The guest agent
//! keeps every process it starts off AVX there (`guest/agent/src/env.rs`).
//!
//! Per template (`default`: glibc + hashlib; `python-datasci`: also numpy and
//! OpenBLAS) the REPL starts `tests/guest/vector_check.py`'s two workers on
//! the one vCPU, and every operation's result is checked against a known
//! answer:
//! - with the sandbox's own environment: zero mismatches over >= 10,000
//!   operations, >= 5,000 per worker (asserted, on PVM and on hardware KVM
//!   alike);
//! - with the protecting variables removed: the mismatch count is printed as
//!   evidence (on PVM it is expected to be non-zero); only that the run
//!   completed and counted operations is asserted (it asks for fewer).
//!
//! Machines differ a lot in how fast they emulate the guest kernel, so the
//! waits are generous and set by `PODFLARE_TEST_WAIT_S` (default 1800: the
//! longest one exec may take) and `PODFLARE_VECTOR_PATIENCE_S` (default 600:
//! how long past its 10 s a worker may go on to reach its operation count).
//!
//! The cost of the protections (numpy 512x512 matmul, 64 MiB copy, each the
//! median of 15, one process alone on the vCPU) is measured in
//! `python-datasci` and printed. Run with `--nocapture` to see it.
//! The two templates' tests may run at once (the test command gives cargo
//! two threads): each sandbox has one vCPU, so each keeps one host core, and
//! the scheduling inside each guest is its own. Together they take about
//! half the wall time of one after the other; the cost figures are then
//! taken with the other sandbox busy on the other core (they are printed,
//! not asserted).

mod common;

use std::sync::OnceLock;

use common::vector::vectors_stay_private;
use podflare_hostd::vmm::factory::VmFactory;
use podflare_hostd::vmm::VmmConfig;

fn factory() -> Option<&'static VmFactory> {
    static F: OnceLock<Option<VmFactory>> = OnceLock::new();
    F.get_or_init(|| {
        common::kvm_or_skip()?;
        let mut cfg = VmmConfig::from_env().expect("PODFLARE_* settings");
        cfg.templates = vec!["default".into(), "python-datasci".into()];
        cfg.pool_size = 0;
        Some(VmFactory::open(cfg).expect("template snapshots of `default` and `python-datasci` (run scripts/setup first)"))
    })
    .as_ref()
}

#[test]
fn default_template_vector_state_stays_private() {
    let Some(f) = factory() else { return };
    vectors_stay_private(f, "default", false, true);
}

#[test]
fn python_datasci_template_vector_state_stays_private() {
    let Some(f) = factory() else { return };
    vectors_stay_private(f, "python-datasci", true, true);
}

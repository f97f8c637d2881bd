//! Guests with two vCPUs (`PODFLARE_GUEST_VCPUS=2`) on real VMs: the
//! template builds (its snapshot apart from the one-vCPU one) and restores
//! with both CPUs online; a Python exec whose two threads hash at once
//! keeps both vCPUs busy (host CPU time of the vCPU threads against wall
//! time shows it); a fork child has both and works; the vector-state check
//! passes with its two workers on two vCPUs. Needs `/dev/kvm`; fails where
//! it exists and anything does not work.
//!
//! Env: `PODFLARE_TEST_WAIT_S` (seconds one exec may take, default 1800).

mod common;

use std::sync::OnceLock;
use std::time::Instant;

use podflare_hostd::guest::{Guest, GuestSpec};
use podflare_hostd::vmm::factory::VmFactory;
use podflare_hostd::vmm::VmmConfig;

const VCPUS: u8 = 2;

fn factory() -> Option<&'static VmFactory> {
    static F: OnceLock<Option<VmFactory>> = OnceLock::new();
    F.get_or_init(|| {
        common::kvm_or_skip()?;
        let mut cfg = VmmConfig::from_env().expect("PODFLARE_* settings");
        cfg.templates = vec!["default".into()];
        cfg.pool_size = 0;
        cfg.guest_vcpus = VCPUS;
        Some(VmFactory::open(cfg).expect("a two-vCPU template snapshot of `default`"))
    })
    .as_ref()
}

fn spec(id: &str) -> GuestSpec {
    GuestSpec { template: "default".into(), egress: true, sandbox_id: id.into(), ram_mib: None, rootfs_gb: None }
}

fn py(g: &dyn Guest, code: &str) -> String {
    common::exec::py(g, code, common::exec::wait(1800))
}

/// Two threads hashing 16 MiB buffers at once (hashlib lets go of the GIL
/// for large inputs): prints wall seconds and the process's CPU seconds.
const BOTH_BUSY: &str = r#"
import threading, hashlib, time
_data = b'\x5a' * (16 << 20)
def _work():
    for _ in range(40):
        hashlib.sha256(_data).digest()
_t0, _c0 = time.monotonic(), time.process_time()
_ts = [threading.Thread(target=_work) for _ in range(2)]
for _t in _ts: _t.start()
for _t in _ts: _t.join()
print(f'{time.monotonic() - _t0:.3f} {time.process_time() - _c0:.3f}')
"#;

#[test]
fn two_vcpu_guests_restore_keep_both_busy_fork_and_keep_vectors_private() {
    let Some(f) = factory() else { return };
    let g = f.create_running(&spec("sbx_smp")).expect("create");
    assert_eq!(py(&g, "import os\nprint(os.cpu_count(), len(os.sched_getaffinity(0)))"), "2 2", "both CPUs online after the restore");
    assert_eq!(g.vm().vcpu_count(), 2);

    // Both busy: the guest's own clock and the host's vCPU threads agree
    // that two CPUs' worth of work ran per second of wall time.
    let cpu0 = g.vm().vcpus_cpu_time();
    let t0 = Instant::now();
    let out = py(&g, BOTH_BUSY);
    let (wall, host_cpu) = (t0.elapsed(), g.vm().vcpus_cpu_time() - cpu0);
    let mut parts = out.split_whitespace().map(|s| s.parse::<f64>().expect("seconds"));
    let (guest_wall, guest_cpu) = (parts.next().unwrap(), parts.next().unwrap());
    let host_ratio = host_cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "both busy: guest wall {guest_wall:.3} s, guest CPU {guest_cpu:.3} s (x{:.2}); host: {:.3} s of vCPU threads in {:.3} s (x{host_ratio:.2})",
        guest_cpu / guest_wall,
        host_cpu.as_secs_f64(),
        wall.as_secs_f64()
    );
    assert!(guest_cpu / guest_wall > 1.5, "the guest did not run both threads at once: {out}");
    assert!(host_ratio > 1.4, "the host did not run both vCPUs at once: x{host_ratio:.2}");

    // A fork child has both CPUs and runs; the parent runs on.
    let (kids, figures) = g.fork_running(&[spec("sbx_smp_child")]).expect("fork");
    eprintln!("fork of a two-vCPU guest: {figures:?}");
    assert_eq!(py(&kids[0], "import os\nprint(os.cpu_count())"), "2");
    assert_eq!(py(&kids[0], "print(sum(range(1000)))"), "499500");
    assert_eq!(py(&g, "print(6 * 7)"), "42");
    drop(kids);
    drop(g);

    // The protected run only: the unprotected one is evidence for one vCPU
    // (guest_vector.rs); here its workers seldom share a CPU.
    common::vector::vectors_stay_private(f, "default", false, false);
}

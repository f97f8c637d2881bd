//! VMM lifecycle with a hand-made guest (a few instructions, no Linux):
//! create/destroy cycles must not leak fds, threads or memory.
//!
//! Needs `/dev/kvm`; where it exists a broken VM fails the test.

mod common;

use std::time::{Duration, Instant};

use podflare_hostd::vmm::vm::{Vm, VmSpec};

/// 64-bit code: write "OK" to the serial port, then halt forever.
const GUEST: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
];

fn spec(rootfs: &std::path::Path) -> VmSpec {
    common::tiny_spec(rootfs)
}

/// The leak check counts process-wide fds and threads, so the tests of this
/// file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_once(kvm: &kvm_ioctls::Kvm, rootfs: &std::path::Path, i: usize) {
    let vm = Vm::boot_code(kvm, &format!("tiny{i}"), &spec(rootfs), GUEST).expect("boot tiny guest");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.console_log().contains(b"OK") {
        assert!(
            vm.status().stopped().is_none(),
            "tiny guest stopped: {:?}",
            vm.status().stopped()
        );
        assert!(Instant::now() < deadline, "tiny guest never wrote OK to its serial port");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(vm);
}

#[test]
fn fifty_create_destroy_cycles_leave_no_trace() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(kvm) = common::kvm_or_skip() else { return };
    let rootfs = common::temp_file("tiny-rootfs", &[0u8; 4096]);
    // Warm up once so lazily created process-wide state (signal handler,
    // allocator arenas) is not counted as a leak.
    run_once(&kvm, &rootfs, 0);
    let fds0 = common::count_dir("/proc/self/fd");
    let threads0 = common::count_dir("/proc/self/task");
    let rss0 = common::rss_kib();
    for i in 1..=50 {
        run_once(&kvm, &rootfs, i);
    }
    let fds1 = common::count_dir("/proc/self/fd");
    let threads1 = common::count_dir("/proc/self/task");
    let rss1 = common::rss_kib();
    eprintln!("fds {fds0} -> {fds1}, threads {threads0} -> {threads1}, rss {rss0} KiB -> {rss1} KiB");
    assert_eq!(fds1, fds0, "file descriptors leaked");
    assert!(threads1 <= threads0, "threads leaked: {threads0} -> {threads1}");
    // Guest RAM is 32 MiB per VM: a leak of even one VM's touched pages
    // over 50 cycles would show as several MiB.
    assert!(rss1 < rss0 + 8 * 1024, "RSS grew from {rss0} KiB to {rss1} KiB");
}

#[test]
fn wrong_kernel_path_is_a_clear_error() {
    let _turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(kvm) = common::kvm_or_skip() else { return };
    let rootfs = common::temp_file("tiny-rootfs2", &[0u8; 4096]);
    let mut s = spec(&rootfs);
    s.kernel = "/no/such/vmlinux".into();
    let err = Vm::boot(&kvm, "badkernel", &s).err().expect("boot must fail").to_string();
    assert!(err.contains("/no/such/vmlinux"), "error names the file: {err}");
    s.kernel = rootfs.clone();
    let err = Vm::boot(&kvm, "notelf", &s).err().expect("boot must fail").to_string();
    assert!(err.contains("vmlinux"), "error says what was expected: {err}");
    let mut s = spec(std::path::Path::new("/no/such/rootfs.ext4"));
    s.kernel = rootfs.clone();
    let err = Vm::boot(&kvm, "badimg", &s).err().expect("boot must fail").to_string();
    assert!(err.contains("/no/such/rootfs.ext4"), "error names the image: {err}");
}

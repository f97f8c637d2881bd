//! The seccomp filter of each thread kind, installed on a thread of its own:
//! one syscall the kind must not make is refused with EPERM, one it needs
//! works. The kill list is checked in a child process (it kills the whole
//! process, by design). With `/dev/kvm`: the threads of a VM are filtered,
//! and a VM boots, restores, saves and is destroyed from threads under the
//! filters of the kinds that do that in hostd.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use podflare_hostd::seccomp::{self, ThreadKind};
use podflare_hostd::vmm::snapshot::SnapshotMeta;
use podflare_hostd::vmm::vm::{Disks, Vm, VmSpec};
use podflare_hostd::vmm::{persist, Backend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Runs `f` on a new thread under `kind`'s filter.
fn filtered<T: Send>(kind: ThreadKind, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            seccomp::install(kind).unwrap_or_else(|e| panic!("install {kind:?}: {e}"));
            f()
        })
        .join()
        .expect("filtered thread panicked")
    })
}

/// The call failed with EPERM: the filter refused it.
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    let err = r.expect_err(&format!("{what} must be refused"));
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{what}: {err}");
}

fn socket() -> std::io::Result<UdpSocket> {
    UdpSocket::bind("127.0.0.1:0")
}

fn scratch(name: &str) -> std::path::PathBuf {
    common::temp_file(name, b"0123456789")
}

#[test]
fn http_accept_accepts_but_opens_no_file_and_no_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    filtered(ThreadKind::HttpAccept, || {
        refused("openat", File::open("/dev/null"));
        refused("socket", socket());
        let (conn, _) = listener.accept().expect("accept is allowed");
        conn.set_nonblocking(false).expect("ioctl(FIONBIO) is allowed");
        conn.set_nodelay(true).expect("setsockopt is allowed");
    });
    drop(client);
}

#[test]
fn http_worker_reads_files_and_starts_threads_but_writes_no_file() {
    let path = std::env::temp_dir().join(format!("podflare-seccomp-{}", std::process::id()));
    filtered(ThreadKind::HttpWorker, || {
        refused("openat(O_CREAT)", File::create(&path));
        refused("openat(O_WRONLY)", File::options().append(true).open("/dev/null"));
        refused("socket", socket());
        let mut b = [0u8; 16];
        File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("reading /dev/urandom");
        // VM threads: clone3 gets ENOSYS, glibc's clone fallback is checked.
        assert_eq!(std::thread::spawn(|| 7).join().expect("a thread"), 7);
        EventFd::new(EFD_NONBLOCK).expect("eventfd is allowed");
    });
    assert!(!path.exists());
}

#[test]
fn reaper_tears_down_and_reads_memory_figures_only() {
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    filtered(ThreadKind::Reaper, || {
        // The memory watchdog reads /proc; nothing is opened for writing.
        std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo is readable");
        refused("openat for writing", std::fs::OpenOptions::new().write(true).open("/dev/null"));
        refused("eventfd", EventFd::new(EFD_NONBLOCK));
        refused("socket", socket());
        refused("clone (thread)", std::thread::Builder::new().spawn(|| ()));
        std::thread::sleep(Duration::from_millis(1));
        evt.write(1).expect("write (a device thread's stop eventfd) is allowed");
    });
}

#[test]
fn pool_filler_restores_but_has_no_network() {
    filtered(ThreadKind::PoolFiller, || {
        refused("socket", socket());
        refused("openat(O_CREAT)", File::create(std::env::temp_dir().join("podflare-seccomp-pool")));
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("admission reads /proc/meminfo");
        assert!(meminfo.contains("MemAvailable"));
        std::thread::spawn(|| ()).join().expect("VM threads start");
    });
}

#[test]
fn device_thread_reads_the_image_and_signals_but_opens_nothing() {
    let image = File::open(scratch("seccomp-dev-image")).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let sock = socket().unwrap();
    filtered(ThreadKind::Device, || {
        refused("openat", File::open("/dev/null"));
        refused("socket", socket());
        refused("eventfd", EventFd::new(EFD_NONBLOCK));
        refused("ioctl", sock.set_nonblocking(true));
        let mut b = [0u8; 4];
        image.read_exact_at(&mut b, 2).expect("pread of the base image");
        assert_eq!(&b, b"2345");
        irq.write(1).expect("an interrupt");
        assert_eq!(irq.read().expect("a kick"), 1);
    });
}

#[test]
fn vcpu_thread_signals_but_opens_nothing_and_its_ioctls_are_kvm_only() {
    let image = File::open(scratch("seccomp-vcpu-image")).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let sock = socket().unwrap();
    filtered(ThreadKind::Vcpu, || {
        refused("openat", File::open("/dev/null"));
        refused("socket", socket());
        refused("ioctl(FIONBIO)", sock.set_nonblocking(true));
        refused("clone (thread)", std::thread::Builder::new().spawn(|| ()));
        irq.write(1).expect("an interrupt from an MMIO write");
        let mut b = [0u8; 2];
        image.read_exact_at(&mut b, 0).expect("a block read on queue notify");
    });
}

/// Set in a child run of this binary: what the child does, filtered.
const CHILD: &str = "PODFLARE_SECCOMP_TEST_CHILD";

/// The child's side (a no-op in a normal run).
#[test]
fn child_entry() {
    let Ok(what) = std::env::var(CHILD) else { return };
    if what == "off" {
        seccomp::set_enabled(false);
        seccomp::install(ThreadKind::Vcpu).expect("a no-op when off");
        File::open("/dev/null").expect("no filter: openat works");
        return;
    }
    seccomp::install(ThreadKind::HttpWorker).expect("install");
    match what.as_str() {
        "exec" => _ = std::process::Command::new("/bin/true").status(),
        // SAFETY: PTRACE_TRACEME takes no pointers; the filter stops it anyway.
        "ptrace" => _ = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) },
        other => panic!("unknown child mode {other}"),
    }
    panic!("{what}: still alive after a syscall on the kill list");
}

fn run_child(what: &str) -> std::process::ExitStatus {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD, what)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the child")
}

#[test]
fn starting_a_program_or_tracing_kills_the_process() {
    for what in ["exec", "ptrace"] {
        let status = run_child(what);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}");
    }
}

#[test]
fn seccomp_off_installs_nothing() {
    assert!(run_child("off").success());
}

// ---- with /dev/kvm ----

/// 64-bit code: write "OK" to the serial port, then halt forever.
const GUEST: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xf4, 0xeb, 0xfd];

fn spec(rootfs: &std::path::Path) -> VmSpec {
    common::tiny_spec(rootfs)
}

fn wait_ok(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.console_log().contains(b"OK") {
        assert!(vm.status().stopped().is_none(), "guest stopped: {:?}", vm.status().stopped());
        assert!(Instant::now() < deadline, "the guest never wrote OK");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `Seccomp_filters` of this process's thread named `name`.
fn filters_of(name: &str) -> usize {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            let n = status.lines().find_map(|l| l.strip_prefix("Seccomp_filters:")).expect("Seccomp_filters");
            return n.trim().parse().unwrap();
        }
    }
    panic!("no thread named {name}");
}

#[test]
fn a_vms_device_and_vcpu_threads_are_filtered() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    let rootfs = scratch("seccomp-rootfs1");
    let vm = Vm::boot_code(&kvm, "scf", &spec(&rootfs), GUEST).expect("boot");
    wait_ok(&vm);
    assert_eq!(filters_of("scf-dev"), 3);
    assert_eq!(filters_of("scf-vcpu0"), 3);
    // Save asks the filtered vCPU thread for its registers (KVM_GET_*).
    vm.pause().expect("pause");
    vm.save_state().expect("save on a filtered vCPU thread");
}

#[test]
fn filtered_workers_and_pool_restore_vms_and_the_reaper_destroys_them() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    let rootfs = scratch("seccomp-rootfs2");
    let dir = std::env::temp_dir().join(format!("podflare-seccomp-snap-{}", std::process::id()));
    // Booted by a worker (as a restore would be), saved unfiltered (snapshots
    // are written by template builders, which are not filtered).
    let vm = filtered(ThreadKind::HttpWorker, || {
        let vm = Vm::boot_code(&kvm, "scw", &spec(&rootfs), GUEST).expect("boot on a worker");
        wait_ok(&vm);
        vm
    });
    assert_eq!(filters_of("scw-vcpu0"), 6, "a worker's filters, then the vCPU's own");
    assert_eq!(filters_of("scw-dev"), 6, "a worker's filters, then the device thread's own");
    let meta = SnapshotMeta {
        backend: Backend::detect(),
        cpu_model: String::new(),
        kernel_id: String::new(),
        rootfs_id: String::new(),
        ram_bytes: 0,
        taken_unix: 0,
    };
    let snap = persist::save_vm(&vm, &dir, meta).expect("save");
    drop(vm);
    for (kind, name) in [(ThreadKind::HttpWorker, "scr1"), (ThreadKind::PoolFiller, "scr2")] {
        let vm = filtered(kind, || {
            let memory = File::open(dir.join("memory")).expect("open memory read-only");
            let image = File::open(&rootfs).expect("open image read-only");
            // The VM's own disk: an unnamed file filled from the snapshot's.
            let disk = persist::disk_copy(&dir.join("disk"), &std::env::temp_dir()).expect("copy the disk under the filter");
            let vm = persist::restore(&kvm, name, Disks { rootfs: image.into(), disk }, memory.into(), &snap).expect("restore");
            vm.pause().expect("pause");
            vm.save_state().expect("save state");
            vm.resume().expect("resume");
            vm
        });
        assert_eq!(vm.status().stopped(), None, "{kind:?}");
        filtered(ThreadKind::Reaper, move || drop(vm));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_accepted_connection_is_not_blocked_by_the_filters() {
    // The kinds that own client sockets can read and write them.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (conn, _) = listener.accept().unwrap();
    filtered(ThreadKind::HttpWorker, move || {
        let mut conn = conn;
        conn.set_write_timeout(Some(Duration::from_secs(5))).expect("setsockopt");
        conn.write_all(b"hi").expect("send");
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hi");
}

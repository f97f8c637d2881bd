//! The writable disk (`rootfs_gb`) on real VMs restored from the cached
//! template snapshot: a sandbox sees the size it asked for, files written
//! there survive a fork (and stay each copy's own), a freeze and a resume
//! byte for byte, and a guest root writing its disk device directly past
//! its size gets an I/O error while its sandbox keeps working. Needs
//! `/dev/kvm`; fails where it exists and anything does not work.
//!
//! Env: `PODFLARE_TEST_WAIT_S` (seconds one exec may take, default 600),
//! `PODFLARE_DISK_TEST_MIB` (the file written, default 4: data written from
//! user space through the emulated guest kernel is slow here).

mod common;

use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use podflare_hostd::guest::{Guest, GuestSpec};
use podflare_hostd::vmm::factory::{RunningGuest, VmFactory};
use podflare_hostd::vmm::scratch;
use podflare_hostd::vmm::VmmConfig;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn factory() -> Option<&'static VmFactory> {
    static F: OnceLock<Option<VmFactory>> = OnceLock::new();
    F.get_or_init(|| {
        common::kvm_or_skip()?;
        let mut cfg = VmmConfig::from_env().expect("PODFLARE_* settings");
        cfg.templates = vec!["default".into()];
        cfg.pool_size = 0;
        cfg.spaces_dir = space_dir();
        Some(VmFactory::open(cfg).expect("template snapshot of `default` (run scripts/setup first)"))
    })
    .as_ref()
}

fn spec(id: &str, rootfs_gb: Option<u64>) -> GuestSpec {
    GuestSpec { template: "default".into(), egress: true, sandbox_id: id.into(), ram_mib: None, rootfs_gb }
}

fn py(g: &dyn Guest, code: &str) -> String {
    common::exec::py(g, code, common::exec::wait(600))
}

/// Helpers defined in the guest's REPL: the size of `/`, and files written
/// and read with O_DIRECT from an aligned buffer (the device moves the
/// bytes straight from and to user memory; no copy through the emulated
/// guest kernel), their SHA-256 printed.
const HELPERS: &str = r#"
import os, random, hashlib, ctypes
def _aligned(n):
    buf = bytearray(n + 4096)
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    off = (-addr) % 4096
    return buf, memoryview(buf)[off:off + n]
def root_size():
    st = os.statvfs('/')
    return st.f_blocks * st.f_frsize
def write_direct(path, n):
    data = random.randbytes(n)
    _buf, mv = _aligned(n)
    mv[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    done = 0
    while done < n:
        done += os.write(fd, mv[done:done + (4 << 20)])
    os.close(fd)
    return hashlib.sha256(data).hexdigest()
def read_direct(path):
    n = os.stat(path).st_size
    _buf, mv = _aligned(n)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    got = 0
    while got < n:
        got += os.readv(fd, [mv[got:]])
    os.close(fd)
    return hashlib.sha256(mv).hexdigest()
"#;

fn create(f: &VmFactory, id: &str, rootfs_gb: Option<u64>) -> RunningGuest {
    let g = f.create_running(&spec(id, rootfs_gb)).expect("create");
    py(&g, HELPERS);
    g
}

fn root_size(g: &dyn Guest) -> u64 {
    py(g, "print(root_size())").parse().expect("a size")
}

#[test]
fn the_disk_has_the_asked_size_and_its_files_follow_fork_freeze_and_resume() {
    let Some(f) = factory() else { return };
    let mib = env("PODFLARE_DISK_TEST_MIB", 4);

    // Asked for 2 GB: the file system was grown to it before any exec.
    let g = create(f, "sbx_disk", Some(2));
    let size = root_size(&g);
    let want = scratch::disk_bytes_for(2);
    assert!(size <= want && size > want / 100 * 95, "`/` is {size} bytes, asked for {want}");
    assert!(size > scratch::BASE_FS_BYTES * 3 / 2, "`/` was not grown past the template's 1 GiB: {size}");
    // Not asked: the template's own size.
    let small = create(f, "sbx_small", None);
    let small_size = root_size(&small);
    assert!(small_size <= scratch::BASE_FS_BYTES && small_size > scratch::BASE_FS_BYTES / 100 * 90, "{small_size}");
    drop(small);

    let t = std::time::Instant::now();
    let hash = py(&g, &format!("print(write_direct('/root/data.bin', {} << 20))", mib));
    eprintln!("wrote {mib} MiB with O_DIRECT in {:?}", t.elapsed());
    assert_eq!(py(&g, "print(read_direct('/root/data.bin'))"), hash);

    // A fork child has the file and the size; what it writes stays its own.
    let (kids, figures) = g.fork_running(&[spec("sbx_disk_child", None)]).expect("fork");
    eprintln!("fork: {figures:?}");
    let kid = &kids[0];
    py(kid, HELPERS);
    assert_eq!(py(kid, "print(read_direct('/root/data.bin'))"), hash, "the child reads the parent's file");
    assert_eq!(root_size(kid), size);
    let kid_hash = py(kid, "print(write_direct('/root/data.bin', 1 << 20))");
    assert_ne!(kid_hash, hash);
    assert_eq!(py(&g, "print(read_direct('/root/data.bin'))"), hash, "the child's write is invisible in the parent");
    assert_eq!(py(kid, "print(read_direct('/root/data.bin'))"), kid_hash);

    // Freeze the parent into a space, resume it, freeze and resume again:
    // the file and the size each time.
    let mut current = g;
    for round in 0..2 {
        let info = current.freeze("sbx_disk", serde_json::json!({})).expect("freeze");
        assert!(info.bytes_on_disk >= mib << 20, "the space holds the disk's data: {info:?}");
        drop(current);
        let (resumed, _) = f.resume_running(&info.id, &spec(&format!("sbx_resumed{round}"), None)).expect("resume");
        assert_eq!(py(&resumed, "print(read_direct('/root/data.bin'))"), hash, "round {round}");
        assert_eq!(root_size(&resumed), size, "round {round}");
        current = resumed;
    }

    // A space whose disk changed on disk (one byte of its superblock) is
    // refused and dropped, never resumed.
    let info = current.freeze("sbx_disk", serde_json::json!({})).expect("freeze");
    drop(current);
    let disk = std::fs::OpenOptions::new().read(true).write(true).open(space_dir().join(&info.id).join("disk")).expect("space disk");
    let mut b = [0u8; 1];
    disk.read_exact_at(&mut b, 1024 + 100).unwrap();
    disk.write_all_at(&[b[0] ^ 0x5a], 1024 + 100).unwrap();
    let err = f.resume_running(&info.id, &spec("sbx_bad", None)).err().expect("a changed disk is refused").to_string();
    assert!(err.contains("disk file does not match its checksum"), "{err}");
    assert!(f.resume_running(&info.id, &spec("sbx_bad2", None)).is_err(), "and the space is gone");
}

fn space_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("podflare-disk-spaces-{}", std::process::id()))
}

#[test]
fn a_guest_writing_its_device_past_its_size_gets_an_error_and_runs_on() {
    let Some(f) = factory() else { return };
    let g = create(f, "sbx_raw", Some(2));
    let limit = scratch::disk_bytes_for(2);
    // Root in the guest opens the device itself: within the size the write
    // goes through (the file system's last block, free in a new one); past
    // it the device refuses.
    let out = py(
        &g,
        &format!(
            r#"
import errno
_b, mv = _aligned(4096)
mv[:] = b'x' * 4096
fd = os.open('/dev/vdb', os.O_WRONLY | os.O_DIRECT)
results = []
for off in ({inside}, {outside}, {far}):
    try:
        results.append(str(os.pwrite(fd, mv, off)))
    except OSError as e:
        results.append(errno.errorcode[e.errno])
os.close(fd)
print(' '.join(results))
"#,
            inside = limit - 4096,
            outside = limit,
            far = scratch::CAPACITY_BYTES - 4096,
        ),
    );
    assert_eq!(out, "4096 EIO EIO", "writes past the size are refused");
    assert_eq!(py(&g, "print(6 * 7)"), "42", "the sandbox works on");
}

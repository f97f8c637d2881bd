//! Early boot: pseudo file systems and the copy-on-write root.
//!
//! The kernel mounts the shared base image (ext4 on /dev/vda) read-only as
//! `/`. Each sandbox writes into an overlay whose upper layer is the ext4 on
//! its own writable disk (/dev/vdb: hostd gives every sandbox a copy of its
//! template's, and a fork or freeze takes it along with the memory), so files
//! need not fit in RAM. A guest without a file system on /dev/vdb (a debugging
//! boot) uses a tmpfs instead.

use crate::sys::{self, mkdir, mount};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;

/// Directory in the image where the file system holding the overlay's upper
/// layer is mounted; after the switch it is where the old root is parked and
/// dropped.
const STATE: &str = "/mnt/overlay-root";

/// The writable disk.
const DISK: &str = "/dev/vdb";

/// The upper layer's file system when it is the disk: what a Hello asking
/// for a size grows (the mount itself is gone from every namespace).
static DISK_FS: OnceLock<OwnedFd> = OnceLock::new();

/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`, the new size in blocks.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Block size the host makes the disk's file system with.
const DISK_BLOCK_BYTES: u64 = 4096;

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Mounts the upper layer's file system: the disk's ext4 (no atime updates:
/// each is emulated kernel work and a block write; `noinit_itable`: its
/// inode tables are holes the host reads as zeros, nothing to initialise),
/// else a tmpfs.
fn mount_upper() -> io::Result<()> {
    match mount(DISK, STATE, "ext4", libc::MS_NOATIME, "noinit_itable") {
        Ok(()) => {
            if let Ok(fd) = sys::open(STATE, libc::O_RDONLY | libc::O_DIRECTORY) {
                let _ = DISK_FS.set(fd);
            }
            Ok(())
        }
        Err(_) => mount("tmpfs", STATE, "tmpfs", 0, "mode=0755"),
    }
}

/// Grows the disk's file system to `bytes` (whole blocks) while it is in
/// use. Asking for its current size or less changes nothing.
pub fn grow_disk(bytes: u64) -> io::Result<()> {
    let fd = DISK_FS
        .get()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no disk file system mounted"))?;
    let blocks: u64 = bytes / DISK_BLOCK_BYTES;
    // SAFETY: `fd` is an open descriptor of a directory on the ext4; the
    // ioctl reads one u64 through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not larger than it is (ext4 never shrinks online).
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Builds the overlay root and switches into it.
pub fn overlay_root() -> io::Result<()> {
    mount_upper()?;
    for d in ["upper", "work", "root"] {
        mkdir(&format!("{STATE}/{d}"), 0o755)?;
    }
    let new_root = format!("{STATE}/root");
    mount(
        "overlay",
        &new_root,
        "overlay",
        0,
        &format!("lowerdir=/,upperdir={STATE}/upper,workdir={STATE}/work"),
    )?;
    sys::chdir(&new_root)?;
    // Park the old root on the image's (empty) STATE directory seen through
    // the overlay, then drop it: the overlay keeps its layers alive.
    match sys::pivot_root(".", &format!(".{STATE}")) {
        Ok(()) => {
            sys::chdir("/")?;
            sys::umount_detach(STATE)?;
        }
        Err(_) => {
            // switch_root style: move the overlay over / and chroot into it.
            sys::move_mount(".", "/")?;
            chroot_here()?;
        }
    }
    Ok(())
}

fn chroot_here() -> io::Result<()> {
    // SAFETY: "." is a NUL-terminated static string.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    sys::chdir("/")
}

/// Mounts /proc, /sys, /dev (+pts, shm) and /tmp. Already-mounted ones are
/// fine (the kernel mounts devtmpfs itself with DEVTMPFS_MOUNT).
pub fn pseudo_filesystems() {
    let tolerate = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => Err(e),
        _ => Ok(()),
    };
    let results = [
        (
            "/proc",
            tolerate(mount("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, "")),
        ),
        (
            "/sys",
            tolerate(mount("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, "")),
        ),
        (
            "/dev",
            tolerate(mount(
                "devtmpfs",
                "/dev",
                "devtmpfs",
                libc::MS_NOSUID,
                "mode=0755",
            )),
        ),
    ];
    for (what, r) in results {
        if let Err(e) = r {
            crate::console::line(&format!("podflare-agent: mount {what}: {e}"));
        }
    }
    // devtmpfs has no pts/shm directories and none of the /dev/fd links.
    let _ = mkdir("/dev/pts", 0o755);
    let _ = mkdir("/dev/shm", 0o1777);
    let _ = mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    let _ = mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    let _ = mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
}

/// Transparent huge pages for every process, with no background collapsing.
///
/// A first-touch page fault runs in the guest kernel, which a PVM host
/// emulates: ~2.5 ms per 4 KiB page there, while one 2 MiB fault serves 512
/// pages. Below 512 MiB of RAM the kernel turns THP to `never` at boot
/// whatever its configuration says, so it is set here. khugepaged would wake
/// every 10 s to copy small pages into huge ones, emulated work in a sandbox
/// that should sleep; its sleeps are set first (it starts when THP is
/// enabled) to a day.
pub fn memory_settings() {
    const THP: &str = "/sys/kernel/mm/transparent_hugepage";
    for (file, value) in [
        ("khugepaged/scan_sleep_millisecs", "86400000"),
        ("khugepaged/alloc_sleep_millisecs", "86400000"),
        ("enabled", "always"),
    ] {
        if let Err(e) = std::fs::write(format!("{THP}/{file}"), value) {
            crate::console::line(&format!("podflare-agent: {THP}/{file}: {e}"));
        }
    }
}

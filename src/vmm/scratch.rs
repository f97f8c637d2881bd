//! The writable disk of every sandbox (`rootfs_gb`).
//!
//! Each VM has a second virtio-blk device (`/dev/vdb` in the guest) over a
//! sparse host file of its own. The guest's agent mounts the ext4 on it as
//! the upper layer of its overlay root, so what a sandbox writes lives on
//! that disk, not in guest RAM, and may outgrow RAM.
//!
//! - The file system is made once per cache by `mkfs.ext4` on the host
//!   ([`pristine_image`], [`BASE_FS_BYTES`] large), copied into each
//!   template build, and its state at the template snapshot is the
//!   template's disk. Each restore copies that disk's data extents (a few
//!   MiB) into an unnamed file ([`ScratchDisk::copy_of`]): nothing is left
//!   behind by a killed run, and sandboxes never share a writable block.
//! - The device is [`CAPACITY_BYTES`] large in every template; a sandbox's
//!   file system is grown to what it asked for by the agent (online resize,
//!   `EXT4_IOC_RESIZE_FS`) when its Hello says so, and the device refuses
//!   writes past that size ([`ScratchDisk::limit`]), so a guest root writing
//!   `/dev/vdb` directly stays within it too.
//! - A fork copies the parent's disk while its device thread is held; a
//!   freeze writes it into the space; a resume copies it back out.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::unistd::Whence;

/// The device's size in every VM: the largest disk a sandbox can be given.
/// The file is sparse, so the size costs nothing; 1 TiB is also the most
/// the base file system's reserved group descriptors let it grow to online
/// (1024 times its size).
pub const CAPACITY_BYTES: u64 = 1 << 40;

/// The size the file system is made with: the smallest disk a sandbox can
/// have (`rootfs_gb` counts whole GB). Larger ones are grown at create.
pub const BASE_FS_BYTES: u64 = 1 << 30;

/// How the base file system is made; a new value makes a new one (and, as
/// its identity is in the template key, rebuilds the templates).
const MKFS_REVISION: u32 = 1;

/// Block size of the base file system (the unit of online resize).
pub const FS_BLOCK_BYTES: u64 = 4096;

/// Copy buffer for hosts without `copy_file_range` between these files.
const COPY_CHUNK: usize = 1 << 20;

/// The bytes a sandbox asking for `gb` GB (GiB, as `df -h` counts) gets:
/// whole file-system blocks, at least the base file system, at most the
/// device.
pub fn disk_bytes_for(gb: u64) -> u64 {
    let bytes = gb.saturating_mul(1 << 30);
    (bytes / FS_BLOCK_BYTES * FS_BLOCK_BYTES).clamp(BASE_FS_BYTES, CAPACITY_BYTES)
}

/// The empty base file system, made on first use under
/// `<cache>/scratch/` with `mkfs.ext4` (e2fsprogs, which `scripts/setup`
/// installs): no journal (a sandbox's disk is never replayed after a crash:
/// it always comes back with the memory that matches it, and a journal
/// doubles the emulated kernel work of every write), no reserved blocks,
/// inode tables left as holes (`lazy_itable_init`; the guest mounts it with
/// `noinit_itable` so it never spends emulated work zeroing them).
///
/// Only `make` runs the program: threads under a seccomp filter (which
/// kills a process that starts a program) pass false and find the one made
/// at start ([`super::factory::VmFactory::open`]).
pub fn pristine_image(cache_dir: &Path, make: bool) -> io::Result<PathBuf> {
    static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = cache_dir.join("scratch");
    let path = dir.join(format!("ext4-{}m-r{MKFS_REVISION}.img", BASE_FS_BYTES >> 20));
    if path.is_file() {
        return Ok(path);
    }
    if !make {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} is missing (made at start)", path.display())));
    }
    std::fs::create_dir_all(&dir)?;
    // Writable by nobody else whatever the umask: the cache check at start
    // refuses a directory others could write (they could swap the image).
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // Unique per process and call: other processes and threads may make
    // theirs at the same time; the rename makes one of them the image.
    let tmp = dir.join(format!(".ext4.tmp{}-{}", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_file(&tmp);
    File::create(&tmp)?.set_len(BASE_FS_BYTES)?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "podflare-disk", "-O", "^has_journal", "-m", "0", "-b", "4096"])
        .args(["-E", "lazy_itable_init=1,nodiscard"])
        .arg(&tmp)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("mkfs.ext4 could not run ({e}); install e2fsprogs (scripts/setup does)")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other(format!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// One VM's writable disk: an unnamed file (gone with its last descriptor)
/// and the write limit its device enforces.
pub struct ScratchDisk {
    /// Shared with the VM's block device, which writes through it.
    file: Arc<File>,
    dir: PathBuf,
    limit: Arc<AtomicU64>,
}

/// A new unnamed file in `dir`, readable and writable by us only.
fn unnamed_file(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(dir)
}

impl ScratchDisk {
    /// A copy of `base` (a template's disk, a fork's capture, a space's) in
    /// a new unnamed file under `dir`, [`CAPACITY_BYTES`] long, writes
    /// allowed up to `limit` bytes.
    pub fn copy_of(base: &File, dir: &Path, limit: u64) -> io::Result<ScratchDisk> {
        let file = unnamed_file(dir)?;
        copy_sparse(base, &file)?;
        file.set_len(CAPACITY_BYTES)?;
        Ok(ScratchDisk { file: Arc::new(file), dir: dir.to_path_buf(), limit: Arc::new(AtomicU64::new(limit.min(CAPACITY_BYTES))) })
    }

    /// An empty disk (no file system: the guest falls back to a RAM upper
    /// layer) for VMs that are not sandboxes: hand-made test guests and
    /// debugging boots.
    pub fn empty(dir: &Path) -> io::Result<ScratchDisk> {
        let file = unnamed_file(dir)?;
        file.set_len(CAPACITY_BYTES)?;
        Ok(ScratchDisk { file: Arc::new(file), dir: dir.to_path_buf(), limit: Arc::new(AtomicU64::new(CAPACITY_BYTES)) })
    }

    /// A copy of this disk as it is now, in the same directory with the
    /// same limit. The caller keeps the device from writing meanwhile.
    pub fn copy(&self) -> io::Result<ScratchDisk> {
        ScratchDisk::copy_of(&self.file, &self.dir, self.limit())
    }

    /// Writes this disk's data into `dest` (a new file), fsynced; returns
    /// the checksum of its contents ([`checksum`]). The caller keeps the
    /// device from writing meanwhile.
    pub fn write_into(&self, dest: &File) -> io::Result<u32> {
        copy_sparse(&self.file, dest)?;
        dest.set_len(CAPACITY_BYTES)?;
        dest.sync_all()?;
        checksum(dest)
    }

    /// The file, for the device: shared, not a second descriptor (open
    /// files bound how many VMs a host holds).
    pub fn device_file(&self) -> Arc<File> {
        Arc::clone(&self.file)
    }

    /// The shared write limit the device reads on every write.
    pub fn limit_handle(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.limit)
    }

    /// Bytes the guest may write (its file system's size).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Raises or lowers the write limit (a create that asked for more).
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes.min(CAPACITY_BYTES), Ordering::Relaxed);
    }

    /// Host bytes the disk's data takes (allocated blocks).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }
}

/// `(start, end)` of each data extent of `file` (holes skipped).
fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match nix::unistd::lseek64(std::os::fd::AsRawFd::as_raw_fd(file), pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            // ENXIO: no data at or after `pos`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = match nix::unistd::lseek64(std::os::fd::AsRawFd::as_raw_fd(file), start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(e) => return Err(e.into()),
        };
        if end > start {
            extents.push((start, end));
        }
        pos = end.max(start + 1);
    }
    Ok(extents)
}

/// Copies `src`'s data extents into `dst` at the same offsets; holes stay
/// holes, so a 1 TiB disk holding a few MiB copies a few MiB.
fn copy_sparse(src: &File, dst: &File) -> io::Result<()> {
    let mut buf = Vec::new();
    for (start, end) in data_extents(src)? {
        let (mut off_in, mut off_out) = (start as i64, start as i64);
        let mut left = (end - start) as usize;
        while left > 0 {
            match nix::fcntl::copy_file_range(src.as_fd(), Some(&mut off_in), dst.as_fd(), Some(&mut off_out), left) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "disk shorter than its extents")),
                Ok(n) => left -= n,
                // Not between these files (another file system, an old
                // kernel): copy through a buffer instead.
                Err(nix::errno::Errno::EXDEV | nix::errno::Errno::ENOSYS | nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {
                    buf.resize(COPY_CHUNK, 0);
                    while left > 0 {
                        let n = left.min(COPY_CHUNK);
                        src.read_exact_at(&mut buf[..n], off_in as u64)?;
                        dst.write_all_at(&buf[..n], off_out as u64)?;
                        (off_in, off_out, left) = (off_in + n as i64, off_out + n as i64, left - n);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// CRC-32 of a disk's contents: every non-zero block with its offset, so
/// the figure does not depend on how the host file system reports holes.
pub fn checksum(file: &File) -> io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    for (start, end) in data_extents(file)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], off)?;
            for (i, block) in buf[..n].chunks(FS_BLOCK_BYTES as usize).enumerate() {
                if block.iter().any(|b| *b != 0) {
                    crc.update(&(off + i as u64 * FS_BLOCK_BYTES).to_le_bytes());
                    crc.update(block);
                }
            }
            off += n as u64;
        }
    }
    Ok(crc.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("podflare-scratch-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_pristine_image_is_an_empty_ext4_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let cache = dir().join("cache");
        let _ = std::fs::remove_dir_all(&cache);
        assert!(pristine_image(&cache, false).is_err(), "never made without `make`");
        let path = pristine_image(&cache, true).expect("mkfs.ext4 (e2fsprogs) makes it");
        assert_eq!(pristine_image(&cache, false).unwrap(), path, "found again, not made again");
        let f = File::open(&path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), BASE_FS_BYTES);
        let mut magic = [0u8; 2];
        f.read_exact_at(&mut magic, 1024 + 0x38).unwrap();
        assert_eq!(u16::from_le_bytes(magic), 0xef53, "an ext4 superblock");
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn sizes_are_whole_blocks_within_the_device() {
        assert_eq!(disk_bytes_for(0), BASE_FS_BYTES);
        assert_eq!(disk_bytes_for(1), BASE_FS_BYTES);
        assert_eq!(disk_bytes_for(2), 2 << 30);
        assert_eq!(disk_bytes_for(u64::MAX), CAPACITY_BYTES);
    }

    #[test]
    fn copies_keep_data_and_holes_and_are_independent() {
        let d = dir();
        let base = unnamed_file(&d).unwrap();
        base.set_len(64 << 20).unwrap();
        base.write_all_at(b"superblock", 1024).unwrap();
        base.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        let a = ScratchDisk::copy_of(&base, &d, 2 << 30).unwrap();
        assert_eq!(a.device_file().metadata().unwrap().len(), CAPACITY_BYTES);
        // Only the data was copied (a few blocks, not 64 MiB or 1 TiB).
        assert!(a.allocated_bytes() < 1 << 20, "{} bytes allocated", a.allocated_bytes());
        let mut got = [0u8; 10];
        a.file.read_exact_at(&mut got, 1024).unwrap();
        assert_eq!(&got, b"superblock");
        assert_eq!(checksum(&a.file).unwrap(), checksum(&base).unwrap());
        // A copy of a copy, then a change to the first: the second keeps
        // what it had and the checksums differ.
        let b = a.copy().unwrap();
        assert_eq!(b.limit(), 2 << 30);
        a.file.write_all_at(b"changed", 40 << 20).unwrap();
        let mut got = [0u8; 7];
        b.file.read_exact_at(&mut got, 40 << 20).unwrap();
        assert_eq!(got, [7u8; 7]);
        assert_ne!(checksum(&a.file).unwrap(), checksum(&b.file).unwrap());
        // Zero blocks written as data do not change the checksum.
        b.file.write_all_at(&[0u8; 4096], 50 << 20).unwrap();
        assert_eq!(checksum(&b.file).unwrap(), checksum(&base).unwrap());
    }

    #[test]
    fn write_into_makes_a_durable_copy() {
        let d = dir();
        let disk = ScratchDisk::empty(&d).unwrap();
        disk.file.write_all_at(b"data", 5 << 30).unwrap();
        let path = d.join(format!("space-disk-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dest = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        let crc = disk.write_into(&dest).unwrap();
        assert_eq!(crc, checksum(&disk.file).unwrap());
        let back = ScratchDisk::copy_of(&File::open(&path).unwrap(), &d, 1 << 30).unwrap();
        let mut got = [0u8; 4];
        back.file.read_exact_at(&mut got, 5 << 30).unwrap();
        assert_eq!(&got, b"data");
        std::fs::remove_file(&path).unwrap();
    }
}

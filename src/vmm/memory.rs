//! Guest memory: creation, snapshot files, and the KVM memory slot.
//!
//! This is the only module that registers host memory with KVM. Guest RAM is
//! one region at guest physical address 0, below the MMIO window, so the
//! guest sees a flat layout and a snapshot is one file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};
use vm_memory::mmap::MmapRegionBuilder;

use crate::devices::GuestMemory;

/// First guest physical address that is not RAM: virtio-mmio devices live here.
pub const MMIO_START: u64 = 0xd000_0000;
/// Largest guest RAM we lay out below the MMIO window.
pub const MAX_RAM_BYTES: u64 = MMIO_START;
const PAGE: usize = 4096;

/// What can go wrong with guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// RAM size is zero, unaligned, or collides with the MMIO window.
    #[error("guest RAM of {0} bytes is invalid (must be a multiple of 2 MiB, at most {MAX_RAM_BYTES:#x})")]
    BadSize(u64),
    /// mmap failed.
    #[error("mapping guest memory failed: {0}")]
    Map(String),
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Slot(#[source] kvm_ioctls::Error),
    /// Reading or writing a memory file failed.
    #[error("memory file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn check_size(bytes: u64) -> Result<usize, MemoryError> {
    if bytes == 0 || !bytes.is_multiple_of(2 << 20) || bytes > MAX_RAM_BYTES {
        return Err(MemoryError::BadSize(bytes));
    }
    usize::try_from(bytes).map_err(|_| MemoryError::BadSize(bytes))
}

/// Fresh anonymous RAM for a cold boot.
pub fn anonymous(bytes: u64) -> Result<GuestMemory, MemoryError> {
    let size = check_size(bytes)?;
    let region = MmapRegionBuilder::new_with_bitmap(size, ())
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    from_region(region)
}

/// RAM restored from a snapshot memory file, mapped `MAP_PRIVATE`: every
/// sandbox restored from the same file shares its pages until it writes one,
/// and nothing is copied at restore time.
pub fn private_file_mapping(file: File, bytes: u64) -> Result<GuestMemory, MemoryError> {
    let size = check_size(bytes)?;
    let region = MmapRegionBuilder::new_with_bitmap(size, ())
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    from_region(region)
}

fn from_region(region: MmapRegion<()>) -> Result<GuestMemory, MemoryError> {
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Map("region does not fit the guest address space".into()))?;
    GuestMemory::from_regions(vec![region]).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Total RAM bytes of a guest memory object.
pub fn ram_bytes(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Registers every region of `mem` as a KVM memory slot.
///
/// Must run before `KVM_CREATE_IRQCHIP`: on this host a slot registered
/// afterwards costs milliseconds more.
pub fn register_slots(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .as_ptr();
        let entry = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host+len) is a live mapping owned by
        // `mem`; the VM struct keeps `mem` alive until after the VM fd (and
        // with it every slot) is closed, regions of one GuestMemory never
        // overlap, and each gets its own slot number.
        unsafe { vm.set_user_memory_region(entry) }.map_err(MemoryError::Slot)?;
    }
    Ok(())
}

/// Writes guest RAM to `path` as a sparse file: all-zero pages become holes,
/// so a snapshot of a mostly idle guest is small and maps back as zeros.
pub fn write_sparse(mem: &GuestMemory, path: &Path) -> Result<u64, MemoryError> {
    let err = |source| MemoryError::File { path: path.display().to_string(), source };
    let mut file = File::create(path).map_err(err)?;
    let total = ram_bytes(mem);
    let mut written = 0u64;
    let mut page = vec![0u8; PAGE];
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch_start = 0u64;
    for region in mem.iter() {
        let base = region.start_addr().0;
        let mut off = 0u64;
        while off < region.len() {
            let gpa = base + off;
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
            let zero = page.iter().all(|b| *b == 0);
            let contiguous = batch_start + batch.len() as u64 == gpa;
            if (zero || !contiguous || batch.len() >= (1 << 20)) && !batch.is_empty() {
                file.write_all_at(&batch, batch_start).map_err(err)?;
                written += batch.len() as u64;
                batch.clear();
            }
            if !zero {
                if batch.is_empty() {
                    batch_start = gpa;
                }
                batch.extend_from_slice(&page);
            }
            off += PAGE as u64;
        }
    }
    if !batch.is_empty() {
        file.write_all_at(&batch, batch_start).map_err(err)?;
        written += batch.len() as u64;
    }
    file.set_len(total).map_err(err)?;
    file.flush().map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(written)
}

/// Hands the free pages of hostd's own heap back to the kernel. glibc keeps
/// what a burst of sandboxes freed in its arenas, so without this hostd's
/// RSS would stay at its peak after the burst is gone.
pub fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim walks only glibc's own free lists and takes no
    // pointer; it is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Private (copy-on-write or anonymous, written) bytes of the mapping that
/// holds `mem`, read from `/proc/self/smaps`. This is what a sandbox costs
/// the host beyond the shared snapshot pages.
pub fn private_bytes(mem: &GuestMemory) -> u64 {
    let Some(region) = mem.iter().next() else { return 0 };
    let start = region.as_ptr() as u64;
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
    let mut in_region = false;
    let mut total_kb = 0u64;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, _hi)) = range.split_once('-') {
                if lo.len() >= 8 && lo.chars().all(|c| c.is_ascii_hexdigit()) {
                    in_region = u64::from_str_radix(lo, 16).ok() == Some(start);
                    continue;
                }
            }
        }
        if in_region {
            if let Some(v) = line.strip_prefix("Private_Dirty:") {
                total_kb += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total_kb * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(anonymous(0).is_err());
        assert!(anonymous(4096).is_err());
        assert!(anonymous(MAX_RAM_BYTES + (2 << 20)).is_err());
    }

    #[test]
    fn sparse_file_round_trips_through_a_private_mapping() {
        let mem = anonymous(4 << 20).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_slice(b"world", GuestAddress((3 << 20) + 7)).unwrap();
        let dir = std::env::temp_dir().join(format!("pf-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let written = write_sparse(&mem, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only the two touched pages are data");
        let a = private_file_mapping(File::open(&path).unwrap(), 4 << 20).unwrap();
        let b = private_file_mapping(File::open(&path).unwrap(), 4 << 20).unwrap();
        let mut buf = [0u8; 5];
        a.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(&buf, b"hello");
        a.write_slice(b"HELLO", GuestAddress(0x1234)).unwrap();
        b.read_slice(&mut buf, GuestAddress(0x1234)).unwrap();
        assert_eq!(&buf, b"hello", "a write in one private mapping is invisible to another");
        b.read_slice(&mut buf, GuestAddress((3 << 20) + 7)).unwrap();
        assert_eq!(&buf, b"world");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

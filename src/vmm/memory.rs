//! Guest memory: creation, snapshot files, and the KVM memory slot.
//!
//! This is the only module that registers host memory with KVM. Guest RAM is
//! one region at guest physical address 0, below the MMIO window, so the
//! guest sees a flat layout and a snapshot is one file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

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
/// Bytes in a guest page.
pub const PAGE_BYTES: u64 = PAGE as u64;

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
/// `file` is shared, not duplicated: the mapping keeps the caller's open
/// file rather than one of its own (open files bound how many VMs a host
/// holds).
pub fn private_file_mapping(file: impl Into<Arc<File>>, bytes: u64) -> Result<GuestMemory, MemoryError> {
    let size = check_size(bytes)?;
    let region = MmapRegionBuilder::new_with_bitmap(size, ())
        .with_file_offset(FileOffset::from_arc(file.into(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    from_region(region)
}

/// A read-only shared mapping of a snapshot memory file with its data
/// extents locked in RAM. Every sandbox restored from the file maps these
/// page-cache pages; locked, host reclaim (kswapd, or DAMON's `pageout`
/// scheme) cannot evict them, and a sandbox's next exec never waits for
/// pages to come back from disk. Holes are not locked: they cost nothing.
/// Dropping it unmaps (and so unlocks) the pages.
pub struct ResidentFile {
    addr: *mut libc::c_void,
    len: usize,
    /// Bytes locked (the file's data extents).
    pub locked_bytes: u64,
}

// SAFETY: the mapping is only ever unmapped, in Drop; nothing reads through
// the pointer, so sharing or moving it across threads is harmless.
unsafe impl Send for ResidentFile {}
// SAFETY: as above: no access through the pointer.
unsafe impl Sync for ResidentFile {}

/// The data extents of `file` in `[0, len)` as page-aligned (start, end).
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on a file descriptor `file` owns; no memory is passed.
        let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(extents) } else { Err(e) };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = ((start as u64) & !(PAGE as u64 - 1), (end as u64).min(len).next_multiple_of(PAGE as u64).min(len));
        if end > start {
            extents.push((start, end));
        }
        at = end.max(at + PAGE as u64);
    }
    Ok(extents)
}

/// Holes up to this size between data extents are locked with them: the
/// `default` template's 147 extents become 27 ranges for 1.8 MiB more.
const LOCK_JOIN_GAP: u64 = 64 << 10;

/// Maps `file` (`len` bytes) shared and read-only and locks its data
/// extents (reading them in from disk if they are not cached).
pub fn lock_resident(file: &File, len: u64) -> Result<ResidentFile, MemoryError> {
    use std::os::fd::AsRawFd;
    let size = check_size(len)?;
    let err = |source| MemoryError::File { path: "template memory (lock)".into(), source };
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for (start, end) in data_extents(file, len).map_err(err)? {
        // Each locked range splits the mapping (one more VMA): ranges a
        // small hole apart are locked as one, the hole's few pages with them.
        match extents.last_mut() {
            Some(last) if start - last.1 <= LOCK_JOIN_GAP => last.1 = end,
            _ => extents.push((start, end)),
        }
    }
    // SAFETY: a new shared read-only mapping chosen by the kernel; `size`
    // is the file's length, checked above, and the fd is open.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if addr == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error()));
    }
    let mut resident = ResidentFile { addr, len: size, locked_bytes: 0 };
    for (start, end) in extents {
        // SAFETY: [start, end) lies inside the mapping just made (extents
        // are clipped to `len`) and is page aligned.
        if unsafe { libc::mlock(addr.cast::<u8>().add(start as usize).cast(), (end - start) as usize) } != 0 {
            // Dropping `resident` unmaps what was locked so far.
            return Err(err(std::io::Error::last_os_error()));
        }
        resident.locked_bytes += end - start;
    }
    Ok(resident)
}

impl Drop for ResidentFile {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping made in
        // `lock_resident`, unmapped only here.
        unsafe { libc::munmap(self.addr, self.len) };
    }
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
    set_slots(vm, mem, 0)
}

/// Turns KVM's dirty-page log of guest RAM on or off (a fork copies while
/// the guest runs, then only what it wrote meanwhile).
pub fn set_dirty_log(vm: &VmFd, mem: &GuestMemory, on: bool) -> Result<(), MemoryError> {
    set_slots(vm, mem, if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
}

fn set_slots(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr();
        let entry = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host+len) is a live mapping owned by
        // `mem`; the VM struct keeps `mem` alive until after the VM fd (and
        // with it every slot) is closed, regions of one GuestMemory never
        // overlap, and each gets its own slot number (the same one again
        // when only the flags change).
        unsafe { vm.set_user_memory_region(entry) }.map_err(MemoryError::Slot)?;
    }
    Ok(())
}

/// Guest pages written since the dirty log was turned on or last read
/// (one flag per page of the single RAM region); reading re-arms it.
pub fn dirty_pages(vm: &VmFd, mem: &GuestMemory) -> Result<Vec<bool>, MemoryError> {
    let (_, len) = region_of(mem)?;
    let bitmap = vm.get_dirty_log(0, len as usize).map_err(MemoryError::Slot)?;
    let pages = (len / PAGE as u64) as usize;
    Ok((0..pages).map(|p| bitmap.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)).collect())
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

/// A run of guest pages: `pages` pages from guest page number `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageRun {
    /// First guest page number (guest-physical address / 4 KiB).
    pub first: u64,
    /// Length in pages.
    pub pages: u64,
}

/// Runs closer than this many pages are joined into one: a few pages
/// copied along cost less than one more mapping per gap (every run is a
/// mapping in each VM that maps the image, and `vm.max_map_count` bounds
/// them per process). Measured on a restored sandbox after one exec (~400
/// pages it wrote, scattered by its kernel): gap 0 gives ~300 runs; 16, ~95
/// runs covering 3.4x the pages; 64, ~26 runs covering 9x.
pub const MERGE_GAP_PAGES: u64 = 16;

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

fn region_of(mem: &GuestMemory) -> Result<(*mut u8, u64), MemoryError> {
    let mut regions = mem.iter();
    let region = regions.next().ok_or_else(|| MemoryError::Map("guest memory has no region".into()))?;
    if regions.next().is_some() || region.start_addr().0 != 0 {
        return Err(MemoryError::Map("fork needs guest RAM as one region at address 0".into()));
    }
    Ok((region.as_ptr(), region.len()))
}

/// The guest pages this VM holds itself rather than shares with its
/// template file, one flag per page: pages it wrote (anonymous copies,
/// present or swapped, read from `/proc/self/pagemap`) and the runs of an
/// image it was given by an earlier fork (`overlay`: they read as file
/// pages). A running VM may add pages right after.
pub fn own_pages(mem: &GuestMemory, overlay: &[PageRun]) -> Result<Vec<bool>, MemoryError> {
    let (host, len) = region_of(mem)?;
    let pages = (len / PAGE as u64) as usize;
    let mut own = pages_of(overlay, pages);
    let path = "/proc/self/pagemap";
    let err = |source| MemoryError::File { path: path.into(), source };
    let file = File::open(path).map_err(err)?;
    const CHUNK: usize = 1 << 16;
    let mut buf = vec![0u8; CHUNK * 8];
    let first_vpage = host as u64 / PAGE as u64;
    let mut done = 0usize;
    while done < pages {
        let n = CHUNK.min(pages - done);
        let bytes = &mut buf[..n * 8];
        file.read_exact_at(bytes, (first_vpage + done as u64) * 8).map_err(err)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let anon = e & PAGEMAP_PRESENT != 0 && e & PAGEMAP_FILE_OR_SHARED == 0;
            if anon || e & PAGEMAP_SWAPPED != 0 {
                own[done + i] = true;
            }
        }
        done += n;
    }
    Ok(own)
}

/// Sorted runs of the `true` pages, gaps of up to [`MERGE_GAP_PAGES`] joined.
pub fn runs_of(own: &[bool]) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for (p, _) in own.iter().enumerate().filter(|(_, o)| **o) {
        let p = p as u64;
        match runs.last_mut() {
            Some(r) if p - (r.first + r.pages) <= MERGE_GAP_PAGES => r.pages = p + 1 - r.first,
            _ => runs.push(PageRun { first: p, pages: 1 }),
        }
    }
    runs
}

/// A VM's own pages captured for a fork: a sealed memfd as large as guest
/// RAM, holding the runs (all-zero pages left as holes). The parent and
/// every child map it copy-on-write over their template mapping; the kernel
/// frees it when the last such mapping goes, since nobody keeps the fd.
pub struct ForkImage {
    file: File,
    /// What the image holds; everything else comes from the template file.
    pub runs: Vec<PageRun>,
    /// Bytes of non-zero pages written.
    pub data_bytes: u64,
}

/// Pages copied per `pwrite` at most.
const CAPTURE_BATCH_PAGES: u64 = 256;

/// Whether a page that reads as all zero is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeros {
    /// Left as a hole (the image reads zero there anyway).
    Skip,
    /// Written: an earlier copy may hold other bytes for this page.
    Write,
}

/// An image being filled: a memfd as large as guest RAM.
pub struct ImageBuilder {
    file: File,
    len: u64,
    data_bytes: u64,
}

/// Whether the page at `page` reads as all zero. Volatile reads: the guest
/// may be writing it meanwhile (a pre-copy copies such pages again once it
/// is paused).
///
/// # Safety
/// `page` points at a whole, page-aligned page of a live mapping.
unsafe fn page_is_zero(page: *const u8) -> bool {
    let words = page.cast::<u64>();
    // SAFETY: in the page the caller vouches for, and u64 aligned.
    (0..PAGE / 8).all(|i| unsafe { std::ptr::read_volatile(words.add(i)) } == 0)
}

impl ImageBuilder {
    /// An empty image for guest RAM of `mem`'s size.
    pub fn new(mem: &GuestMemory) -> Result<ImageBuilder, MemoryError> {
        let (_, len) = region_of(mem)?;
        let err = |source| MemoryError::File { path: "fork image (memfd_create)".into(), source };
        // SAFETY: a constant NUL-terminated name; the flags create a new fd.
        let fd = unsafe { libc::memfd_create(c"podflare-fork".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len).map_err(|e| MemoryError::File { path: "fork image (size)".into(), source: e })?;
        Ok(ImageBuilder { file, len, data_bytes: 0 })
    }

    /// Copies the flagged pages of `mem` into the image.
    ///
    /// # Safety
    /// `mem` stays mapped throughout. If anything writes it meanwhile (a
    /// running guest), the pages it writes must be copied again later.
    pub unsafe fn copy(&mut self, mem: &GuestMemory, pages: &[bool], zeros: Zeros) -> Result<(), MemoryError> {
        let (host, len) = region_of(mem)?;
        if len != self.len || pages.len() as u64 != len / PAGE as u64 {
            return Err(MemoryError::Map("fork image and guest RAM differ in size".into()));
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let at = |p: u64| host.wrapping_add((p * PAGE as u64) as usize) as *const u8;
        let wanted = |p: u64| {
            // SAFETY: p < pages.len(), so the page lies inside the region.
            pages[p as usize] && (zeros == Zeros::Write || !unsafe { page_is_zero(at(p)) })
        };
        let end = pages.len() as u64;
        let mut p = 0u64;
        while p < end {
            if !wanted(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < end && p - start < CAPTURE_BATCH_PAGES && wanted(p) {
                p += 1;
            }
            let (mut off, mut left) = (start * PAGE as u64, ((p - start) * PAGE as u64) as usize);
            while left > 0 {
                // SAFETY: [host+off, host+off+left) lies inside the region
                // (pages < end); the kernel copies from it, no Rust
                // reference to guest memory is made.
                let n = unsafe { libc::pwrite(fd, host.add(off as usize).cast(), left, off as libc::off_t) };
                if n <= 0 {
                    return Err(MemoryError::File { path: "fork image (write)".into(), source: std::io::Error::last_os_error() });
                }
                off += n as u64;
                left -= n as usize;
            }
            self.data_bytes += (p - start) * PAGE as u64;
        }
        Ok(())
    }

    /// An image written into `file` (a frozen space's memory file, on
    /// disk) rather than a memfd: sized to guest RAM, holes but for the
    /// pages copied in.
    pub fn on_file(file: File, mem: &GuestMemory) -> Result<ImageBuilder, MemoryError> {
        let (_, len) = region_of(mem)?;
        file.set_len(len).map_err(|e| MemoryError::File { path: "space memory (size)".into(), source: e })?;
        Ok(ImageBuilder { file, len, data_bytes: 0 })
    }

    /// The file written into, for a caller that keeps it unsealed.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Non-zero bytes copied in so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Seals the image (no resize, no write) as holding `runs`.
    pub fn seal(self, runs: Vec<PageRun>) -> Result<ForkImage, MemoryError> {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: plain fcntl on our own fd; no shared writable mapping exists.
        if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&self.file), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(MemoryError::File { path: "fork image (seal)".into(), source: std::io::Error::last_os_error() });
        }
        Ok(ForkImage { file: self.file, runs, data_bytes: self.data_bytes })
    }
}

impl ForkImage {
    /// An image read back from a file holding `runs` at their guest offsets
    /// (a frozen space's memory). The caller has checked the file's size
    /// and digest; mapping it private never writes it.
    pub fn from_file(file: File, runs: Vec<PageRun>, data_bytes: u64) -> ForkImage {
        ForkImage { file, runs, data_bytes }
    }
}

/// CRC-32 over the bytes of `runs` in `file` (holes read as zeros), in run
/// order: what a frozen space's memory must still hold when resumed. A CRC
/// finds a damaged or truncated file (the hazard: whoever can write the
/// spaces directory owns the host anyway) at memory speed, so a resume
/// checks every byte and stays fast.
pub fn checksum_runs(file: &File, runs: &[PageRun]) -> Result<u32, MemoryError> {
    let err = |source| MemoryError::File { path: "space memory (read)".into(), source };
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for r in runs {
        let (mut off, end) = (r.first * PAGE as u64, (r.first + r.pages) * PAGE as u64);
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], off).map_err(err)?;
            crc.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(crc.finalize())
}

/// Pages covered by `runs`, one flag per page of guest RAM.
pub fn pages_of(runs: &[PageRun], total: usize) -> Vec<bool> {
    let mut v = vec![false; total];
    for r in runs {
        let end = ((r.first + r.pages) as usize).min(total);
        for f in &mut v[(r.first as usize).min(end)..end] {
            *f = true;
        }
    }
    v
}

/// Maps `image`'s runs copy-on-write over the same guest pages of `mem`
/// (whose other pages keep mapping the template file).
///
/// # Safety
/// The VM that uses `mem`, if any, is paused and its device thread held:
/// the pages change under it (KVM follows through its MMU notifier), and
/// nothing may hold a reference into the replaced ranges.
pub unsafe fn map_image(mem: &GuestMemory, image: &ForkImage) -> Result<(), MemoryError> {
    // SAFETY: the caller's promise, passed on.
    unsafe { map_image_runs(mem, image, &image.runs) }
}

/// Maps the guest pages `runs` of `image` (pages the image holds: a layer
/// plan's runs for that layer) copy-on-write over the same pages of `mem`.
///
/// # Safety
/// As [`map_image`].
pub unsafe fn map_image_runs(mem: &GuestMemory, image: &ForkImage, runs: &[PageRun]) -> Result<(), MemoryError> {
    let (host, len) = region_of(mem)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&image.file);
    for r in runs {
        let (off, bytes) = (r.first * PAGE as u64, r.pages * PAGE as u64);
        if off + bytes > len {
            return Err(MemoryError::Map(format!("page run {r:?} is outside guest RAM")));
        }
        // SAFETY: [host+off, host+off+bytes) lies inside the mapping `mem`
        // owns (checked above), so MAP_FIXED replaces only guest RAM; the
        // file offset is within the image (same size as RAM).
        let got = unsafe {
            libc::mmap(
                host.add(off as usize).cast(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                off as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(MemoryError::Map(format!("mapping the fork image: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// Where each page of a VM with `layers` stacked over its template comes
/// from: maximal runs, each with the index of the topmost layer holding it
/// (pages no layer holds are left out: they map the template). A child
/// maps exactly these, one mapping per run, instead of every layer's runs
/// over each other.
pub fn layer_plan(layers: &[std::sync::Arc<ForkImage>], total_pages: usize) -> Vec<(PageRun, usize)> {
    const NONE: u16 = u16::MAX;
    let mut top = vec![NONE; total_pages];
    // A VM has a handful of layers (the VMM folds them past a few), so the
    // index fits; one past u16 would only merge the highest ones wrongly.
    for (k, layer) in layers.iter().enumerate().take(usize::from(NONE)) {
        let k = k as u16;
        for r in &layer.runs {
            let end = ((r.first + r.pages) as usize).min(total_pages);
            for t in &mut top[(r.first as usize).min(end)..end] {
                *t = k;
            }
        }
    }
    let mut plan: Vec<(PageRun, usize)> = Vec::new();
    for (p, &k) in top.iter().enumerate() {
        if k == NONE {
            continue;
        }
        match plan.last_mut() {
            Some((r, last)) if *last == k as usize && r.first + r.pages == p as u64 => r.pages += 1,
            _ => plan.push((PageRun { first: p as u64, pages: 1 }, k as usize)),
        }
    }
    plan
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

/// Bytes of the VM's RAM that are its own: the pages it has written since
/// it was restored or forked (copy-on-write copies of its snapshot's or its
/// layers' pages, fresh anonymous pages), counted in `/proc/self/pagemap`
/// over its own range only. `/proc/self/smaps` would walk every mapping of
/// the process, all other VMs' included, for each VM asked about: a
/// capacity call or metrics scrape over N sandboxes was then quadratic
/// (minutes of CPU at 200 sandboxes). In anonymous RAM (a cold boot), a
/// page the guest only read maps the shared zero page and counts too.
pub fn private_bytes(mem: &GuestMemory) -> u64 {
    own_pages(mem, &[]).map_or(0, |own| own.iter().filter(|o| **o).count() as u64 * PAGE as u64)
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
    fn a_layer_plan_maps_each_page_from_its_topmost_layer() {
        // 2 MiB of RAM, the least a guest may have; the plan covers its
        // first 16 pages.
        let gm = anonymous(2 << 20).unwrap();
        let layer = |runs: Vec<PageRun>| std::sync::Arc::new(ImageBuilder::new(&gm).unwrap().seal(runs).unwrap());
        let run = |first, pages| PageRun { first, pages };
        let layers = vec![layer(vec![run(0, 6), run(10, 2)]), layer(vec![run(2, 2), run(11, 3)])];
        assert_eq!(
            layer_plan(&layers, 16),
            vec![(run(0, 2), 0), (run(2, 2), 1), (run(4, 2), 0), (run(10, 1), 0), (run(11, 3), 1)]
        );
        assert!(layer_plan(&[], 16).is_empty());
    }

    #[test]
    fn runs_join_small_gaps_only() {
        let mut own = vec![false; 1000];
        for p in [3, 4, 5, 5 + MERGE_GAP_PAGES as usize + 1, 900, 999] {
            own[p] = true;
        }
        assert_eq!(
            runs_of(&own),
            vec![
                PageRun { first: 3, pages: MERGE_GAP_PAGES + 4 },
                PageRun { first: 900, pages: 1 },
                PageRun { first: 999, pages: 1 }
            ]
        );
        assert!(runs_of(&[false; 10]).is_empty());
    }

    #[test]
    fn a_fork_image_holds_own_pages_and_maps_under_a_template() {
        // "Template": a sparse file with one page; the "parent" writes two
        // pages (one of them all zero) over a private mapping of it.
        let template = anonymous(4 << 20).unwrap();
        template.write_slice(b"template", GuestAddress(0x5000)).unwrap();
        let dir = std::env::temp_dir().join(format!("pf-fork-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        write_sparse(&template, &path).unwrap();
        let parent = private_file_mapping(File::open(&path).unwrap(), 4 << 20).unwrap();
        parent.write_slice(b"parent", GuestAddress(0x1000)).unwrap();
        parent.write_slice(&[0u8; 8], GuestAddress(0x3000)).unwrap();
        let mut buf = [0u8; 8];
        parent.read_slice(&mut buf, GuestAddress(0x5000)).unwrap();
        let own = own_pages(&parent, &[]).unwrap();
        let runs = runs_of(&own);
        assert_eq!(runs, vec![PageRun { first: 1, pages: 3 }], "written pages only, the gap joined");
        let mut builder = ImageBuilder::new(&parent).unwrap();
        // SAFETY: nothing else uses `parent` in this test.
        unsafe { builder.copy(&parent, &pages_of(&runs, own.len()), Zeros::Skip) }.unwrap();
        let image = builder.seal(runs).unwrap();
        assert_eq!(image.data_bytes, PAGE as u64, "zero pages are holes");
        let child = private_file_mapping(File::open(&path).unwrap(), 4 << 20).unwrap();
        // SAFETY: `child` is fresh and unused by any VM or reference.
        unsafe { map_image(&child, &image).unwrap() };
        // SAFETY: `parent` backs no VM, and no reference into it is held.
        unsafe { map_image(&parent, &image).unwrap() };
        drop(image);
        let mut buf = [0u8; 8];
        child.read_slice(&mut buf[..6], GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf[..6], b"parent");
        child.read_slice(&mut buf, GuestAddress(0x5000)).unwrap();
        assert_eq!(&buf, b"template", "other pages come from the template");
        child.write_slice(b"CHILD!", GuestAddress(0x1000)).unwrap();
        parent.read_slice(&mut buf[..6], GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf[..6], b"parent", "a child's write stays its own");
        let again = own_pages(&parent, &[PageRun { first: 1, pages: 3 }]).unwrap();
        assert_eq!(runs_of(&again), vec![PageRun { first: 1, pages: 3 }], "the overlay counts as the VM's own");
        std::fs::remove_dir_all(&dir).unwrap();
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
        b.read_slice(&mut buf, GuestAddress(2 << 20)).unwrap();
        assert_eq!(private_bytes(&a), PAGE as u64, "the one page `a` wrote is its own");
        assert_eq!(private_bytes(&b), 0, "pages only read (data or hole) stay the file's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// "Locked:" kB of the mappings within [addr, addr + len) in
    /// /proc/self/smaps (locking part of a mapping splits it).
    fn locked_kb(addr: usize, len: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut kb = 0;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((Ok(start), Ok(end))) = range.map(|(a, b)| (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))) {
                inside = start >= addr && end <= addr + len;
            } else if let (true, Some(v)) = (inside, line.strip_prefix("Locked:")) {
                kb += v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
            }
        }
        kb
    }

    #[test]
    fn a_resident_file_locks_its_data_extents_only() {
        let mem = anonymous(4 << 20).unwrap();
        mem.write_slice(b"one", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"two", GuestAddress(0x2000)).unwrap();
        mem.write_slice(b"near", GuestAddress(0x5000)).unwrap();
        mem.write_slice(b"far", GuestAddress((3 << 20) + 0x10)).unwrap();
        let dir = std::env::temp_dir().join(format!("pf-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        write_sparse(&mem, &path).unwrap();
        let file = File::open(&path).unwrap();
        let far = (3 << 20, (3 << 20) + 0x1000);
        assert_eq!(data_extents(&file, 4 << 20).unwrap(), vec![(0x1000, 0x3000), (0x5000, 0x6000), far]);
        let resident = lock_resident(&file, 4 << 20).unwrap();
        assert_eq!(resident.locked_bytes, 6 * PAGE as u64, "0x1000-0x6000 (a small hole joined) and one far page");
        assert_eq!(locked_kb(resident.addr as usize, resident.len), 24, "the large holes are not locked");
        drop(resident);
        assert!(lock_resident(&file, 3 << 19).is_err(), "a size not a multiple of 2 MiB is refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

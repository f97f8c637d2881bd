//! virtio-blk over a file: read-only (the shared base rootfs) or writable (a
//! sandbox's scratch disk: a sparse file holding the ext4 file system the
//! guest mounts as the writable layer of its root).
//!
//! Requests (virtio 1.1 section 5.2.6): a readable 16-byte header (type,
//! reserved, sector), data descriptors, and a device-writable status byte as
//! the last byte of the last descriptor. A chain whose last descriptor cannot
//! hold the status is returned to the guest unused (length 0): there is no
//! way to report an error for it. Everything else gets a status.
//!
//! A writable device also serves writes, write-zeroes and discards, each
//! checked against a write limit at or below the capacity: the capacity is
//! fixed in a template snapshot at the largest disk any sandbox may get, and
//! the limit keeps a guest that writes its block device directly (as root,
//! past its file system) within what its own sandbox was given.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use super::{chain_descriptors, read_config_bytes, DeviceState, Interrupt, VirtioDevice};
use crate::devices::{DeviceError, GuestMemory};

/// Bytes per virtio-blk sector (fixed by the spec, whatever the host's).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (queue size less header and status,
/// rounded down); larger requests mean fewer emulated guest-kernel round trips.
const SEG_MAX: u32 = 128;
/// Bounce buffer for reads and writes: file <-> host buffer <-> checked guest
/// access. Bounded so one request never makes us allocate what the guest asks.
const CHUNK: usize = 128 * 1024;
const REQ_HEADER_LEN: u32 = 16;

/// Sectors one discard or write-zeroes segment may cover: 2 GiB. Large, so a
/// guest trims or zeroes a whole scratch disk in a handful of requests; a
/// multiple of [`DWZ_ALIGN_SECTORS`], so a request the guest splits at this
/// size stays 4 KiB-aligned; and bounded, because when the host file system
/// cannot punch holes the range is written with zeros on the device thread,
/// and this caps that work per segment.
const DWZ_MAX_SECTORS: u32 = 1 << 22;
/// Segments one discard or write-zeroes request may carry (advertised as
/// both max_discard_seg and max_write_zeroes_seg). Linux puts discards of
/// separate ranges (a deleted file's extents) into one request up to this
/// count, saving queue round trips; it sends write-zeroes one range at a
/// time. Small, so the parse buffer stays on the stack and the work of one
/// request stays bounded. A request with more is IOERR.
const DWZ_MAX_SEGS: u32 = 8;
/// Discard alignment (sectors) we advertise: 4 KiB, the guest ext4 block and
/// the host page, so the guest sends ranges whose holes free whole host blocks.
const DWZ_ALIGN_SECTORS: u32 = 8;
/// `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors,
/// le32 flags.
const DWZ_SEG_LEN: usize = 16;

/// Config space of a read-only device: capacity, size_max, seg_max. Kept at
/// 16 bytes so the base image's device reads exactly as before writable mode.
const CONFIG_LEN_RO: usize = 16;
/// Config space of a writable device: up to and including
/// write_zeroes_may_unmap and its 3 padding bytes.
const CONFIG_LEN_RW: usize = 60;

/// Status and bytes written into guest buffers (excluding the status byte).
type Outcome = (u32, u32);

const IOERR: Outcome = (VIRTIO_BLK_S_IOERR, 0);

struct Active {
    mem: GuestMemory,
    interrupt: Interrupt,
    queue: Queue,
}

/// Saved state: the device has none of its own beyond its queue and write
/// limit; the capacity and mode are recorded to refuse restoring onto a
/// different disk.
///
/// The two writable-mode fields default when absent, so states saved before
/// writable mode existed (read-only, `{"capacity": N}`) still load; a
/// read-only device leaves them out when saving, so its state reads as before.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Sectors of the disk the snapshot was taken with.
    pub capacity: u64,
    /// Whether the device was writable.
    #[serde(default, skip_serializing_if = "is_false")]
    pub writable: bool,
    /// The write limit in bytes (0 on a read-only device). How a restore
    /// uses it: see [`Block`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub write_limit: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A virtio-blk device, read-only ([`Block::new`]) or writable
/// ([`Block::writable`]).
///
/// Restoring a writable device (`VirtioDevice::restore`): a write limit the
/// caller set with [`Block::set_write_limit`] before the restore wins; if the
/// caller set none, the saved limit is used (and stored into a limit shared
/// with [`Block::sharing_limit`], so its owner sees it). So a limit the caller
/// chose for this sandbox is never overridden by the template's, and a
/// resumed sandbox or a fork child keeps the limit it was saved with unless
/// told otherwise.
pub struct Block {
    /// Shared: a template's base image serves all its sandboxes' devices,
    /// and a writable disk's owner keeps the same open file.
    file: Arc<File>,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Capacity in sectors; a partial last sector is not exposed.
    capacity: u64,
    writable: bool,
    /// Bytes from the start of the disk that writes may reach (0 on a
    /// read-only device). Atomic and shareable so the host can move it while
    /// the device runs (a sandbox's file system grown at create); a value
    /// past the capacity counts as the capacity. Relaxed loads and stores: the
    /// value publishes no other memory, and a write racing a change of limit
    /// may see either value.
    write_limit: Arc<AtomicU64>,
    /// Whether the caller set the limit: then a restore keeps it.
    limit_set: bool,
    config: [u8; CONFIG_LEN_RW],
    config_len: usize,
    queue_sizes: [u16; 1],
    active: Option<Active>,
    buf: Vec<u8>,
}

impl Block {
    /// A device serving `file` read-only; `id` (at most 20 bytes are kept) is
    /// what GET_ID returns (`/sys/block/vda/serial` in the guest).
    pub fn new(file: impl Into<Arc<File>>, id: &str) -> Result<Self, DeviceError> {
        let file = file.into();
        // Seek to the end rather than metadata: that also sizes block
        // devices. The shared offset moves, but every read is positioned.
        let len = (&*file).seek(SeekFrom::End(0)).map_err(DeviceError::Io)?;
        let capacity = len / SECTOR_SIZE;
        // virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config = [0u8; CONFIG_LEN_RW];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            file,
            id: id_bytes(id),
            capacity,
            writable: false,
            write_limit: Arc::new(AtomicU64::new(0)),
            limit_set: false,
            config,
            config_len: CONFIG_LEN_RO,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            buf: Vec::new(),
        })
    }

    /// A writable device over `file` exposing `capacity_bytes / 512` sectors,
    /// whatever the file's length: the caller sizes the sparse file (reads
    /// past its end return zeros, writes past it extend it). `file` should be
    /// open for reading and writing; if it is not, writes fail with IOERR.
    /// The write limit starts at the capacity.
    ///
    /// Returns a `Result` like [`Block::new`], so callers handle both alike;
    /// it has no failure of its own today.
    pub fn writable(file: impl Into<Arc<File>>, id: &str, capacity_bytes: u64) -> Result<Self, DeviceError> {
        let file = file.into();
        let capacity = capacity_bytes / SECTOR_SIZE;
        let mut config = [0u8; CONFIG_LEN_RW];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &capacity.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        // blk_size (20) stays 0 and VIRTIO_BLK_F_BLK_SIZE unoffered: the guest
        // then uses 512-byte logical blocks, and its ext4 uses 4 KiB anyway.
        put(36, &DWZ_MAX_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &DWZ_MAX_SEGS.to_le_bytes()); // max_discard_seg
        put(44, &DWZ_ALIGN_SECTORS.to_le_bytes()); // discard_sector_alignment
        put(48, &DWZ_MAX_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &DWZ_MAX_SEGS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap: we punch holes for it
        Ok(Block {
            file,
            id: id_bytes(id),
            capacity,
            writable: true,
            write_limit: Arc::new(AtomicU64::new(capacity * SECTOR_SIZE)),
            limit_set: false,
            config,
            config_len: CONFIG_LEN_RW,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            buf: Vec::new(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device takes writes.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Limits writes, write-zeroes and discards to the first `bytes` bytes of
    /// the disk: a request whose range ends past it fails with IOERR and
    /// changes nothing. Reads are not limited. A limit above the capacity is
    /// the capacity. Ignored on a read-only device (nothing is writable).
    /// A limit set here survives a later `restore` (see [`Block`]).
    pub fn set_write_limit(&mut self, bytes: u64) {
        if self.writable {
            self.write_limit.store(bytes.min(self.capacity_bytes()), Ordering::Relaxed);
            self.limit_set = true;
        }
    }

    /// The write limit in effect, in bytes (0 on a read-only device).
    pub fn write_limit(&self) -> u64 {
        self.write_limit.load(Ordering::Relaxed).min(self.capacity_bytes())
    }

    /// Uses `limit` (bytes) as the write limit from now on, shared with its
    /// owner: the owner may raise or lower it while the device runs, and each
    /// request checks the value current when it is served. Unlike
    /// [`Block::set_write_limit`] this does not fix the limit for a restore:
    /// a restore stores the saved limit into `limit`. Ignored on a read-only
    /// device.
    pub fn sharing_limit(mut self, limit: Arc<AtomicU64>) -> Self {
        if self.writable {
            self.write_limit = limit;
        }
        self
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR_SIZE
    }

    fn process_queue(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
        let capacity_bytes = self.capacity * SECTOR_SIZE;
        let mut req = Requests {
            file: &self.file,
            id: &self.id,
            capacity_bytes,
            write_limit: self.writable.then_some(&*self.write_limit),
            buf: &mut self.buf,
        };
        let mut used_any = false;
        // Bounded: each pop consumes one avail entry, and virtio-queue refuses
        // an avail index more than a queue's worth ahead.
        while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let len = chain_descriptors(chain).map_or(0, |d| req.handle(&a.mem, &d));
            // A head index outside the ring cannot be returned; skip it.
            if a.queue.add_used(&a.mem, head, len).is_ok() {
                used_any = true;
            }
        }
        if used_any && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }
}

/// GET_ID's answer: the first 20 bytes of `id`, zero-padded.
fn id_bytes(id: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut out = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let n = id.len().min(out.len());
    out[..n].copy_from_slice(&id.as_bytes()[..n]);
    out
}

/// What request handling needs, borrowed apart from the queue.
struct Requests<'a> {
    file: &'a File,
    id: &'a [u8],
    capacity_bytes: u64,
    /// The write limit on a writable device, `None` on a read-only one.
    write_limit: Option<&'a AtomicU64>,
    buf: &'a mut [u8],
}

impl Requests<'_> {
    /// Handles one chain; returns the used length (0 = dropped).
    fn handle(&mut self, mem: &GuestMemory, descs: &[Descriptor]) -> u32 {
        let (Some(hdr), Some(last)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || !last.is_write_only() || last.len() == 0 {
            return 0;
        }
        let Some(status_addr) = last.addr().checked_add(u64::from(last.len() - 1)) else {
            return 0;
        };
        let data = &descs[1..descs.len() - 1];
        // Read per request: the limit's owner may move it between requests.
        let write_end = self.write_limit.map(|l| l.load(Ordering::Relaxed).min(self.capacity_bytes));
        let (status, written) = match (read_header(mem, hdr), write_end) {
            (None, _) => IOERR,
            (Some((VIRTIO_BLK_T_IN, sector)), _) => self.read(mem, sector, data),
            (Some((VIRTIO_BLK_T_OUT, sector)), Some(end)) => self.write(mem, sector, data, end),
            // Read-only device: writes fail.
            (Some((VIRTIO_BLK_T_OUT, _)), None) => IOERR,
            // Nothing to make durable. Read-only: nothing was written. Writable:
            // FLUSH is not offered, so the guest treats the disk as
            // write-through and should send none; our writes are in the host
            // page cache, which is all a scratch disk dying with its sandbox
            // needs (freezing a sandbox fsyncs the file). Syncing here would
            // only let a guest force synchronous host disk I/O at will.
            (Some((VIRTIO_BLK_T_FLUSH, _)), _) => (VIRTIO_BLK_S_OK, 0),
            (Some((VIRTIO_BLK_T_GET_ID, _)), _) => self.get_id(mem, data),
            (Some((ty @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES), _)), Some(end)) => {
                self.discard_or_zero(mem, data, ty == VIRTIO_BLK_T_WRITE_ZEROES, end)
            }
            (Some(_), _) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match mem.write_obj(status as u8, status_addr) {
            Ok(()) => written.saturating_add(1),
            Err(_) => written,
        }
    }

    fn read(&mut self, mem: &GuestMemory, sector: u64, data: &[Descriptor]) -> Outcome {
        if data.iter().any(|d| !d.is_write_only()) {
            return IOERR;
        }
        let Some(mut pos) = byte_range(sector, total_len(data), self.capacity_bytes) else {
            return IOERR;
        };
        let mut written = 0u32;
        for d in data {
            let mut done = 0u32;
            while done < d.len() {
                let n = (d.len() - done).min(self.buf.len() as u32);
                let chunk = &mut self.buf[..n as usize];
                // A writable disk's file may be shorter than its capacity
                // (sparse, sized by the caller): past its end reads as zeros.
                // A read-only image always covers its capacity.
                let read = if self.write_limit.is_some() {
                    read_zero_filled(self.file, chunk, pos)
                } else {
                    self.file.read_exact_at(chunk, pos)
                };
                let ok = read.is_ok()
                    && d.addr()
                        .checked_add(u64::from(done))
                        .is_some_and(|a| mem.write_slice(chunk, a).is_ok());
                if !ok {
                    return (VIRTIO_BLK_S_IOERR, written);
                }
                done += n;
                pos += u64::from(n);
                written = written.saturating_add(n);
            }
        }
        (VIRTIO_BLK_S_OK, written)
    }

    /// OUT on a writable device: guest buffers -> bounce buffer -> file.
    /// Used length 0 (plus the status byte): nothing is written into guest
    /// buffers.
    fn write(&mut self, mem: &GuestMemory, sector: u64, data: &[Descriptor], end: u64) -> Outcome {
        if data.iter().any(|d| d.is_write_only()) {
            return IOERR;
        }
        let Some(mut pos) = byte_range(sector, total_len(data), end) else {
            return IOERR;
        };
        // Every buffer must lie in guest memory before the file is touched,
        // so a bad address fails the request without a partial write.
        if !data.iter().all(|d| GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize)) {
            return IOERR;
        }
        for d in data {
            let mut done = 0u32;
            while done < d.len() {
                let n = (d.len() - done).min(self.buf.len() as u32);
                let chunk = &mut self.buf[..n as usize];
                // The file write may fail (ENOSPC on the host, a file opened
                // read-only): that is the guest's IOERR, not ours to panic on.
                let ok = d
                    .addr()
                    .checked_add(u64::from(done))
                    .is_some_and(|a| mem.read_slice(chunk, a).is_ok())
                    && self.file.write_all_at(chunk, pos).is_ok();
                if !ok {
                    return IOERR;
                }
                done += n;
                pos += u64::from(n);
            }
        }
        (VIRTIO_BLK_S_OK, 0)
    }

    /// DISCARD and WRITE_ZEROES on a writable device. Both punch holes: the
    /// ranges then read back as zeros (what WRITE_ZEROES promises; DISCARD
    /// promises nothing, and freeing host space is its point). A WRITE_ZEROES
    /// without the unmap flag asks the device to keep the sectors allocated;
    /// we punch anyway, since the backing file is sparse by design and an
    /// allocation made now would not stop a later host ENOSPC elsewhere.
    /// Every segment is checked before any is applied, so a request with one
    /// bad segment changes nothing.
    fn discard_or_zero(
        &mut self,
        mem: &GuestMemory,
        data: &[Descriptor],
        zeroes: bool,
        end: u64,
    ) -> Outcome {
        if data.iter().any(|d| d.is_write_only()) {
            return IOERR;
        }
        let total = total_len(data);
        let max = DWZ_SEG_LEN as u64 * u64::from(DWZ_MAX_SEGS);
        if total == 0 || !total.is_multiple_of(DWZ_SEG_LEN as u64) || total > max {
            return IOERR;
        }
        // Segments may straddle descriptors: gather the bytes in order first.
        let mut raw = [0u8; DWZ_SEG_LEN * DWZ_MAX_SEGS as usize];
        let mut at = 0usize;
        for d in data {
            let n = d.len() as usize;
            if mem.read_slice(&mut raw[at..at + n], d.addr()).is_err() {
                return IOERR;
            }
            at += n;
        }
        let mut ranges = [(0u64, 0u64); DWZ_MAX_SEGS as usize];
        let segs = raw[..at].chunks_exact(DWZ_SEG_LEN);
        for (slot, seg) in ranges.iter_mut().zip(segs) {
            let Some((sector, num_sectors, flags)) = parse_segment(seg) else {
                return IOERR;
            };
            // Spec 5.2.6.2: unknown flags are UNSUPP for both, and so is
            // unmap on a discard (a discard always may unmap).
            let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
            if flags & !unmap != 0 || (!zeroes && flags & unmap != 0) {
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            if num_sectors > DWZ_MAX_SECTORS {
                return IOERR;
            }
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            let Some(start) = byte_range(sector, len, end) else {
                return IOERR;
            };
            *slot = (start, len);
        }
        let n = at / DWZ_SEG_LEN;
        for &(start, len) in &ranges[..n] {
            // fallocate refuses a zero length (EINVAL); an empty range is done.
            if len > 0 && self.punch(start, len).is_err() {
                return IOERR;
            }
        }
        (VIRTIO_BLK_S_OK, 0)
    }

    /// Makes `[start, start + len)` read as zeros, freeing its host blocks
    /// where the host file system can punch holes, else writing zeros.
    fn punch(&mut self, start: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(n)) = (i64::try_from(start), i64::try_from(len)) else {
            return Err(Errno::EINVAL.into());
        };
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_raw_fd(), mode, off, n) {
            Ok(()) => Ok(()),
            Err(Errno::EOPNOTSUPP) => write_zeros(self.file, self.buf, start, len),
            Err(e) => Err(e.into()),
        }
    }

    fn get_id(&mut self, mem: &GuestMemory, data: &[Descriptor]) -> Outcome {
        if data.iter().any(|d| !d.is_write_only()) {
            return IOERR;
        }
        let mut rest = self.id;
        let mut written = 0u32;
        for d in data {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(d.len() as usize);
            if mem.write_slice(&rest[..n], d.addr()).is_err() {
                return (VIRTIO_BLK_S_IOERR, written);
            }
            rest = &rest[n..];
            written += n as u32;
        }
        (VIRTIO_BLK_S_OK, written)
    }
}

/// Sum of the descriptors' lengths (u64: a chain may exceed u32 in total).
fn total_len(data: &[Descriptor]) -> u64 {
    data.iter().map(|d| u64::from(d.len())).sum()
}

/// Start byte of `len` bytes at `sector`, if they end at or before `end`
/// without overflowing.
fn byte_range(sector: u64, len: u64, end: u64) -> Option<u64> {
    let start = sector.checked_mul(SECTOR_SIZE)?;
    (start.checked_add(len)? <= end).then_some(start)
}

/// One `virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
fn parse_segment(seg: &[u8]) -> Option<(u64, u32, u32)> {
    let sector = u64::from_le_bytes(seg.get(0..8)?.try_into().ok()?);
    let num = u32::from_le_bytes(seg.get(8..12)?.try_into().ok()?);
    let flags = u32::from_le_bytes(seg.get(12..16)?.try_into().ok()?);
    Some((sector, num, flags))
}

/// Fills `buf` from `file` at `pos`; bytes past the end of the file are zeros.
fn read_zero_filled(file: &File, buf: &mut [u8], mut pos: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => {
                done += n;
                pos += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `len` zero bytes at `start`, a bounce buffer at a time: the
/// fallback for host file systems that cannot punch holes.
fn write_zeros(file: &File, buf: &mut [u8], start: u64, len: u64) -> std::io::Result<()> {
    buf.fill(0);
    let mut pos = start;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64);
        if n == 0 {
            // An empty bounce buffer would never progress.
            return Err(Errno::EINVAL.into());
        }
        file.write_all_at(&buf[..n as usize], pos)?;
        pos += n;
        left -= n;
    }
    Ok(())
}

/// Type and sector of a request, from a readable header of at least 16 bytes.
fn read_header(mem: &GuestMemory, hdr: &Descriptor) -> Option<(u32, u64)> {
    if hdr.is_write_only() || hdr.len() < REQ_HEADER_LEN {
        return None;
    }
    let ty = mem.read_obj::<u32>(hdr.addr()).ok()?;
    let sector = mem.read_obj::<u64>(hdr.addr().checked_add(8)?).ok()?;
    Some((u32::from_le(ty), u64::from_le(sector)))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// Read-only: VERSION_1, RO, SEG_MAX. Writable: VERSION_1, SEG_MAX,
    /// DISCARD, WRITE_ZEROES; no FLUSH (so the guest sees a write-through
    /// disk and sends no flushes: durability of the scratch disk is the
    /// host's business, by fsync when a sandbox is frozen).
    fn features(&self) -> u64 {
        let base = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.writable {
            base | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        } else {
            base | (1 << VIRTIO_BLK_F_RO)
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config[..self.config_len], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing writable: no writeback-cache toggle (CONFIG_WCE unoffered).
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(DeviceError::BadState("virtio-blk needs exactly one queue".into()));
        };
        self.active = Some(Active { mem, interrupt, queue });
        // Requests posted before a restore or before activation completed.
        self.process_queue();
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        if index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            capacity: self.capacity,
            writable: self.writable,
            write_limit: self.write_limit(),
        })
    }

    /// Refuses a state of another capacity or mode. A writable device keeps
    /// a write limit its caller set before the restore, else takes the saved
    /// one (see [`Block`]).
    fn restore(
        &mut self,
        state: &DeviceState,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        let DeviceState::Block(st) = state else {
            return Err(DeviceError::BadState("virtio-blk given another device's state".into()));
        };
        if st.capacity != self.capacity {
            return Err(DeviceError::BadState(format!(
                "virtio-blk capacity {} saved, image has {}",
                st.capacity, self.capacity
            )));
        }
        if st.writable != self.writable {
            return Err(DeviceError::BadState(format!(
                "virtio-blk saved {}, device is {}",
                mode(st.writable),
                mode(self.writable)
            )));
        }
        // Checked before anything changes, so a refused state leaves the
        // device as it was.
        if self.writable && st.write_limit > self.capacity_bytes() {
            return Err(DeviceError::BadState(format!(
                "virtio-blk write limit {} saved, past capacity of {} sectors",
                st.write_limit, self.capacity
            )));
        }
        if self.writable && !self.limit_set {
            self.write_limit.store(st.write_limit, Ordering::Relaxed);
        }
        self.active = None;
        if queues.is_empty() {
            return Ok(());
        }
        self.activate(mem, interrupt, queues)
    }

    fn set_memory(&mut self, mem: &GuestMemory) -> bool {
        if let Some(a) = self.active.as_mut() {
            a.mem = mem.clone();
        }
        true
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

fn mode(writable: bool) -> &'static str {
    if writable {
        "writable"
    } else {
        "read-only"
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;

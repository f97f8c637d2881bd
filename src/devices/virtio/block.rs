//! Read-only virtio-blk over a file (the shared base rootfs).
//!
//! Requests (virtio 1.1 section 5.2.6): a readable 16-byte header (type,
//! reserved, sector), data descriptors, and a device-writable status byte as
//! the last byte of the last descriptor. A chain whose last descriptor cannot
//! hold the status is returned to the guest unused (length 0): there is no
//! way to report an error for it. Everything else gets a status.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes};

use super::{chain_descriptors, read_config_bytes, DeviceState, Interrupt, VirtioDevice};
use crate::devices::{DeviceError, GuestMemory};

/// Bytes per virtio-blk sector (fixed by the spec, whatever the host's).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (queue size less header and status,
/// rounded down); larger requests mean fewer emulated guest-kernel round trips.
const SEG_MAX: u32 = 128;
/// Bounce buffer for reads: file -> host buffer -> checked guest write.
const CHUNK: usize = 128 * 1024;
const REQ_HEADER_LEN: u32 = 16;

/// Status and bytes written into guest buffers (excluding the status byte).
type Outcome = (u32, u32);

struct Active {
    mem: GuestMemory,
    interrupt: Interrupt,
    queue: Queue,
}

/// Saved state: the device has none of its own beyond its queue; the capacity
/// is recorded to refuse restoring onto a different image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Sectors of the image the snapshot was taken with.
    pub capacity: u64,
}

/// A read-only virtio-blk device.
pub struct Block {
    file: File,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Capacity in sectors; a partial last sector of the file is not exposed.
    capacity: u64,
    config: [u8; 16],
    queue_sizes: [u16; 1],
    active: Option<Active>,
    buf: Vec<u8>,
}

impl Block {
    /// A device serving `file` read-only; `id` (at most 20 bytes are kept) is
    /// what GET_ID returns (`/sys/block/vda/serial` in the guest).
    pub fn new(mut file: File, id: &str) -> Result<Self, DeviceError> {
        // Seek to the end rather than metadata: that also sizes block devices.
        let len = file.seek(SeekFrom::End(0)).map_err(DeviceError::Io)?;
        let capacity = len / SECTOR_SIZE;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        // virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            file,
            id: id_bytes,
            capacity,
            config,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            buf: Vec::new(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn process_queue(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
        let req = Requests {
            file: &self.file,
            id: &self.id,
            capacity_bytes: self.capacity * SECTOR_SIZE,
            buf: &mut self.buf,
        };
        let mut req = req;
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

/// What request handling needs, borrowed apart from the queue.
struct Requests<'a> {
    file: &'a File,
    id: &'a [u8],
    capacity_bytes: u64,
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
        let (status, written) = match read_header(mem, hdr) {
            None => (VIRTIO_BLK_S_IOERR, 0),
            Some((VIRTIO_BLK_T_IN, sector)) => self.read(mem, sector, data),
            // Read-only device: writes fail, flushes have nothing to do.
            Some((VIRTIO_BLK_T_OUT, _)) => (VIRTIO_BLK_S_IOERR, 0),
            Some((VIRTIO_BLK_T_FLUSH, _)) => (VIRTIO_BLK_S_OK, 0),
            Some((VIRTIO_BLK_T_GET_ID, _)) => self.get_id(mem, data),
            Some(_) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match mem.write_obj(status as u8, status_addr) {
            Ok(()) => written.saturating_add(1),
            Err(_) => written,
        }
    }

    fn read(&mut self, mem: &GuestMemory, sector: u64, data: &[Descriptor]) -> Outcome {
        if data.iter().any(|d| !d.is_write_only()) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let in_range = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| Some((start, start.checked_add(total)?)))
            .filter(|&(_, end)| end <= self.capacity_bytes);
        let Some((mut pos, _)) = in_range else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut written = 0u32;
        for d in data {
            let mut done = 0u32;
            while done < d.len() {
                let n = (d.len() - done).min(self.buf.len() as u32);
                let chunk = &mut self.buf[..n as usize];
                let ok = self.file.read_exact_at(chunk, pos).is_ok()
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

    fn get_id(&mut self, mem: &GuestMemory, data: &[Descriptor]) -> Outcome {
        if data.iter().any(|d| !d.is_write_only()) {
            return (VIRTIO_BLK_S_IOERR, 0);
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

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_RO) | (1 << VIRTIO_BLK_F_SEG_MAX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing writable (no writeback-cache toggle on a read-only disk).
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
        DeviceState::Block(BlockState { capacity: self.capacity })
    }

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

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;

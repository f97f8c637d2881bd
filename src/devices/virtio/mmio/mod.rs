//! The virtio-mmio transport, version 2 ("modern") register layout, virtio
//! 1.1 section 4.2.2.
//!
//! Every register access arrives from a vCPU exit with guest-chosen offset,
//! size and value. Registers below 0x100 take aligned 32-bit accesses only;
//! anything else reads as zeros and writes are dropped. Queue configuration is
//! accepted only in the window the spec allows (after FEATURES_OK, before
//! DRIVER_OK, queue not ready), and the queues are checked against guest
//! memory before the device sees them.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::{clone_queue, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::devices::{DeviceError, GuestMemory};

/// Size of one virtio-mmio register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify: the VM registers one ioeventfd per queue here, with
/// the queue index as 4-byte datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Register offsets (virtio-bindings has them as u32; matched against u64).
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
const REG_QUEUE_USED_LOW: u64 = 0xa0;
const REG_QUEUE_USED_HIGH: u64 = 0xa4;
const REG_SHM_LEN_LOW: u64 = 0xb0;
const REG_SHM_BASE_HIGH: u64 = 0xbc;
const REG_CONFIG_GENERATION: u64 = 0xfc;

/// Status bits the driver may set; NEEDS_RESET belongs to the device.
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_FAILED;

/// A virtio device on the MMIO bus (one [`MMIO_LEN`] window).
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Interrupt,
    /// Queue configuration as the driver wrote it; after activation the
    /// device works on its own copies.
    queues: Vec<Queue>,
    status: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport in reset state for `device`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, interrupt: Interrupt) -> Self {
        // A max size that is not a power of two is a bug in our device; the
        // queue then reports QueueNumMax 0, which the driver treats as absent.
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).unwrap_or_default())
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The driver notified queue `index` (ioeventfd or a trapped write).
    /// Ignored unless the device is active and has that queue.
    pub fn queue_notify(&mut self, index: usize) {
        if self.activated && index < self.queues.len() {
            self.device.queue_notify(index);
        }
    }

    /// The device model.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Number of queues of the device.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether the driver brought the device up (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device cannot go on: stop it and tell the driver.
    fn fail_device(&mut self) {
        self.device.reset();
        self.activated = false;
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config();
    }

    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        self.status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
    }

    /// The selected queue, if it may be configured now (spec 4.2.3.2: after
    /// FEATURES_OK, before DRIVER_OK, while the queue is not ready).
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        let s = self.status;
        if self.activated
            || s & VIRTIO_CONFIG_S_FEATURES_OK == 0
            || s & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) != 0
        {
            return None;
        }
        let q = self.queues.get_mut(usize::try_from(self.queue_select).ok()?)?;
        (!q.ready()).then_some(q)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = (value & DRIVER_STATUS_BITS) | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        // The driver only ever adds bits (spec 2.1.2); anything else but a
        // reset is a confused driver and is ignored.
        if new & old != old {
            return;
        }
        let added = new & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && (self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
                || new & VIRTIO_CONFIG_S_DRIVER == 0)
        {
            // Refused: the driver reads FEATURES_OK back, sees it unset and
            // gives up (this transport is modern-only).
            new &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.status = new;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.activated {
            match self.activate() {
                Ok(()) => self.activated = true,
                Err(_) => self.fail_device(),
            }
        }
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(DeviceError::BadState("DRIVER_OK without FEATURES_OK".into()));
        }
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            return Err(DeviceError::BadState(format!("queue {i} not ready or outside memory")));
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut qs = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            let mut q = clone_queue(q)?;
            q.set_event_idx(event_idx);
            qs.push(q);
        }
        self.device
            .activate(self.mem.clone(), self.interrupt.clone(), qs)
            .inspect_err(|_| self.device.reset())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_NUM => self.selected_queue().map_or(0, |q| q.size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length and base read as all ones.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.features_select = v,
            REG_DRIVER_FEATURES => {
                let s = self.status;
                if s & VIRTIO_CONFIG_S_DRIVER == 0
                    || s & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) != 0
                {
                    return;
                }
                let (shift, mask) = match self.acked_features_select {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ => return,
                };
                // Only offered bits stick (spec 2.2.1: the device may refuse others).
                let bits = (u64::from(v) << shift) & self.device.features();
                self.acked_features = (self.acked_features & !mask) | bits;
            }
            REG_DRIVER_FEATURES_SEL => self.acked_features_select = v,
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM => {
                if let (Some(q), Ok(n)) = (self.configurable_queue(), u16::try_from(v)) {
                    // Rejects sizes that are zero, above max or not a power of two.
                    let _ = q.try_set_size(n);
                }
            }
            REG_QUEUE_READY => {
                let mem = self.mem.clone();
                if let Some(q) = self.configurable_queue() {
                    if v == 1 {
                        // Refuse a queue outside guest memory right away; the
                        // driver reads QueueReady 0 back.
                        q.set_ready(true);
                        if !q.is_valid(&mem) {
                            q.set_ready(false);
                        }
                    }
                } else if v == 0 && !self.activated {
                    if let Some(q) = self.queues.get_mut(self.queue_select as usize) {
                        q.set_ready(false);
                    }
                }
            }
            REG_QUEUE_NOTIFY => self.queue_notify(v as usize),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => self.set_queue_addr(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.set_queue_addr(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_AVAIL_LOW => self.set_queue_addr(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_AVAIL_HIGH => self.set_queue_addr(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_USED_LOW => self.set_queue_addr(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_USED_HIGH => self.set_queue_addr(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn set_queue_addr(&mut self, f: impl FnOnce(&mut Queue)) {
        // Misaligned addresses are refused by virtio-queue (the old value stays).
        if let Some(q) = self.configurable_queue() {
            f(q);
        }
    }
}

const REG_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => *word = self.read_reg(offset).to_le_bytes(),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status & VIRTIO_CONFIG_S_FAILED == 0 {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        if let Ok(word) = <[u8; 4]>::try_from(data) {
            if offset.is_multiple_of(4) {
                self.write_reg(offset, u32::from_le_bytes(word));
            }
        }
    }
}

mod persist;

pub use persist::{MmioState, SavedQueue};

#[cfg(test)]
pub(crate) mod tests;

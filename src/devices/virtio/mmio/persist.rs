//! Snapshot state of a virtio-mmio device: transport registers, queues and
//! the device's own typed state; restored as untrusted input.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{MmioTransport, DRIVER_STATUS_BITS};
use crate::devices::virtio::{clone_queue, queue_from_state, DeviceState, Interrupt, VirtioDevice};
use crate::devices::{DeviceError, GuestMemory};

/// One queue's saved configuration and ring positions (serde mirror of
/// virtio-queue's `QueueState`, which is not serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
    /// Queue size chosen by the driver.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table guest address.
    pub desc_table: u64,
    /// Available ring guest address.
    pub avail_ring: u64,
    /// Used ring guest address.
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(s: QueueState) -> Self {
        SavedQueue {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(s: SavedQueue) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Saved state of one virtio-mmio device: transport registers, queues and
/// the device's own `save()` value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device ID, checked on restore against the device handed in.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Whether the device was activated (DRIVER_OK accepted).
    pub activated: bool,
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub acked_features_select: u32,
    /// Feature bits the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// Every queue, in device order.
    pub queues: Vec<SavedQueue>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device's own typed state (`VirtioDevice::save`).
    pub device: DeviceState,
}

impl MmioTransport {
    /// Saved state, for a snapshot. Take it with the VM paused.
    pub fn state(&self) -> MmioState {
        let live = if self.activated { self.device.queue_states() } else { Vec::new() };
        let queues = if live.len() == self.queues.len() {
            live.into_iter().map(SavedQueue::from).collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            activated: self.activated,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            queues,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            device: self.device.save(),
        }
    }

    /// A transport from saved state, treated as untrusted input: the device
    /// type, queue count and sizes, features and status must be consistent,
    /// and an active device's queues must lie in `mem`. The device is
    /// re-activated with the restored queues if it was active.
    pub fn restore(
        state: &MmioState,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Interrupt,
    ) -> Result<Self, DeviceError> {
        let mut t = MmioTransport::new(device, mem, interrupt);
        let bad = |m: String| Err(DeviceError::BadState(m));
        if state.device_type != t.device.device_type() {
            return bad(format!(
                "device type {} saved, {} given",
                state.device_type,
                t.device.device_type()
            ));
        }
        if state.queues.len() != t.queues.len() {
            return bad(format!("{} queues saved, device has {}", state.queues.len(), t.queues.len()));
        }
        if state.acked_features & !t.device.features() != 0 {
            return bad(format!("acked features {:#x} not offered", state.acked_features));
        }
        if state.status & !(DRIVER_STATUS_BITS | VIRTIO_CONFIG_S_NEEDS_RESET) != 0 {
            return bad(format!("status {:#x} has unknown bits", state.status));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (sq, q)) in state.queues.iter().zip(&t.queues).enumerate() {
            if sq.max_size != q.max_size() {
                return bad(format!("queue {i} max size {} saved, device has {}", sq.max_size, q.max_size()));
            }
            queues.push(queue_from_state((*sq).into())?);
        }
        let ok_bits = VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        if state.activated
            && (state.status & ok_bits != ok_bits
                || queues.iter().any(|q| !q.is_valid(&t.mem)))
        {
            return bad("active device with invalid status or queues".into());
        }
        let device_queues = if state.activated {
            queues.iter().map(clone_queue).collect::<Result<Vec<_>, _>>()?
        } else {
            Vec::new()
        };
        t.queues = queues;
        t.status = state.status;
        t.features_select = state.features_select;
        t.acked_features_select = state.acked_features_select;
        t.acked_features = state.acked_features;
        t.queue_select = state.queue_select;
        t.config_generation = state.config_generation;
        t.device
            .restore(&state.device, t.mem.clone(), t.interrupt.clone(), device_queues)?;
        t.activated = state.activated;
        t.interrupt.restore_status(state.interrupt_status);
        Ok(t)
    }

    /// Replaces the guest memory object (after the VM's memory was remapped).
    /// An active device switches over in place (`VirtioDevice::set_memory`)
    /// or, if it cannot, through its save/restore; call with the VM paused.
    pub fn set_memory(&mut self, mem: GuestMemory) {
        self.mem = mem;
        if !self.activated {
            return;
        }
        let saved = self.state();
        let fits = saved.queues.iter().all(|sq| {
            queue_from_state((*sq).into()).is_ok_and(|q| q.is_valid(&self.mem))
        });
        if !fits {
            self.fail_device();
            return;
        }
        if self.device.set_memory(&self.mem) {
            return;
        }
        let queues: Result<Vec<Queue>, DeviceError> = saved
            .queues
            .iter()
            .map(|sq| queue_from_state((*sq).into()))
            .collect();
        let res = queues.and_then(|qs| {
            self.device
                .restore(&saved.device, self.mem.clone(), self.interrupt.clone(), qs)
        });
        if res.is_err() {
            self.fail_device();
        }
    }

}

//! A virtio device reachable both through its transport (guest register
//! accesses, queue notifications) and directly by host code (the console's
//! host-output kick), without the host path taking the transport lock.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_queue::{Queue, QueueState};

use super::{DeviceState, Interrupt, VirtioDevice};
use crate::devices::{DeviceError, GuestMemory};

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device models keep their state consistent between calls; a panic is
    // caught by the device thread, which fails the VM anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Lock order: transport, then device; the direct path takes only the device.
pub struct SharedDevice<D> {
    dev: Arc<Mutex<D>>,
    /// Fixed at construction; kept here so the trait can lend a slice.
    sizes: Vec<u16>,
}

impl<D: VirtioDevice> SharedDevice<D> {
    /// Wraps `dev`; the caller keeps its own `Arc` for the direct path.
    pub fn new(dev: Arc<Mutex<D>>) -> Self {
        let sizes = lock(&dev).queue_max_sizes().to_vec();
        SharedDevice { dev, sizes }
    }
}

impl<D: VirtioDevice> VirtioDevice for SharedDevice<D> {
    fn device_type(&self) -> u32 {
        lock(&self.dev).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        lock(&self.dev).features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).write_config(offset, data)
    }
    fn activate(&mut self, mem: GuestMemory, interrupt: Interrupt, queues: Vec<Queue>) -> Result<(), DeviceError> {
        lock(&self.dev).activate(mem, interrupt, queues)
    }
    fn queue_notify(&mut self, index: usize) {
        lock(&self.dev).queue_notify(index)
    }
    fn reset(&mut self) {
        lock(&self.dev).reset()
    }
    fn save(&self) -> DeviceState {
        lock(&self.dev).save()
    }
    fn restore(
        &mut self,
        state: &DeviceState,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        lock(&self.dev).restore(state, mem, interrupt, queues)
    }
    fn queue_states(&self) -> Vec<QueueState> {
        lock(&self.dev).queue_states()
    }
    fn set_memory(&mut self, mem: &GuestMemory) -> bool {
        lock(&self.dev).set_memory(mem)
    }
}

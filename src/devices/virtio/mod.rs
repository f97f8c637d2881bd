//! Virtio devices over the virtio-mmio transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns the register file and queue
//! configuration; a device ([`VirtioDevice`]) gets validated queues on
//! activation and is then driven by `queue_notify` from the VM's device thread
//! (the VM registers one ioeventfd per queue on the QueueNotify register).

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod shared;

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, GuestMemory};

/// Interrupt line of one virtio-mmio device: the irqfd plus the transport's
/// InterruptStatus bits, shared by the transport and the device.
#[derive(Clone)]
pub struct Interrupt {
    irqfd: Arc<EventFd>,
    status: Arc<AtomicU32>,
}

impl Interrupt {
    /// An interrupt line raising `irqfd` (registered by the VM for the
    /// device's GSI).
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            irqfd: Arc::new(irqfd),
            status: Arc::new(AtomicU32::new(0)),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // EAGAIN (counter saturated) means an interrupt is already pending,
        // which is all the guest needs; nothing else can fail on an eventfd.
        let _ = self.irqfd.write(1);
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// The device changed its configuration space (or needs a reset).
    pub fn signal_config(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status bits from a snapshot (unknown bits dropped) and
    /// re-raises the line if any is set: a lost interrupt would hang the
    /// driver, a spurious one costs it a register read.
    fn restore_status(&self, bits: u32) {
        let bits = bits & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            let _ = self.irqfd.write(1);
        }
    }
}

/// Each virtio device kind's own saved state, typed (a snapshot holds no
/// untyped blobs). A new device kind adds its variant here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-console.
    Console(console::ConsoleState),
    /// virtio-net.
    Net(net::NetState),
}

/// A virtio device model behind the mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 = net, 2 = block, 3 = console).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits; includes `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// Reads the device config space; out-of-range bytes read as zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called once the driver set DRIVER_OK. `queues` are ready and valid for
    /// `mem` (checked by the transport), one per entry of `queue_max_sizes`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError>;
    /// The driver notified queue `index`.
    fn queue_notify(&mut self, index: usize);
    /// Back to the pre-activation state (drops the queues).
    fn reset(&mut self);
    /// Device-specific saved state, for snapshots.
    fn save(&self) -> DeviceState;
    /// Restores `save()` output (untrusted). `queues` is empty when the
    /// device was not active when saved: then only the device state is
    /// restored and the device stays inactive; otherwise the device is active
    /// afterwards with these queues.
    fn restore(
        &mut self,
        state: &DeviceState,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError>;
    /// Live state of the device's queues while active (their ring positions
    /// move on in the device, not in the transport), for snapshots. A device
    /// that does not override this is saved with the transport's copy.
    fn queue_states(&self) -> Vec<QueueState> {
        Vec::new()
    }
    /// Switches an active device to a new guest memory object. Returns
    /// false if the device does not support this; the transport then hands
    /// the memory over through `save`/`restore` instead.
    fn set_memory(&mut self, mem: &GuestMemory) -> bool {
        let _ = mem;
        false
    }
}

/// Builds a queue from a snapshot's queue state, checked as untrusted input.
fn queue_from_state(st: QueueState) -> Result<Queue, DeviceError> {
    Queue::try_from(st).map_err(DeviceError::Queue)
}

/// Copies a queue (virtio-queue's `Queue` is not `Clone`).
fn clone_queue(q: &Queue) -> Result<Queue, DeviceError> {
    queue_from_state(q.state())
}

/// Most descriptors one request may span. A direct chain is already bounded
/// by the queue size and an indirect table by 2^16 entries; this keeps a
/// guest from making us buffer thousands of descriptors for one request.
const MAX_CHAIN_DESCS: usize = 1024;

/// The descriptors of one chain, or `None` if the chain is malformed: empty
/// (head index out of range), truncated (a loop ran out of its TTL, a `next`
/// index out of range, an unreadable descriptor — the last one yielded then
/// still has NEXT set), or longer than [`MAX_CHAIN_DESCS`].
fn chain_descriptors<M>(chain: DescriptorChain<M>) -> Option<Vec<Descriptor>>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() == MAX_CHAIN_DESCS {
            return None;
        }
        descs.push(d);
    }
    match descs.last() {
        Some(d) if !d.has_next() => Some(descs),
        _ => None,
    }
}

/// Copies the part of `config` at `offset` into `data`; bytes past the end
/// (or the whole access, if `offset` is past it) read as zeros.
fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers shared by the device tests: guest memory, interrupts, files.

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::Interrupt;
    use crate::devices::GuestMemory;

    /// 16 MiB of guest memory at address 0.
    pub fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// An interrupt line and a clone of its eventfd to observe it.
    pub fn interrupt() -> (Interrupt, EventFd) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let obs = fd.try_clone().unwrap();
        (Interrupt::new(fd), obs)
    }

    /// A temporary file path, removed on drop.
    pub struct TempPath(pub PathBuf);

    impl TempPath {
        /// A fresh file holding `contents`.
        pub fn with_contents(contents: &[u8]) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "podflare-devices-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::write(&p, contents).unwrap();
            TempPath(p)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A small deterministic PRNG (xorshift64*) for fuzz-style tests.
    pub struct Rng(pub u64);

    impl Rng {
        /// Next pseudo-random value.
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// A value in `0..n` (n > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }
}

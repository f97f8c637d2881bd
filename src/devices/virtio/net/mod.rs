//! virtio-net: the sandbox's network card (eth0 in the guest).
//!
//! Every VM has one, in every template snapshot, so restored and forked
//! guests all carry the same card, MAC and addressing. What is behind it is
//! chosen per VM and may change once while it runs ([`NetHandle::attach_tap`]):
//! - [`NetBackend::Refuse`] (every VM starts with it): nothing leaves. The
//!   guest's frames are answered by [`refuse`] (ARP for the gateway, an ICMP
//!   "administratively prohibited" for every IPv4 packet), so a `connect()`
//!   fails at once with "No route to host" instead of hanging.
//! - [`NetBackend::Tap`]: frames go to and come from a tap device (in the
//!   sandbox's own network namespace, made by the VMM).
//!
//! No offloads are offered (no checksum, no TSO, no mergeable buffers): every
//! frame is at most [`MAX_FRAME`] bytes behind a zeroed 12-byte header, so
//! both directions copy through one bounded host buffer with vm-memory's
//! checked accessors. Queues and descriptors are guest input: a chain that is
//! malformed, too small or too large is returned unused and its frame dropped,
//! as a network may drop any frame.

pub mod refuse;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{chain_descriptors, read_config_bytes, DeviceState, Interrupt, VirtioDevice};
use crate::devices::{DeviceError, GuestMemory};

/// The guest's MAC: the same in every sandbox (the guest's ARP peers only
/// ever see it behind its own tap).
pub const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
/// The guest's address, its prefix and its gateway (the tap's address).
pub const GUEST_IP: [u8; 4] = [172, 16, 0, 2];
/// Prefix length of the guest's link.
pub const PREFIX_LEN: u8 = 30;
pub use refuse::{GATEWAY_IP, GATEWAY_MAC, MAX_FRAME};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers. With no offloads it is all zeros
/// but `num_buffers`, which must be 1.
const HDR_LEN: usize = 12;
/// Frames kept for the guest while it has no receive buffer posted (answers
/// of the refusing backend, a frame read from the tap). More are dropped.
const MAX_PENDING: usize = 64;
/// Frames moved per direction per call: bounds one VM's hold on its device
/// thread; the rest waits for the next notification (the guest's kick, or
/// the tap's next edge, see [`NetHandle::attach_tap`]).
const BURST: usize = 256;

/// What the card is connected to.
pub enum NetBackend {
    /// No path out: frames are answered by [`refuse`], never forwarded.
    Refuse,
    /// A tap device, opened non-blocking (`IFF_TAP | IFF_NO_PI`).
    Tap(File),
}

/// Saved state: the MAC, to refuse restoring onto a different card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The card's MAC address.
    pub mac: [u8; 6],
}

/// Frames and drops, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent (to the tap or answered).
    pub tx_frames: u64,
    /// Frames put into the guest's receive buffers.
    pub rx_frames: u64,
    /// Frames dropped (malformed chains, too large, no room).
    pub dropped: u64,
}

struct Active {
    mem: GuestMemory,
    interrupt: Interrupt,
    rx: Queue,
    tx: Queue,
}

/// The virtio-net device model.
pub struct Net {
    backend: NetBackend,
    config: [u8; 6],
    queue_sizes: [u16; 2],
    active: Option<Active>,
    /// Frames for the guest that wait for a receive buffer.
    pending: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    counters: NetCounters,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The model stays consistent between calls; a panic fails the VM anyway.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Net {
    /// A card with [`GUEST_MAC`] behind the refusing backend.
    pub fn new() -> Net {
        Net {
            backend: NetBackend::Refuse,
            config: GUEST_MAC,
            queue_sizes: [QUEUE_SIZE; 2],
            active: None,
            pending: VecDeque::new(),
            buf: vec![0; HDR_LEN + MAX_FRAME],
            counters: NetCounters::default(),
        }
    }

    /// Whether a tap is attached.
    pub fn has_tap(&self) -> bool {
        matches!(self.backend, NetBackend::Tap(_))
    }

    /// Frames and drops so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Sends what the guest queued for transmission.
    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut used_any = false;
        for _ in 0..BURST {
            let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let len = chain_descriptors(chain).and_then(|d| gather(&a.mem, &d, &mut self.buf));
            match len.and_then(|n| self.buf.get(HDR_LEN..n)) {
                Some(frame) if !frame.is_empty() => {
                    self.counters.tx_frames += 1;
                    match &mut self.backend {
                        // A full or gone tap drops the frame, as a wire would.
                        NetBackend::Tap(tap) => {
                            if tap.write(frame).is_err() {
                                self.counters.dropped += 1;
                            }
                        }
                        NetBackend::Refuse => {
                            let mut out = vec![0; MAX_FRAME];
                            match refuse::answer(frame, &mut out) {
                                Some(n) if self.pending.len() < MAX_PENDING => {
                                    out.truncate(n);
                                    self.pending.push_back(out);
                                }
                                Some(_) => self.counters.dropped += 1,
                                None => {}
                            }
                        }
                    }
                }
                _ => self.counters.dropped += 1,
            }
            if a.tx.add_used(&a.mem, head, 0).is_ok() {
                used_any = true;
            }
        }
        if used_any && a.tx.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }

    /// Fills the guest's receive buffers: first frames already waiting, then
    /// from the tap until it is empty, the guest has no buffer, or a burst
    /// is done.
    fn process_rx(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut used_any = false;
        for _ in 0..BURST {
            // A frame that waited, or the tap's next one read straight into
            // the bounce buffer (no allocation unless it must wait).
            let waiting = self.pending.pop_front();
            let read = match (&waiting, &mut self.backend) {
                (Some(_), _) => 0,
                (None, NetBackend::Tap(tap)) => match tap.read(&mut self.buf[HDR_LEN..]) {
                    Ok(n) if n > 0 => n,
                    // EAGAIN: the tap is empty. Other errors: nothing to read.
                    _ => break,
                },
                (None, NetBackend::Refuse) => break,
            };
            let frame: &[u8] = match &waiting {
                Some(f) => f,
                None => &self.buf[HDR_LEN..HDR_LEN + read],
            };
            let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
                // No buffer: keep the frame for the guest's next kick.
                if self.pending.len() < MAX_PENDING {
                    let f = frame.to_vec();
                    self.pending.push_front(f);
                } else {
                    self.counters.dropped += 1;
                }
                break;
            };
            let head = chain.head_index();
            let written = chain_descriptors(chain).and_then(|d| scatter(&a.mem, &d, frame));
            match written {
                Some(_) => self.counters.rx_frames += 1,
                None => self.counters.dropped += 1,
            }
            if a.rx.add_used(&a.mem, head, written.unwrap_or(0)).is_ok() {
                used_any = true;
            }
        }
        if used_any && a.rx.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

/// Copies a transmit chain (header and frame, device-readable descriptors
/// only) into `buf`; returns the length, or `None` for a chain that has a
/// writable descriptor, does not fit `buf`, or cannot be read.
fn gather(mem: &GuestMemory, descs: &[virtio_queue::desc::split::Descriptor], buf: &mut [u8]) -> Option<usize> {
    let mut at = 0usize;
    for d in descs {
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        let dst = buf.get_mut(at..at.checked_add(len)?)?;
        mem.read_slice(dst, d.addr()).ok()?;
        at += len;
    }
    Some(at)
}

/// Writes the header and `frame` into a receive chain (device-writable
/// descriptors only); returns the bytes written, or `None` if the chain has
/// a readable descriptor, is too small for the whole frame, or cannot be
/// written (then the guest gets the buffer back empty).
fn scatter(mem: &GuestMemory, descs: &[virtio_queue::desc::split::Descriptor], frame: &[u8]) -> Option<u32> {
    let mut header = [0u8; HDR_LEN];
    header[10] = 1; // num_buffers
    let total = HDR_LEN + frame.len();
    let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if descs.iter().any(|d| !d.is_write_only()) || room < total as u64 {
        return None;
    }
    let mut from = 0usize;
    for d in descs {
        if from == total {
            break;
        }
        let n = (d.len() as usize).min(total - from);
        let mut addr = d.addr();
        let mut left = n;
        // The header and the frame are two slices; a descriptor may span both.
        while left > 0 {
            let (src, off) = if from < HDR_LEN { (&header[..], from) } else { (frame, from - HDR_LEN) };
            let take = left.min(src.len() - off);
            mem.write_slice(&src[off..off + take], addr).ok()?;
            addr = addr.checked_add(take as u64)?;
            from += take;
            left -= take;
        }
    }
    u32::try_from(total).ok()
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// The MAC is the host's to choose; the guest's writes are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: GuestMemory, interrupt: Interrupt, queues: Vec<Queue>) -> Result<(), DeviceError> {
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(DeviceError::BadState("virtio-net needs exactly two queues".into()));
        };
        self.active = Some(Active { mem, interrupt, rx, tx });
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        match index {
            TX => {
                self.process_tx();
                // Answers of the refusing backend go straight back.
                self.process_rx();
            }
            RX => self.process_rx(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending.clear();
    }

    fn save(&self) -> DeviceState {
        DeviceState::Net(NetState { mac: self.config })
    }

    /// Frames in flight are not saved: a restored guest's network lost them,
    /// which its protocols already handle.
    fn restore(
        &mut self,
        state: &DeviceState,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        let DeviceState::Net(st) = state else {
            return Err(DeviceError::BadState("virtio-net given another device's state".into()));
        };
        if st.mac != self.config {
            return Err(DeviceError::BadState(format!("virtio-net saved with MAC {:02x?}, card has {:02x?}", st.mac, self.config)));
        }
        if queues.is_empty() {
            return Ok(());
        }
        self.activate(mem, interrupt, queues)
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().flat_map(|a| [a.rx.state(), a.tx.state()]).collect()
    }

    fn set_memory(&mut self, mem: &GuestMemory) -> bool {
        if let Some(a) = self.active.as_mut() {
            a.mem = mem.clone();
        }
        true
    }
}

/// The epoll token under which the device thread learns the tap is
/// readable.
pub const TAP_TOKEN: u64 = u64::MAX - 1;

/// Host code's handle on a VM's card: attaches its tap, reads counters.
#[derive(Clone)]
pub struct NetHandle {
    net: Arc<Mutex<Net>>,
    /// The device thread's epoll (the tap's readiness is one of its events).
    epoll: Arc<Epoll>,
}

impl NetHandle {
    /// A handle on `net`, whose device thread waits on `epoll`.
    pub fn new(net: Arc<Mutex<Net>>, epoll: Arc<Epoll>) -> NetHandle {
        NetHandle { net, epoll }
    }

    /// Connects the card to `tap` (non-blocking) from now on, in place of
    /// the refusing backend. The tap is watched edge-triggered: the device
    /// reads it until it is empty or the guest has no buffer, and the
    /// guest's next receive kick resumes. Fails if a tap is attached already.
    pub fn attach_tap(&self, tap: File) -> Result<(), DeviceError> {
        let mut net = lock(&self.net);
        if net.has_tap() {
            return Err(DeviceError::BadState("the card already has a tap".into()));
        }
        let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP_TOKEN);
        self.epoll.ctl(ControlOperation::Add, tap.as_raw_fd(), ev).map_err(DeviceError::Io)?;
        net.backend = NetBackend::Tap(tap);
        // Answers for frames sent before are for a network no longer there.
        net.pending.clear();
        net.process_rx();
        Ok(())
    }

    /// The tap became readable (called by the device thread).
    pub fn tap_readable(&self) {
        lock(&self.net).process_rx();
    }

    /// Whether a tap is attached.
    pub fn has_tap(&self) -> bool {
        lock(&self.net).has_tap()
    }

    /// Frames and drops so far.
    pub fn counters(&self) -> NetCounters {
        lock(&self.net).counters()
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

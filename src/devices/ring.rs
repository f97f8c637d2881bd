//! The REPL's shared-memory ring: the host end of the two byte rings laid
//! out in `podflare_proto::ring`, inside a reserved region of guest RAM.
//!
//! No bus and no interrupt: the guest polls the host -> guest ring from user
//! space, and the VM's device thread polls the guest -> host ring while the
//! host waits for something from it ([`RingHandle::set_busy`]) and sleeps
//! otherwise. When the REPL has gone to sleep and bytes wait for it, the
//! [`RingPeer`] sends it a wake-up over the console.
//!
//! Every word of the region is written by the guest too, so each is checked
//! before use: a counter that claims more bytes than the ring holds fails
//! the ring (and with it only this VM's channel). The host keeps its own
//! copies of the counters it owns and never reads them back, and all bytes
//! move through vm-memory's checked accessors at offsets reduced modulo the
//! ring size inside the fixed region: no guest value picks an address.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use podflare_proto::ring as layout;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::virtio::console::SinkFlow;
use super::{DeviceError, GuestMemory};

/// Most guest bytes taken in one poll, so one busy guest cannot keep the
/// device thread from its other work for long.
const MAX_TAKE: usize = 256 << 10;

/// What the ring talks to on the host side (the channel).
pub trait RingPeer: Send {
    /// Bytes the guest wrote, in order. `Pause` stops taking more until
    /// [`RingHandle::resume`].
    fn deliver(&mut self, bytes: &[u8]) -> SinkFlow;
    /// The REPL sleeps while bytes wait for it: wake it (must not block).
    fn wake_guest(&mut self);
    /// The guest broke the ring's rules; nothing more moves through it.
    fn fail(&mut self, why: &str);
}

struct Shared {
    /// Host bytes not yet in the ring.
    pending: Mutex<VecDeque<u8>>,
    /// Requests the host waits on; while non-zero the device thread polls.
    busy: AtomicUsize,
    /// The peer asked to stop taking guest bytes.
    paused: AtomicBool,
    /// Possibly shared with the VM's other host-side kicks.
    kick: Arc<EventFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host's handle on a VM's ring: any thread may use it.
#[derive(Clone)]
pub struct RingHandle {
    shared: Arc<Shared>,
    mem: GuestMemory,
}

impl RingHandle {
    fn word(&self, off: u64) -> u32 {
        self.mem.load(GuestAddress(layout::BASE + off), Ordering::Acquire).unwrap_or(0)
    }

    /// Whether the REPL serves the ring (it wrote the magic; a guest that
    /// lies about it only sends its own execs to a ring nobody reads).
    pub fn attached(&self) -> bool {
        self.word(layout::GUEST_MAGIC) == layout::GUEST_MAGIC_VALUE
    }

    /// Bumps the generation word and sets the REPL's polling window; returns
    /// the new generation for the `Hello` that follows.
    pub fn next_generation(&self, poll_us: u32) -> u32 {
        let gen = self.word(layout::GENERATION).wrapping_add(1);
        // Inside the region, which the VM's RAM always holds (checked at build).
        let _ = self.mem.store(poll_us, GuestAddress(layout::BASE + layout::POLL_US), Ordering::Release);
        let _ = self.mem.store(gen, GuestAddress(layout::BASE + layout::GENERATION), Ordering::Release);
        gen
    }

    /// Queues bytes for the guest and kicks the device thread.
    pub fn send(&self, bytes: &[u8]) {
        lock(&self.shared.pending).extend(bytes);
        self.kick();
    }

    /// Host bytes not yet in the ring (a fork child gets a copy).
    pub fn pending(&self) -> Vec<u8> {
        lock(&self.shared.pending).iter().copied().collect()
    }

    /// How many requests the host waits on; the device thread polls the
    /// ring while there is any, and sleeps otherwise.
    pub fn set_busy(&self, n: usize) {
        if self.shared.busy.swap(n, Ordering::AcqRel) == 0 && n > 0 {
            self.kick();
        }
    }

    /// Takes guest bytes again after the peer paused.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
        self.kick();
    }

    fn kick(&self) {
        // Counter overflow is the only failure, and means already kicked.
        let _ = self.shared.kick.write(1);
    }
}

/// What one poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Polled {
    /// Bytes moved either way.
    pub moved: bool,
    /// The device thread should poll again soon.
    pub busy: bool,
}

/// The device side, polled by the VM's device thread.
pub struct Ring {
    shared: Arc<Shared>,
    mem: GuestMemory,
    peer: Box<dyn RingPeer>,
    /// The host's own copies of the counters it owns.
    h2g_head: u64,
    g2h_tail: u64,
    /// The `SLEEP` value the last wake-up answered (none yet: a restored
    /// REPL asleep in its snapshot gets one).
    woken: Option<u32>,
    failed: bool,
    buf: Vec<u8>,
}

impl Ring {
    /// The ring of a VM whose RAM is `mem`; the counters the host owns are
    /// read once from guest memory (a restored VM continues its snapshot's).
    pub fn new(mem: &GuestMemory, peer: Box<dyn RingPeer>) -> Result<(Ring, RingHandle), DeviceError> {
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(DeviceError::Io)?);
        Ring::with_kick(mem, peer, kick)
    }

    /// As [`Ring::new`], kicking the device thread through `kick`, an
    /// eventfd the VM's other host-side work may share.
    pub fn with_kick(mem: &GuestMemory, peer: Box<dyn RingPeer>, kick: Arc<EventFd>) -> Result<(Ring, RingHandle), DeviceError> {
        let last = GuestAddress(layout::BASE + layout::LEN - 1);
        if mem.load::<u8>(last, Ordering::Relaxed).is_err() {
            return Err(DeviceError::BadState("guest RAM does not hold the ring region".into()));
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(VecDeque::new()),
            busy: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            kick,
        });
        let mut ring = Ring {
            shared: shared.clone(),
            mem: mem.clone(),
            peer,
            h2g_head: 0,
            g2h_tail: 0,
            woken: None,
            failed: false,
            buf: Vec::new(),
        };
        ring.h2g_head = ring.load64(layout::H2G_HEAD);
        ring.g2h_tail = ring.load64(layout::G2H_TAIL);
        Ok((ring, RingHandle { shared, mem: mem.clone() }))
    }

    fn addr(off: u64) -> GuestAddress {
        GuestAddress(layout::BASE + off)
    }

    fn load64(&self, off: u64) -> u64 {
        self.mem.load(Self::addr(off), Ordering::Acquire).unwrap_or(0)
    }

    fn load32(&self, off: u64) -> u32 {
        self.mem.load(Self::addr(off), Ordering::Acquire).unwrap_or(0)
    }

    fn store64(&self, off: u64, v: u64) {
        let _ = self.mem.store(v, Self::addr(off), Ordering::Release);
    }

    fn fail(&mut self, why: &str) -> Polled {
        self.failed = true;
        lock(&self.shared.pending).clear();
        self.peer.fail(why);
        Polled::default()
    }

    /// Moves what it can both ways and wakes a sleeping REPL that has
    /// bytes waiting. Never blocks.
    pub fn poll(&mut self) -> Polled {
        if self.failed {
            return Polled::default();
        }
        let mut moved = false;
        // Host -> guest.
        let guest_tail = self.load64(layout::H2G_TAIL);
        let Some(queued) = within(self.h2g_head, guest_tail, layout::H2G_SIZE) else {
            return self.fail("the REPL ring's host-to-guest tail is out of range");
        };
        let waiting = {
            let mut pending = lock(&self.shared.pending);
            let room = (layout::H2G_SIZE - queued) as usize;
            let n = room.min(pending.len());
            if n > 0 {
                let (a, b) = pending.as_slices();
                let first = n.min(a.len());
                let second_at = self.h2g_head.wrapping_add(first as u64);
                let wrote = write_ring(&self.mem, layout::H2G_DATA, layout::H2G_SIZE, self.h2g_head, &a[..first])
                    .and_then(|()| write_ring(&self.mem, layout::H2G_DATA, layout::H2G_SIZE, second_at, &b[..n - first]));
                if wrote.is_err() {
                    drop(pending);
                    return self.fail("the REPL ring is outside guest memory");
                }
                pending.drain(..n);
                self.h2g_head = self.h2g_head.wrapping_add(n as u64);
                self.store64(layout::H2G_HEAD, self.h2g_head);
                moved = true;
            }
            !pending.is_empty() || self.h2g_head != guest_tail
        };
        // Guest -> host.
        if !self.shared.paused.load(Ordering::Acquire) {
            let guest_head = self.load64(layout::G2H_HEAD);
            let Some(ready) = within(guest_head, self.g2h_tail, layout::G2H_SIZE) else {
                return self.fail("the REPL ring's guest-to-host head is out of range");
            };
            let n = (ready as usize).min(MAX_TAKE);
            if n > 0 {
                self.buf.resize(n, 0);
                if read_ring(&self.mem, layout::G2H_DATA, layout::G2H_SIZE, self.g2h_tail, &mut self.buf).is_err() {
                    return self.fail("the REPL ring is outside guest memory");
                }
                self.g2h_tail = self.g2h_tail.wrapping_add(n as u64);
                self.store64(layout::G2H_TAIL, self.g2h_tail);
                moved = true;
                if self.peer.deliver(&self.buf) == SinkFlow::Pause {
                    self.shared.paused.store(true, Ordering::Release);
                }
            }
        }
        // A REPL that went to sleep with bytes waiting gets one wake-up per sleep.
        let sleep = self.load32(layout::SLEEP);
        if waiting && sleep % 2 == 1 && self.woken != Some(sleep) {
            self.woken = Some(sleep);
            self.peer.wake_guest();
        }
        let busy = waiting || self.shared.busy.load(Ordering::Acquire) > 0;
        Polled { moved, busy: busy && !self.failed }
    }
}

/// Bytes between `tail` and `head` if that is a possible fill of a ring of
/// `size`; `None` for counters no honest peer writes.
fn within(head: u64, tail: u64, size: u64) -> Option<u64> {
    Some(head.wrapping_sub(tail)).filter(|n| *n <= size)
}

fn write_ring(mem: &GuestMemory, data: u64, size: u64, at: u64, bytes: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let off = at % size;
    let first = (size - off).min(bytes.len() as u64) as usize;
    mem.write_slice(&bytes[..first], GuestAddress(layout::BASE + data + off))?;
    mem.write_slice(&bytes[first..], GuestAddress(layout::BASE + data))
}

fn read_ring(mem: &GuestMemory, data: u64, size: u64, at: u64, out: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let off = at % size;
    let first = (size - off).min(out.len() as u64) as usize;
    let (a, b) = out.split_at_mut(first);
    mem.read_slice(a, GuestAddress(layout::BASE + data + off))?;
    mem.read_slice(b, GuestAddress(layout::BASE + data))
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;

//! The REPL's shared-memory ring under a hostile guest: the guest side is
//! whatever the fuzz input writes into the region (any counter, any
//! `SLEEP` value, any bytes), interleaved with host sends, polls, pauses and
//! resumes. The ring must never panic, never move a byte after it failed,
//! and never write outside its region.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use podflare_hostd::devices::ring::{Ring, RingHandle, RingPeer};
use podflare_hostd::devices::virtio::console::SinkFlow;
use podflare_hostd::devices::GuestMemory;
use podflare_proto::ring as layout;
use vm_memory::{Bytes, GuestAddress};

use crate::{Reader, Writer};

/// Operation codes (the first byte of each operation, modulo 8).
pub const OP_COUNTER: u8 = 0;
/// `value: u32`: the guest writes `SLEEP`.
pub const OP_SLEEP: u8 = 1;
/// `blob`: the host sends bytes.
pub const OP_SEND: u8 = 2;
/// `blob`: the guest appends bytes to its ring and moves its head.
pub const OP_GUEST_PUT: u8 = 3;
/// The guest takes everything the host wrote.
pub const OP_GUEST_TAKE: u8 = 4;
/// Poll the ring (the device thread's work).
pub const OP_POLL: u8 = 5;
/// `on: u8`: the peer answers Pause from now on (or not; off resumes).
pub const OP_PAUSE: u8 = 6;
/// `n: u8`: requests in flight.
pub const OP_BUSY: u8 = 7;

#[derive(Default)]
struct Seen {
    delivered: usize,
    failed: bool,
    pause: bool,
}

struct Peer(Arc<Mutex<Seen>>);

impl RingPeer for Peer {
    fn deliver(&mut self, bytes: &[u8]) -> SinkFlow {
        let mut s = self.0.lock().unwrap();
        assert!(!s.failed, "bytes delivered after the ring failed");
        s.delivered += bytes.len();
        if s.pause {
            SinkFlow::Pause
        } else {
            SinkFlow::Continue
        }
    }
    fn wake_guest(&mut self) {}
    fn fail(&mut self, _why: &str) {
        self.0.lock().unwrap().failed = true;
    }
}

/// RAM a little larger than the region's end, with guard words just
/// outside the region that the ring must never touch.
const RAM: u64 = layout::BASE + layout::LEN + 0x1000;
const GUARD: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// One ring over plain guest memory.
pub struct RingRig {
    mem: GuestMemory,
    ring: Ring,
    handle: RingHandle,
    seen: Arc<Mutex<Seen>>,
}

impl Default for RingRig {
    fn default() -> Self {
        Self::new()
    }
}

impl RingRig {
    /// A fresh ring.
    pub fn new() -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        mem.write_obj(GUARD, GuestAddress(layout::BASE - 8)).unwrap();
        mem.write_obj(GUARD, GuestAddress(layout::BASE + layout::LEN)).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (ring, handle) = Ring::new(&mem, Box::new(Peer(seen.clone()))).unwrap();
        RingRig { mem, ring, handle, seen }
    }

    fn load(&self, off: u64) -> u64 {
        self.mem.load(GuestAddress(layout::BASE + off), Ordering::Acquire).unwrap()
    }

    fn store(&self, off: u64, v: u64) {
        self.mem.store(v, GuestAddress(layout::BASE + off), Ordering::Release).unwrap();
    }

    /// Runs the operations in `r` until it is empty.
    pub fn run(&mut self, r: &mut Reader) {
        while !r.is_empty() {
            self.step(r);
        }
        self.ring.poll();
        self.check();
    }

    fn step(&mut self, r: &mut Reader) {
        let failed_before = self.seen.lock().unwrap().failed;
        let host_head = self.load(layout::H2G_HEAD);
        let op = r.u8() % 8;
        match op {
            OP_COUNTER => {
                let off = [layout::H2G_HEAD, layout::H2G_TAIL, layout::G2H_HEAD, layout::G2H_TAIL][usize::from(r.u8() % 4)];
                let v = match r.u8() % 3 {
                    // Near the current value, as an honest or off-by-some peer writes.
                    0 => self.load(off).wrapping_add(u64::from(r.u32())),
                    1 => self.load(off).wrapping_sub(u64::from(r.u16())),
                    _ => r.u64(),
                };
                self.store(off, v);
            }
            OP_SLEEP => {
                let v = r.u32();
                self.mem.store(v, GuestAddress(layout::BASE + layout::SLEEP), Ordering::Release).unwrap();
            }
            OP_SEND => {
                let b = r.blob();
                // Sometimes much more than the ring holds.
                let times = if b.first().is_some_and(|x| x % 16 == 0) { 8192 } else { 1 };
                for _ in 0..times {
                    self.handle.send(b);
                }
            }
            OP_GUEST_PUT => {
                let b = r.blob();
                let head = self.load(layout::G2H_HEAD);
                for (i, byte) in b.iter().enumerate() {
                    let at = layout::BASE + layout::G2H_DATA + (head.wrapping_add(i as u64) % layout::G2H_SIZE);
                    self.mem.write_obj(*byte, GuestAddress(at)).unwrap();
                }
                self.store(layout::G2H_HEAD, head.wrapping_add(b.len() as u64));
            }
            OP_GUEST_TAKE => {
                let head = self.load(layout::H2G_HEAD);
                self.store(layout::H2G_TAIL, head);
            }
            OP_POLL => {
                self.ring.poll();
            }
            OP_PAUSE => {
                let on = r.u8() % 2 == 1;
                self.seen.lock().unwrap().pause = on;
                if !on {
                    self.handle.resume();
                }
            }
            _ => self.handle.set_busy(usize::from(r.u8())),
        }
        // Only the guest's own operations may change the region after a failure.
        let host_op = matches!(op, OP_SEND | OP_POLL | OP_PAUSE | OP_BUSY);
        if failed_before && host_op {
            assert_eq!(self.load(layout::H2G_HEAD), host_head, "the host wrote into a failed ring");
        }
        self.check();
    }

    fn check(&self) {
        let below: u64 = self.mem.read_obj(GuestAddress(layout::BASE - 8)).unwrap();
        let above: u64 = self.mem.read_obj(GuestAddress(layout::BASE + layout::LEN)).unwrap();
        assert_eq!((below, above), (GUARD, GUARD), "the ring wrote outside its region");
    }

    /// Bytes the peer got so far.
    pub fn delivered(&self) -> usize {
        self.seen.lock().unwrap().delivered
    }

    /// Whether the ring failed.
    pub fn failed(&self) -> bool {
        self.seen.lock().unwrap().failed
    }
}

/// Builds ring operations for seeds.
#[derive(Default)]
pub struct RingOps(pub Writer);

impl RingOps {
    /// An operation code.
    pub fn op(&mut self, op: u8) -> &mut Self {
        self.0.u8(op);
        self
    }

    /// A byte-string operand.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.0.blob(b);
        self
    }

    /// The encoded operations.
    pub fn bytes(&self) -> Vec<u8> {
        self.0 .0.clone()
    }
}

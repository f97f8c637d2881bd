//! A hostile virtio driver: a device behind `MmioTransport` over 128 KiB of
//! guest memory, driven by a list of operations decoded from fuzz input
//! (register accesses, descriptor tables, avail ring entries and indices,
//! notifies, snapshots restored as saved or mutated, host-side console I/O,
//! frames from the network card's tap).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use podflare_hostd::devices::bus::BusDevice;
use podflare_hostd::devices::virtio::block::Block;
use podflare_hostd::devices::virtio::console::{Console, ConsoleHandle, SinkFlow};
use podflare_hostd::devices::virtio::mmio::{MmioState, MmioTransport, QUEUE_NOTIFY_OFFSET};
use podflare_hostd::devices::virtio::net::{Net, NetHandle};
use podflare_hostd::devices::virtio::shared::SharedDevice;
use podflare_hostd::devices::virtio::{Interrupt, VirtioDevice};
use podflare_hostd::devices::GuestMemory;
use podflare_hostd::vmm::device_manager::PORT_NAMES;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::ops::*;
use crate::{mutate, Reader};

/// Guest memory size.
pub const MEM_SIZE: u64 = 0x2_0000;
/// Where free buffers for descriptors start (after the rings).
pub const DATA_START: u64 = 0x1_4000;
/// Sectors of the fuzz disk (plus a partial sector that must stay hidden).
pub const DISK_SECTORS: u64 = 16;

const QUEUE_BASE: u64 = 0x1000;
const QUEUE_STRIDE: u64 = 0x3000;

/// Guest addresses of queue `q`'s descriptor table, avail and used rings
/// in the rig's layout (room for 256 entries each).
pub fn ring_addrs(q: usize) -> (u64, u64, u64) {
    let base = QUEUE_BASE + q as u64 * QUEUE_STRIDE;
    (base, base + 0x1000, base + 0x2000)
}

/// Which device the rig drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read-only virtio-blk over a small file.
    Block,
    /// The two-port console, wrapped in `SharedDevice` as the VMM does.
    Console,
    /// The network card, refusing until OP_PAUSE attaches a tap (a Unix
    /// datagram socket pair: one frame per message, as a tap).
    Net,
}

/// Host side of a network card under test.
pub struct NetSide {
    /// The card's handle (attach, tap readiness).
    pub handle: NetHandle,
    /// The far end of the tap once attached.
    pub peer: Option<std::os::unix::net::UnixDatagram>,
}

fn disk() -> File {
    static DISK: OnceLock<File> = OnceLock::new();
    let f = DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("podflare-fuzz-disk-{}", std::process::id()));
        let data: Vec<u8> = (0..DISK_SECTORS * 512 + 100).map(|i| (i * 7 + i / 512) as u8).collect();
        std::fs::write(&p, data).expect("write fuzz disk");
        let f = File::open(&p).expect("open fuzz disk");
        let _ = std::fs::remove_file(&p);
        f
    });
    f.try_clone().expect("dup fuzz disk fd")
}

/// Host side of a console under test.
pub struct ConsoleSide {
    /// The device model (the transport holds a `SharedDevice` of it).
    pub model: Arc<Mutex<Console>>,
    /// Host-side handle.
    pub handle: ConsoleHandle,
}

/// A device, its transport, guest memory and the driver's bookkeeping.
pub struct Rig {
    /// The device kind.
    pub kind: Kind,
    /// Guest memory.
    pub mem: GuestMemory,
    /// The transport under test.
    pub transport: MmioTransport,
    /// The console's host side (console rigs only).
    pub console: Option<ConsoleSide>,
    /// The card's host side (net rigs only).
    pub net: Option<NetSide>,
    pause: Arc<AtomicBool>,
    /// Queue sizes as the driver last read them back.
    sizes: Vec<u16>,
    /// The avail index the driver last published, per queue.
    avail_idx: Vec<u16>,
}

fn memory(size: u64) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)]).expect("guest memory")
}

fn interrupt() -> Interrupt {
    Interrupt::new(EventFd::new(libc_nonblock()).expect("eventfd"))
}

fn libc_nonblock() -> i32 {
    vmm_sys_util::eventfd::EFD_NONBLOCK
}

/// A new network card behind `SharedDevice`, as the VMM builds it.
pub fn net_device() -> (Box<dyn VirtioDevice>, NetSide) {
    let model = Arc::new(Mutex::new(Net::new()));
    let epoll = Arc::new(vmm_sys_util::epoll::Epoll::new().expect("epoll"));
    let handle = NetHandle::new(model.clone(), epoll);
    (Box::new(SharedDevice::new(model)), NetSide { handle, peer: None })
}

/// A new device of `kind` and its host side (console or card).
pub fn device(kind: Kind, pause: &Arc<AtomicBool>) -> (Box<dyn VirtioDevice>, Option<ConsoleSide>, Option<NetSide>) {
    match kind {
        Kind::Block => (Box::new(Block::new(disk(), "podflare-fuzz").expect("block")), None, None),
        Kind::Net => {
            let (dev, side) = net_device();
            (dev, None, Some(side))
        }
        Kind::Console => {
            let pause = pause.clone();
            let sink = Box::new(move |port: u32, bytes: &[u8]| {
                assert!((port as usize) < PORT_NAMES.len(), "sink got port {port}");
                assert!(!bytes.is_empty(), "sink got an empty write");
                if pause.load(Ordering::Relaxed) {
                    SinkFlow::Pause
                } else {
                    SinkFlow::Continue
                }
            });
            let (model, handle) = Console::new(&PORT_NAMES, sink).expect("console");
            let model = Arc::new(Mutex::new(model));
            let dev = Box::new(SharedDevice::new(model.clone()));
            (dev, Some(ConsoleSide { model, handle }), None)
        }
    }
}

impl Rig {
    /// A device of `kind` in reset state over zeroed memory.
    pub fn new(kind: Kind) -> Self {
        let pause = Arc::new(AtomicBool::new(false));
        let (dev, console, net) = device(kind, &pause);
        let mem = memory(MEM_SIZE);
        let transport = MmioTransport::new(dev, mem.clone(), interrupt());
        let n = transport.num_queues();
        Rig { kind, mem, transport, console, net, pause, sizes: vec![0; n], avail_idx: vec![0; n] }
    }

    fn reg_write(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    fn reg_read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The driver's bring-up: reset, ACKNOWLEDGE, DRIVER, `features`,
    /// FEATURES_OK, each queue at its rig address with size `2^log2[q]`,
    /// DRIVER_OK.
    pub fn init(&mut self, features: u64, log2: &[u8]) {
        self.reg_write(0x70, 0);
        self.reg_write(0x70, 1);
        self.reg_write(0x70, 3);
        self.reg_write(0x24, 0);
        self.reg_write(0x20, features as u32);
        self.reg_write(0x24, 1);
        self.reg_write(0x20, (features >> 32) as u32);
        self.reg_write(0x70, 0xb);
        for q in 0..self.sizes.len() {
            let (d, a, u) = ring_addrs(q);
            self.reg_write(0x30, q as u32);
            let l = log2.get(q).copied().unwrap_or(8) % 16;
            self.reg_write(0x38, 1u32 << l);
            for (off, addr) in [(0x80, d), (0x90, a), (0xa0, u)] {
                self.reg_write(off, addr as u32);
                self.reg_write(off + 4, (addr >> 32) as u32);
            }
            self.reg_write(0x44, 1);
            self.sizes[q] = self.reg_read(0x38) as u16;
            self.avail_idx[q] = 0;
        }
        self.reg_write(0x70, 0xf);
    }

    fn queue(&self, q: u8) -> Option<(usize, u16)> {
        let n = self.sizes.len();
        let q = q as usize % n.max(1);
        let size = *self.sizes.get(q)?;
        (size != 0).then_some((q, size))
    }

    fn write_mem(&self, addr: u64, bytes: &[u8]) {
        // Writes past the end fail, as a buggy driver's would go nowhere.
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
    }

    /// Replaces the transport with one restored from `state` on a fresh
    /// device; returns whether the restore was accepted.
    pub fn restore(&mut self, state: &MmioState) -> bool {
        let (dev, console, net) = device(self.kind, &self.pause);
        match MmioTransport::restore(state, dev, self.mem.clone(), interrupt()) {
            Ok(t) => {
                self.transport = t;
                self.console = console;
                self.net = net;
                true
            }
            Err(_) => false,
        }
    }

    /// Runs every operation in `r`.
    pub fn run(&mut self, r: &mut Reader) {
        while !r.is_empty() {
            self.step(r);
        }
    }

    /// Decodes and runs one operation.
    pub fn step(&mut self, r: &mut Reader) {
        match r.u8() % 15 {
            OP_INIT => {
                let features = r.u64();
                let log2 = r.bytes(6).to_vec();
                self.init(features, &log2);
            }
            OP_REG_WRITE => {
                let off = u64::from(r.u16() & 0x1ff);
                let v = r.u32();
                self.reg_write(off, v);
            }
            OP_ACCESS => {
                let off = u64::from(r.u16() & 0x1ff);
                let data = r.blob();
                let data = &data[..data.len().min(8)];
                if r.u8() & 1 == 0 {
                    self.transport.write(off, data);
                } else {
                    let mut buf = data.to_vec();
                    self.transport.read(off, &mut buf);
                }
            }
            OP_MEM => {
                let addr = u64::from(r.u32());
                let data = r.blob();
                self.write_mem(addr, data);
            }
            OP_DESC => {
                let (q, idx, addr, len, flags, next) = (r.u8(), r.u16(), r.u64(), r.u32(), r.u16(), r.u16());
                if let Some((q, size)) = self.queue(q) {
                    let mut d = Vec::with_capacity(16);
                    d.extend_from_slice(&addr.to_le_bytes());
                    d.extend_from_slice(&len.to_le_bytes());
                    d.extend_from_slice(&flags.to_le_bytes());
                    d.extend_from_slice(&next.to_le_bytes());
                    self.write_mem(ring_addrs(q).0 + 16 * u64::from(idx % size), &d);
                }
            }
            OP_AVAIL => {
                let (q, head) = (r.u8(), r.u16());
                if let Some((q, size)) = self.queue(q) {
                    let (_, avail, _) = ring_addrs(q);
                    let i = self.avail_idx[q];
                    self.write_mem(avail + 4 + 2 * u64::from(i % size), &head.to_le_bytes());
                    self.avail_idx[q] = i.wrapping_add(1);
                    self.write_mem(avail + 2, &self.avail_idx[q].to_le_bytes());
                }
            }
            OP_AVAIL_IDX => {
                let (q, idx) = (r.u8(), r.u16());
                if let Some((q, _)) = self.queue(q) {
                    self.avail_idx[q] = idx;
                    self.write_mem(ring_addrs(q).1 + 2, &idx.to_le_bytes());
                }
            }
            OP_NOTIFY => {
                let q = r.u8();
                if r.u8() & 1 == 0 {
                    self.transport.queue_notify(q as usize);
                } else {
                    self.reg_write(QUEUE_NOTIFY_OFFSET, u32::from(q));
                }
            }
            OP_SNAPSHOT => {
                let state = self.transport.state();
                assert!(self.restore(&state), "the transport's own state does not restore: {state:?}");
                // Ring positions may move on: a restored device takes the
                // requests already posted. The configuration may not change.
                let mut again = self.transport.state();
                for (a, b) in again.queues.iter_mut().zip(&state.queues) {
                    (a.next_avail, a.next_used) = (b.next_avail, b.next_used);
                }
                again.device = state.device.clone();
                again.interrupt_status = state.interrupt_status;
                assert_eq!(again, state, "restore changed the configuration");
            }
            OP_MUTATED => {
                let mut state = self.transport.state();
                mutate::mmio_state(&mut state, r);
                self.restore(&state);
            }
            OP_SEND => {
                let (port, data) = (r.u8() % 3, r.blob());
                if let Some(c) = &self.console {
                    // Far below the pending limit, so this never blocks.
                    let _ = c.handle.send(u32::from(port), data);
                }
                // A frame from the network (the socket may be full: dropped).
                if let Some(NetSide { handle, peer: Some(peer) }) = &self.net {
                    let _ = peer.send(data);
                    handle.tap_readable();
                }
            }
            OP_HOST_OUTPUT => {
                if let Some(c) = &self.console {
                    c.model.lock().unwrap_or_else(|e| e.into_inner()).process_host_output();
                }
                // The network takes what the guest sent: never more than a frame each.
                if let Some(NetSide { peer: Some(peer), .. }) = &self.net {
                    let mut buf = vec![0u8; 2048];
                    while let Ok(n) = peer.recv(&mut buf) {
                        assert!(n <= 1514, "a frame of {n} bytes left the card");
                    }
                }
            }
            OP_PAUSE => {
                self.pause.store(r.u8() & 1 == 1, Ordering::Relaxed);
                // The card gets its tap (once).
                if let Some(side) = self.net.as_mut().filter(|n| n.peer.is_none()) {
                    let (tap, peer) = std::os::unix::net::UnixDatagram::pair().expect("socket pair");
                    tap.set_nonblocking(true).expect("nonblocking");
                    peer.set_nonblocking(true).expect("nonblocking");
                    side.handle.attach_tap(File::from(std::os::fd::OwnedFd::from(tap))).expect("attach");
                    side.peer = Some(peer);
                }
            }
            OP_RESUME => {
                let port = r.u8() % 3;
                if let Some(c) = &self.console {
                    c.handle.resume_tx(u32::from(port));
                }
            }
            _ => {
                // OP_REMAP: the VM's memory object is replaced (same
                // contents, maybe smaller) under an active device.
                let size = MEM_SIZE >> (r.u8() % 3);
                let mem = memory(size);
                let mut buf = vec![0u8; size as usize];
                let _ = self.mem.read_slice(&mut buf, GuestAddress(0));
                let _ = mem.write_slice(&buf, GuestAddress(0));
                self.mem = mem.clone();
                self.transport.set_memory(mem);
            }
        }
    }
}

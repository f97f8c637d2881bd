//! Tests of the multiport console: control handshake, data both ways,
//! backpressure, snapshots and malformed input.

use std::collections::HashMap;
use std::sync::mpsc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testutil::{interrupt, mem, Rng};

const W: u16 = VRING_DESC_F_WRITE as u16;
const NAMES: [&str; 2] = ["podflare.agent", "podflare.repl"];

type Log = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

fn console(limit: usize) -> (Console, ConsoleHandle, Log) {
    let log: Log = Arc::default();
    let l = log.clone();
    let sink = Box::new(move |p: u32, b: &[u8]| {
        l.lock().unwrap().push((p, b.to_vec()));
        SinkFlow::Continue
    });
    let (c, h) = Console::with_limit(&NAMES, sink, limit).unwrap();
    (c, h, log)
}

/// The guest driver's side of the queues.
struct Drv<'a> {
    m: &'a GuestMemory,
    vqs: Vec<MockSplitQueue<'a, GuestMemory>>,
    sizes: Vec<u16>,
    next_desc: Vec<u16>,
    used_seen: Vec<u16>,
    bufs: HashMap<(usize, u16), u64>,
    heap: u64,
}

impl<'a> Drv<'a> {
    fn new(m: &'a GuestMemory, sizes: &[u16]) -> Self {
        let vqs = (0..sizes.len())
            .map(|i| MockSplitQueue::create(m, GuestAddress(0x1_0000 * (i as u64 + 1)), sizes[i]))
            .collect();
        Drv {
            m,
            vqs,
            sizes: sizes.to_vec(),
            next_desc: vec![0; sizes.len()],
            used_seen: vec![0; sizes.len()],
            bufs: HashMap::new(),
            heap: 0x80_0000,
        }
    }

    fn queues(&self) -> Vec<Queue> {
        self.vqs.iter().map(|v| v.create_queue().unwrap()).collect()
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.heap;
        self.heap += (len + 0xfff) & !0xfff;
        assert!(self.heap < 16 << 20, "test heap exhausted");
        a
    }

    /// Posts a chain on queue `qi`; returns its head index.
    fn post(&mut self, qi: usize, parts: &[(u64, u32, u16)]) -> u16 {
        let n = parts.len() as u16;
        if self.next_desc[qi] + n > self.sizes[qi] {
            self.next_desc[qi] = 0;
        }
        let start = self.next_desc[qi];
        self.next_desc[qi] += n;
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let f = if i + 1 == parts.len() { flags } else { flags | VRING_DESC_F_NEXT as u16 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, f, start + i as u16 + 1))
            })
            .collect();
        self.vqs[qi].add_desc_chains(&descs, start).unwrap();
        self.bufs.insert((qi, start), parts[0].0);
        start
    }

    fn post_rx(&mut self, qi: usize, len: u32) {
        let a = self.alloc(len.into());
        self.post(qi, &[(a, len, W)]);
    }

    fn post_tx(&mut self, qi: usize, bytes: &[u8]) {
        let a = self.alloc(bytes.len() as u64);
        self.m.write_slice(bytes, GuestAddress(a)).unwrap();
        self.post(qi, &[(a, bytes.len() as u32, 0)]);
    }

    /// Sends a control message (ctrl-tx) and notifies the device.
    fn ctrl(&mut self, dev: &mut Console, id: u32, event: u16, value: u16) {
        let mut msg = id.to_le_bytes().to_vec();
        msg.extend_from_slice(&event.to_le_bytes());
        msg.extend_from_slice(&value.to_le_bytes());
        self.post_tx(CTRL_TX, &msg);
        dev.queue_notify(CTRL_TX);
    }

    /// Buffers the device returned on `qi` since the last call, with contents.
    fn take(&mut self, qi: usize) -> Vec<Vec<u8>> {
        let vq = &self.vqs[qi];
        let idx = vq.used().idx().load();
        let mut out = Vec::new();
        while self.used_seen[qi] != idx {
            let e = vq.used().ring().ref_at((self.used_seen[qi] % self.sizes[qi]) as usize).unwrap().load();
            let addr = self.bufs[&(qi, e.id() as u16)];
            let mut b = vec![0u8; e.len() as usize];
            self.m.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.push(b);
            self.used_seen[qi] = self.used_seen[qi].wrapping_add(1);
        }
        out
    }

    /// Control messages the device sent, as (id, event, value, payload).
    fn ctrl_msgs(&mut self) -> Vec<(u32, u16, u16, Vec<u8>)> {
        self.take(CTRL_RX)
            .into_iter()
            .map(|b| {
                assert!(b.len() >= 8, "short control message");
                (
                    u32::from_le_bytes(b[0..4].try_into().unwrap()),
                    u16::from_le_bytes([b[4], b[5]]),
                    u16::from_le_bytes([b[6], b[7]]),
                    b[8..].to_vec(),
                )
            })
            .collect()
    }
}

/// An active console with ctrl-rx buffers posted, as after Linux's probe.
fn active<'a>(m: &'a GuestMemory, limit: usize) -> (Console, ConsoleHandle, Log, Drv<'a>, EventFd) {
    let (mut c, h, log) = console(limit);
    let mut d = Drv::new(m, c.queue_max_sizes());
    let (int, irq) = interrupt();
    c.activate(m.clone(), int, d.queues()).unwrap();
    for _ in 0..8 {
        d.post_rx(CTRL_RX, 4096);
    }
    c.queue_notify(CTRL_RX);
    (c, h, log, d, irq)
}

/// DEVICE_READY, PORT_READY for every port, then the guest opens `open`.
fn handshake(c: &mut Console, d: &mut Drv, open: &[u32]) {
    d.ctrl(c, u32::MAX, DEVICE_READY, 1);
    for p in 0..NAMES.len() as u32 {
        d.ctrl(c, p, PORT_READY, 1);
    }
    for &p in open {
        d.ctrl(c, p, PORT_OPEN, 1);
    }
    let n = d.ctrl_msgs().len();
    for _ in 0..n {
        d.post_rx(CTRL_RX, 4096);
    }
    c.queue_notify(CTRL_RX);
}

#[test]
fn config_and_queue_layout() {
    let (c, _, _) = console(10);
    assert_eq!(c.queue_max_sizes().len(), 6);
    assert_eq!(c.queue_max_sizes()[CTRL_RX], CTRL_QUEUE_SIZE);
    let mut b = [0u8; 4];
    c.read_config(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 2);
    assert_ne!(c.features() & (1 << VIRTIO_CONSOLE_F_MULTIPORT), 0);
    assert_eq!((rx_queue(0), rx_queue(1), rx_queue(2)), (0, 4, 6));
    assert!(Console::new(&[], Box::new(|_, _| SinkFlow::Continue)).is_err());
    assert!(Console::new(&["a/b"], Box::new(|_, _| SinkFlow::Continue)).is_err());
    assert!(Console::new(&[""], Box::new(|_, _| SinkFlow::Continue)).is_err());
}

#[test]
fn control_handshake() {
    let m = mem();
    let (mut c, h, _, mut d, irq) = active(&m, 1 << 20);
    d.ctrl(&mut c, u32::MAX, DEVICE_READY, 1);
    assert_eq!(d.ctrl_msgs(), vec![(0, DEVICE_ADD, 1, vec![]), (1, DEVICE_ADD, 1, vec![])]);
    assert!(irq.read().unwrap() > 0);
    d.ctrl(&mut c, 1, PORT_READY, 1);
    assert_eq!(
        d.ctrl_msgs(),
        vec![(1, PORT_NAME, 1, b"podflare.repl".to_vec()), (1, PORT_OPEN, 1, vec![])]
    );
    assert!(!h.guest_opened(1));
    d.ctrl(&mut c, 1, PORT_OPEN, 1);
    assert!(h.guest_opened(1));
    assert!(!h.guest_opened(0));
    d.ctrl(&mut c, 1, PORT_OPEN, 0);
    assert!(!h.guest_opened(1));
    assert!(!h.guest_opened(99));

    // With no ctrl-rx buffers, messages wait for the guest to post some.
    let (mut c, _, _) = console(10);
    let mut d = Drv::new(&m, c.queue_max_sizes());
    let (int, _) = interrupt();
    c.activate(m.clone(), int, d.queues()).unwrap();
    d.ctrl(&mut c, u32::MAX, DEVICE_READY, 1);
    assert!(d.ctrl_msgs().is_empty());
    d.post_rx(CTRL_RX, 4096);
    c.queue_notify(CTRL_RX);
    assert_eq!(d.ctrl_msgs(), vec![(0, DEVICE_ADD, 1, vec![])]);
    d.post_rx(CTRL_RX, 4096);
    c.queue_notify(CTRL_RX);
    assert_eq!(d.ctrl_msgs(), vec![(1, DEVICE_ADD, 1, vec![])]);
}

#[test]
fn bad_control_messages_are_ignored() {
    let m = mem();
    let (mut c, h, _, mut d, _) = active(&m, 1 << 20);
    d.post_tx(CTRL_TX, &[1, 0, 0, 0]); // short
    c.queue_notify(CTRL_TX);
    d.ctrl(&mut c, 0, 99, 1); // unknown event
    d.ctrl(&mut c, 7, PORT_READY, 1); // no such port
    d.ctrl(&mut c, u32::MAX, PORT_OPEN, 1);
    d.ctrl(&mut c, 2, PORT_OPEN, 1);
    d.ctrl(&mut c, u32::MAX, DEVICE_READY, 0);
    d.ctrl(&mut c, 0, PORT_READY, 0);
    // Device-writable only, and a buffer outside memory.
    let a = d.alloc(8);
    d.post(CTRL_TX, &[(a, 8, W)]);
    d.post(CTRL_TX, &[(0xffff_ffff_0000, 8, 0)]);
    c.queue_notify(CTRL_TX);
    assert!(d.ctrl_msgs().is_empty());
    assert!(!h.guest_opened(0) && !h.guest_opened(1));
    // Every ctrl-tx buffer was handed back.
    assert_eq!(d.take(CTRL_TX).len(), 9);
    // Notifies for queues that do not exist.
    for i in [6usize, 7, 100, usize::MAX] {
        c.queue_notify(i);
    }
}

#[test]
fn tx_bytes_reach_sink_in_order_per_port() {
    let m = mem();
    let (mut c, _, log, mut d, irq) = active(&m, 1 << 20);
    d.post_tx(1, b"hello ");
    d.post_tx(5, b"repl-1 ");
    d.post_tx(1, b"world");
    // A two-buffer chain, plus a device-writable part that must be skipped.
    let (a, b, w) = (d.alloc(3), d.alloc(3), d.alloc(16));
    m.write_slice(b"abc", GuestAddress(a)).unwrap();
    m.write_slice(b"def", GuestAddress(b)).unwrap();
    d.post(5, &[(a, 3, 0), (b, 3, 0), (w, 16, W)]);
    c.queue_notify(1);
    c.queue_notify(5);
    assert!(irq.read().unwrap() > 0);
    let mut per_port: HashMap<u32, Vec<u8>> = HashMap::new();
    for (p, bytes) in log.lock().unwrap().iter() {
        per_port.entry(*p).or_default().extend(bytes);
    }
    assert_eq!(per_port[&0], b"hello world");
    assert_eq!(per_port[&1], b"repl-1 abcdef");
    assert_eq!(d.take(1).len(), 2);
    assert_eq!(d.take(5).len(), 2);
}

#[test]
fn sink_pause_leaves_the_tx_queue_until_resumed() {
    let m = mem();
    let log: Log = Arc::default();
    let l = log.clone();
    // A reader that takes one chunk, then says it is full.
    let sink = Box::new(move |p: u32, b: &[u8]| {
        let mut l = l.lock().unwrap();
        l.push((p, b.to_vec()));
        if l.len() == 1 { SinkFlow::Pause } else { SinkFlow::Continue }
    });
    let (mut c, h) = Console::with_limit(&NAMES, sink, 1 << 20).unwrap();
    let mut d = Drv::new(&m, c.queue_max_sizes());
    let (int, _irq) = interrupt();
    c.activate(m.clone(), int, d.queues()).unwrap();
    d.post_tx(1, b"one");
    d.post_tx(1, b"two");
    c.queue_notify(1);
    assert_eq!(log.lock().unwrap().len(), 1, "paused after the first chain");
    assert_eq!(d.take(1).len(), 1, "the second chain stays with the guest");
    c.queue_notify(1);
    assert_eq!(log.lock().unwrap().len(), 1, "notifies while paused take nothing");
    h.resume_tx(0);
    c.process_host_output();
    let got: Vec<u8> = log.lock().unwrap().iter().flat_map(|(_, b)| b.clone()).collect();
    assert_eq!(got, b"onetwo");
    assert_eq!(d.take(1).len(), 1);
}

#[test]
fn send_to_a_guest_that_reads_nothing_gives_up() {
    let sink = Box::new(|_: u32, _: &[u8]| SinkFlow::Continue);
    let (_c, h) = Console::with_limits(&NAMES, sink, 8, Duration::from_millis(300)).unwrap();
    let t = std::time::Instant::now();
    let err = h.send(1, &[7u8; 100]).unwrap_err();
    assert!(matches!(err, DeviceError::Stalled { port: 1, .. }), "{err}");
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(5));
    assert_eq!(h.pending(1), 8, "what fitted stays queued");
}

#[test]
fn host_send_fills_rx_buffers_and_waits_for_more() {
    let m = mem();
    let (mut c, h, _, mut d, irq) = active(&m, 1 << 20);
    handshake(&mut c, &mut d, &[]);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    for _ in 0..2 {
        d.post_rx(4, 4096);
    }
    // Not open yet: Linux would throw the bytes away, so they wait.
    h.send(1, &data).unwrap();
    c.process_host_output();
    assert!(d.take(4).is_empty());
    assert_eq!(h.pending(1), 10_000);
    let _ = irq.read();
    d.ctrl(&mut c, 1, PORT_OPEN, 1);
    let mut got: Vec<u8> = d.take(4).concat();
    assert_eq!(got.len(), 8192);
    assert!(irq.read().unwrap() > 0);
    // Out of buffers: the rest waits until the guest posts more.
    c.process_host_output();
    assert!(d.take(4).is_empty());
    d.post_rx(4, 1000);
    d.post_rx(4, 4096);
    c.queue_notify(4);
    let more = d.take(4);
    assert_eq!(more.iter().map(Vec::len).collect::<Vec<_>>(), vec![1000, 808]);
    got.extend(more.concat());
    assert_eq!(got, data);
    assert_eq!(h.pending(1), 0);
    // Port 0 untouched; a send kicks.
    assert!(d.take(0).is_empty());
    let _ = c.kick_fd().read();
    h.send(0, b"x").unwrap();
    assert!(c.kick_fd().read().unwrap() > 0);
    assert!(h.send(2, b"x").is_err());
}

#[test]
fn send_blocks_at_limit_until_guest_drains() {
    let m = mem();
    let (mut c, h, _, mut d, _) = active(&m, 1000);
    handshake(&mut c, &mut d, &[0]);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let (tx, rx) = mpsc::channel();
    let h2 = h.clone();
    let d2 = data.clone();
    let sender = std::thread::spawn(move || {
        let r = h2.send(0, &d2);
        tx.send(()).unwrap();
        r
    });
    // It fills up to the limit and then waits (no rx buffers yet).
    while h.pending(0) < 1000 {
        std::thread::yield_now();
    }
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "send did not block");
    assert_eq!(h.pending(0), 1000);
    let mut got = Vec::new();
    let mut outstanding = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() && std::time::Instant::now() < deadline {
        // Like a driver: never more buffers out than the ring holds.
        if outstanding < 4 {
            d.post_rx(0, 300);
            outstanding += 1;
            c.queue_notify(0);
        }
        c.process_host_output();
        let bufs = d.take(0);
        outstanding -= bufs.len();
        got.extend(bufs.concat());
        std::thread::yield_now();
    }
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    sender.join().unwrap().unwrap();
    assert_eq!(got, data);
}

#[test]
fn close_wakes_blocked_senders() {
    let (_c, h, _) = console(10);
    h.send(0, &[0; 10]).unwrap();
    let h2 = h.clone();
    let sender = std::thread::spawn(move || h2.send(0, b"more"));
    while h.pending(0) < 10 {
        std::thread::yield_now();
    }
    h.close();
    assert!(matches!(sender.join().unwrap(), Err(DeviceError::Closed)));
    assert!(matches!(h.send(1, b"x"), Err(DeviceError::Closed)));
    assert!(matches!(h.send(5, b"x"), Err(DeviceError::NoSuchPort(5))));
}

#[test]
fn a_snapshot_leaves_out_a_send_still_under_way() {
    // A 30-byte message through a 10-byte queue: while its sender waits, a
    // snapshot holds only the whole message queued before it.
    let (c, h, _) = console(16);
    h.send(1, b"whole").unwrap();
    let h2 = h.clone();
    let sender = std::thread::spawn(move || h2.send(1, &[b'x'; 30]));
    while h.pending(1) < 16 {
        std::thread::yield_now();
    }
    let saved = serde_json::to_value(c.save()).unwrap();
    let pending = saved["Console"]["ports"][1]["pending"].as_str().unwrap().to_string();
    assert_eq!(pending, base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b"whole"));
    h.close();
    assert!(sender.join().unwrap().is_err());
}

#[test]
fn save_restore_continues() {
    let m = mem();
    let (mut c, h, _, mut d, _) = active(&m, 1 << 20);
    handshake(&mut c, &mut d, &[1]);
    h.send(1, b"queued before snapshot").unwrap();
    c.process_host_output(); // no rx buffers: stays pending
    // Use up the 8 ctrl-rx buffers, then leave two control messages pending.
    for _ in 0..5 {
        d.ctrl(&mut c, u32::MAX, DEVICE_READY, 1);
    }
    assert_eq!(d.ctrl_msgs().len(), 8);
    let saved = c.save();
    let qs = c.queue_states();
    assert_eq!(qs.len(), 6);
    let json = serde_json::to_string(&saved).unwrap();

    let (mut c2, h2, log2) = console(1 << 20);
    let (int, _) = interrupt();
    let queues = qs.iter().map(|s| Queue::try_from(*s).unwrap()).collect();
    c2.restore(&serde_json::from_str(&json).unwrap(), m.clone(), int, queues).unwrap();
    assert!(h2.guest_opened(1));
    assert_eq!(h2.pending(1), 22);
    d.post_rx(4, 4096);
    c2.queue_notify(4);
    assert_eq!(d.take(4), vec![b"queued before snapshot".to_vec()]);
    d.post_tx(5, b"after");
    c2.queue_notify(5);
    assert_eq!(log2.lock().unwrap().as_slice(), &[(1, b"after".to_vec())]);
    d.post_rx(CTRL_RX, 4096);
    d.post_rx(CTRL_RX, 4096);
    c2.queue_notify(CTRL_RX);
    assert_eq!(d.ctrl_msgs(), vec![(0, DEVICE_ADD, 1, vec![]), (1, DEVICE_ADD, 1, vec![])]);
    d.post_rx(CTRL_RX, 4096);
    d.post_rx(CTRL_RX, 4096);
    d.ctrl(&mut c2, 0, PORT_READY, 1);
    assert!(d.ctrl_msgs().iter().any(|m| m.1 == PORT_NAME && m.3 == b"podflare.agent"));

    // Untrusted state.
    let (mut c3, _, _) = console(8);
    let (int, _) = interrupt();
    assert!(c3.restore(&saved, m.clone(), int.clone(), vec![]).is_err(), "pending over limit");
    let (mut c4, _) = Console::new(&["other", "names"], Box::new(|_, _| SinkFlow::Continue)).unwrap();
    assert!(c4.restore(&saved, m.clone(), int.clone(), vec![]).is_err());
    let mut bad = serde_json::to_value(&saved).unwrap();
    bad["Console"]["ports"][0]["pending"] = serde_json::json!("!!not base64");
    let bad: DeviceState = serde_json::from_value(bad).unwrap();
    let (mut c5, _, _) = console(1 << 20);
    assert!(c5.restore(&bad, m.clone(), int.clone(), vec![]).is_err());
    let other_kind = DeviceState::Block(crate::devices::virtio::block::BlockState { capacity: 7, ..Default::default() });
    assert!(c5.restore(&other_kind, m.clone(), int, vec![]).is_err());
}

#[test]
fn reset_keeps_host_bytes_and_forgets_opens() {
    let m = mem();
    let (mut c, h, _, mut d, _) = active(&m, 1 << 20);
    handshake(&mut c, &mut d, &[0]);
    h.send(0, b"abc").unwrap();
    c.reset();
    assert!(!h.guest_opened(0));
    assert_eq!(h.pending(0), 3);
    c.process_host_output();
    c.queue_notify(0);
}

#[test]
fn fuzz_random_queues_and_control() {
    let m = mem();
    let mut rng = Rng(7);
    for round in 0..20 {
        let (mut c, h, _, mut d, _) = active(&m, 4096);
        if round % 2 == 0 {
            handshake(&mut c, &mut d, &[0, 1]);
        }
        for _ in 0..200 {
            let qi = rng.below(6) as usize;
            let size = d.sizes[qi];
            // Random descriptors in a random slot of this queue.
            for _ in 0..rng.below(4) {
                let i = rng.below(u64::from(size)) as u16;
                let addr = match rng.below(3) {
                    0 => rng.next(),
                    1 => 0x80_0000 + rng.below(0x10_0000),
                    _ => (16 << 20) - rng.below(16),
                };
                let len = if rng.below(3) == 0 { rng.next() as u32 } else { rng.below(8192) as u32 };
                let next = rng.below(u64::from(size) + 2) as u16;
                let desc = SplitDescriptor::new(addr, len, (rng.next() & 7) as u16, next);
                d.vqs[qi].desc_table().store(i, RawDescriptor::from(desc)).unwrap();
            }
            let vq = &d.vqs[qi];
            let idx = vq.avail().idx().load();
            vq.avail().ring().ref_at((idx % size) as usize).unwrap().store(rng.below(u64::from(size) + 4) as u16);
            let bump = if rng.below(30) == 0 { rng.next() as u16 } else { 1 };
            vq.avail().idx().store(idx.wrapping_add(bump));
            // Random control message bytes at a plausible address.
            let _ = m.write_obj(rng.next(), GuestAddress(0x80_0000 + (rng.below(0x1000) & !7)));
            match rng.below(4) {
                0 => {
                    // Only what fits: nothing drains while this thread is in send.
                    let (p, n) = (rng.below(2) as u32, rng.below(3000) as usize);
                    if h.pending(p) + n <= 4096 {
                        h.send(p, &vec![0x55; n]).unwrap();
                    }
                    c.process_host_output();
                }
                _ => c.queue_notify(rng.below(8) as usize),
            }
            if rng.below(50) == 0 {
                let st = c.save();
                let qs: Vec<Queue> = c.queue_states().into_iter().filter_map(|s| Queue::try_from(s).ok()).collect();
                let (int, _) = interrupt();
                let _ = c.restore(&st, m.clone(), int, qs);
            }
        }
        h.close();
    }
}

#[test]
fn brought_up_through_mmio_transport() {
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    let m = mem();
    let (c, h, _) = console(1 << 20);
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(Box::new(c), m.clone(), int);
    let mut b = [0u8; 4];
    t.read(0x104, &mut b);
    assert_eq!(u32::from_le_bytes(b), 2);
    crate::devices::virtio::mmio::tests::bring_up(&mut t, 6);
    assert!(t.is_activated());
    let st = t.state();
    assert_eq!(st.queues.len(), 6);
    h.close();
}

//! Tests of the virtio-mmio register file, activation and save/restore.

use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::DeviceState;
use virtio_queue::QueueState;
use crate::devices::virtio::testutil::{interrupt, mem, Rng, TempPath};

/// What the dummy device saw, observable after it moved into the transport.
#[derive(Default)]
struct Seen {
    activations: usize,
    notifies: Vec<usize>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    restored: Option<(DeviceState, usize)>,
}

struct Dummy {
    sizes: Vec<u16>,
    seen: Arc<Mutex<Seen>>,
    queues: Vec<Queue>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | 0b101
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::super::read_config_bytes(&[1, 2, 3, 4], offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.seen.lock().unwrap().config_writes.push((offset, data.to_vec()));
    }
    fn activate(&mut self, _m: GuestMemory, _i: Interrupt, queues: Vec<Queue>) -> Result<(), DeviceError> {
        assert!(queues.iter().all(|q| q.ready()));
        self.queues = queues;
        self.seen.lock().unwrap().activations += 1;
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        self.seen.lock().unwrap().notifies.push(index);
    }
    fn reset(&mut self) {
        self.queues.clear();
        self.seen.lock().unwrap().resets += 1;
    }
    fn save(&self) -> DeviceState {
        dummy_state()
    }
    fn restore(&mut self, state: &DeviceState, _m: GuestMemory, _i: Interrupt, queues: Vec<Queue>) -> Result<(), DeviceError> {
        self.seen.lock().unwrap().restored = Some((state.clone(), queues.len()));
        self.queues = queues;
        Ok(())
    }
    fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }
}

/// The dummy's own state: any typed value the transport must carry through.
fn dummy_state() -> DeviceState {
    DeviceState::Block(crate::devices::virtio::block::BlockState { capacity: 4242, ..Default::default() })
}

fn dummy(sizes: &[u16]) -> (Box<Dummy>, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    (Box::new(Dummy { sizes: sizes.to_vec(), seen: seen.clone(), queues: vec![] }), seen)
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;

/// Negotiates features as Linux does; returns whether FEATURES_OK stuck.
fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
    w32(t, REG_STATUS, ACK);
    w32(t, REG_STATUS, ACK | DRV);
    w32(t, REG_DRIVER_FEATURES_SEL, 1);
    w32(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, REG_DRIVER_FEATURES_SEL, 0);
    w32(t, REG_DRIVER_FEATURES, features as u32);
    w32(t, REG_STATUS, ACK | DRV | FOK);
    r32(t, REG_STATUS) & FOK != 0
}

/// Programs queue `i` with the given ring addresses; returns QueueReady.
fn setup_queue(t: &mut MmioTransport, i: u32, size: u16, desc: u64, avail: u64, used: u64) -> u32 {
    w32(t, REG_QUEUE_SEL, i);
    assert_eq!(r32(t, REG_QUEUE_READY), 0);
    w32(t, REG_QUEUE_NUM, size.into());
    for (lo, v) in [(REG_QUEUE_DESC_LOW, desc), (REG_QUEUE_AVAIL_LOW, avail), (REG_QUEUE_USED_LOW, used)] {
        w32(t, lo, v as u32);
        w32(t, lo + 4, (v >> 32) as u32);
    }
    w32(t, REG_QUEUE_READY, 1);
    r32(t, REG_QUEUE_READY)
}

/// Brings up a transport with `n` queues of size 16 at valid addresses.
pub(crate) fn bring_up(t: &mut MmioTransport, n: u32) {
    assert!(negotiate(t, 1 << VIRTIO_F_VERSION_1));
    for i in 0..n {
        let base = 0x1_0000 * u64::from(i + 1);
        assert_eq!(setup_queue(t, i, 16, base, base + 0x1000, base + 0x2000), 1);
    }
    w32(t, REG_STATUS, ACK | DRV | FOK | DOK);
}

#[test]
fn identification_registers() {
    let (dev, _) = dummy(&[16, 8]);
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(dev, mem(), int);
    assert_eq!(r32(&mut t, REG_MAGIC), 0x7472_6976);
    assert_eq!(r32(&mut t, REG_VERSION), 2);
    assert_eq!(r32(&mut t, REG_DEVICE_ID), 42);
    assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 0b101);
    w32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 1);
    w32(&mut t, REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(r32(&mut t, REG_DEVICE_FEATURES), 0);
    w32(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 8);
    w32(&mut t, REG_QUEUE_SEL, 2);
    assert_eq!(r32(&mut t, REG_QUEUE_NUM_MAX), 0);
    assert_eq!(r32(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    let mut cfg = [0u8; 8];
    t.read(0x100, &mut cfg);
    assert_eq!(cfg, [1, 2, 3, 4, 0, 0, 0, 0]);
    assert_eq!(t.num_queues(), 2);
}

#[test]
fn bring_up_activates_and_notifies_reach_device() {
    let (dev, seen) = dummy(&[16, 16]);
    let (int, irq) = interrupt();
    let mut t = MmioTransport::new(dev, mem(), int.clone());
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 0); // before activation: ignored
    bring_up(&mut t, 2);
    assert!(t.is_activated());
    assert_eq!(seen.lock().unwrap().activations, 1);
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
    t.queue_notify(0);
    t.queue_notify(5); // no such queue
    w32(&mut t, QUEUE_NOTIFY_OFFSET, u32::MAX);
    assert_eq!(seen.lock().unwrap().notifies, vec![1, 0]);

    int.signal_used_queue();
    assert!(irq.read().unwrap() > 0);
    assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 1);
    w32(&mut t, REG_INTERRUPT_ACK, 1);
    assert_eq!(r32(&mut t, REG_INTERRUPT_STATUS), 0);

    // Queue config is frozen once running.
    w32(&mut t, REG_QUEUE_SEL, 0);
    w32(&mut t, REG_QUEUE_DESC_LOW, 0x5000);
    assert_eq!(t.state().queues[0].desc_table, 0x1_0000);

    // Config writes pass through; status 0 resets everything.
    t.write(0x104, &[9, 9]);
    assert_eq!(seen.lock().unwrap().config_writes, vec![(4, vec![9, 9])]);
    w32(&mut t, REG_STATUS, 0);
    assert!(!t.is_activated());
    assert_eq!(r32(&mut t, REG_STATUS), 0);
    assert_eq!(r32(&mut t, REG_QUEUE_READY), 0);
    assert!(seen.lock().unwrap().resets >= 1);
    t.queue_notify(0);
    assert_eq!(seen.lock().unwrap().notifies.len(), 2);
    // And it can come up again.
    bring_up(&mut t, 2);
    assert_eq!(seen.lock().unwrap().activations, 2);
}

#[test]
fn feature_negotiation_is_checked() {
    let (dev, _) = dummy(&[16]);
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(dev, mem(), int);
    // Without VERSION_1 this modern-only transport refuses FEATURES_OK.
    assert!(!negotiate(&mut t, 0b1));
    w32(&mut t, REG_STATUS, 0);
    // Unoffered bits are dropped.
    assert!(negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b111 | (1 << 40)));
    assert_eq!(t.state().acked_features, (1 << VIRTIO_F_VERSION_1) | 0b101);
    // Feature writes after FEATURES_OK are ignored.
    w32(&mut t, REG_DRIVER_FEATURES, 0);
    assert_eq!(t.state().acked_features, (1 << VIRTIO_F_VERSION_1) | 0b101);
    // Clearing status bits (other than by reset) is ignored.
    w32(&mut t, REG_STATUS, ACK);
    assert_eq!(r32(&mut t, REG_STATUS), ACK | DRV | FOK);
}

#[test]
fn invalid_queues_do_not_activate() {
    let m = mem(); // 16 MiB
    for (desc, avail, used) in [
        (0x2000_0000u64, 0x1000, 0x2000),  // desc table outside memory
        (0x1000, 0xfff_fff0, 0x2000),      // avail ring straddles the end
        (0x1000, 0x2000, 0xffff_ffff_ffff_f000), // used ring at the top of the space
        (0x1008, 0x2001, 0x3002),          // misaligned: refused, defaults stay at 0
    ] {
        let (dev, seen) = dummy(&[16]);
        let (int, _) = interrupt();
        let mut t = MmioTransport::new(dev, m.clone(), int);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        let ready = setup_queue(&mut t, 0, 16, desc, avail, used);
        w32(&mut t, REG_STATUS, ACK | DRV | FOK | DOK);
        if ready == 0 {
            assert!(!t.is_activated());
            assert_ne!(r32(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
            assert_eq!(seen.lock().unwrap().activations, 0);
        } else {
            // Misaligned writes were refused and the queue sits at address 0,
            // which is inside guest memory: valid, if useless.
            assert!(t.is_activated());
        }
    }
    // Bad sizes are refused; DRIVER_OK without FEATURES_OK does not activate.
    let (dev, seen) = dummy(&[16]);
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(dev, m.clone(), int);
    assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
    for bad in [0u32, 3, 32, 0x1_0010] {
        w32(&mut t, REG_QUEUE_NUM, bad);
        assert_eq!(r32(&mut t, REG_QUEUE_NUM), 16);
    }
    let (dev2, seen2) = dummy(&[16]);
    let (int2, _) = interrupt();
    let mut t2 = MmioTransport::new(dev2, m, int2);
    w32(&mut t2, REG_STATUS, ACK | DRV | DOK);
    assert!(!t2.is_activated());
    assert_eq!(seen2.lock().unwrap().activations, 0);
    assert_eq!(seen.lock().unwrap().activations, 0);
}

#[test]
fn nonsense_offsets_and_sizes_never_panic() {
    let (dev, _) = dummy(&[16, 16]);
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(dev, mem(), int);
    for phase in 0..3 {
        if phase == 1 {
            bring_up(&mut t, 2);
        }
        for off in (0..0x1010u64).chain([u64::MAX - 3, u64::MAX, 0x1_0000_0000]) {
            for size in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut buf = vec![0xa5; size];
                t.read(off, &mut buf);
                if off < 0x100 && (size != 4 || off % 4 != 0) {
                    assert!(buf.iter().all(|&b| b == 0), "{off:#x}/{size}");
                }
                // Skip the status register so later offsets see a live device.
                if off != REG_STATUS || phase == 2 {
                    t.write(off, &[0xff; 16][..size]);
                }
            }
        }
    }
}

#[test]
fn fuzz_register_writes_with_block_device() {
    let m = mem();
    let file = TempPath::with_contents(&[7u8; 8192]);
    let mut rng = Rng(42);
    let regs = [
        REG_DEVICE_FEATURES_SEL, REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL, REG_QUEUE_SEL,
        REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_NOTIFY, REG_INTERRUPT_ACK, REG_STATUS,
        REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, REG_QUEUE_AVAIL_LOW, REG_QUEUE_AVAIL_HIGH,
        REG_QUEUE_USED_LOW, REG_QUEUE_USED_HIGH, 0x100, 0x108,
    ];
    for round in 0..40 {
        let dev = Block::new(std::fs::File::open(&file.0).unwrap(), "f").unwrap();
        let (int, _) = interrupt();
        let mut t = MmioTransport::new(Box::new(dev), m.clone(), int.clone());
        if round % 2 == 0 {
            bring_up(&mut t, 1);
        }
        for _ in 0..500 {
            let off = if rng.below(8) == 0 { rng.below(0x1000) } else { regs[rng.below(regs.len() as u64) as usize] };
            let v = match rng.below(4) {
                0 => rng.next() as u32,
                1 => rng.below(0x20) as u32,
                2 => 0x1_0000 * rng.below(4) as u32,
                _ => 1u32 << rng.below(32),
            };
            t.write(off, &v.to_le_bytes());
            let mut b = [0u8; 4];
            t.read(rng.below(0x1000) & !3, &mut b);
            // Scribble on the rings now and then, then notify.
            if rng.below(10) == 0 {
                let a = GuestAddress(0x1_0000 + rng.below(0x3000));
                let _ = vm_memory::Bytes::write_obj(&m, rng.next(), a);
                t.queue_notify(0);
            }
            if rng.below(100) == 0 {
                let st = t.state();
                let dev = Block::new(std::fs::File::open(&file.0).unwrap(), "f").unwrap();
                if let Ok(r) = MmioTransport::restore(&st, Box::new(dev), m.clone(), int.clone()) {
                    t = r;
                }
            }
        }
    }
}

#[test]
fn state_round_trips_and_validates() {
    let m = mem();
    let (dev, _) = dummy(&[16, 16]);
    let (int, irq) = interrupt();
    let mut t = MmioTransport::new(dev, m.clone(), int.clone());
    bring_up(&mut t, 2);
    int.signal_config();
    let _ = irq.read();
    let st = t.state();
    assert!(st.activated);
    let json = serde_json::to_string(&st).unwrap();
    let back: MmioState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);

    let (dev2, seen2) = dummy(&[16, 16]);
    let (int2, irq2) = interrupt();
    let mut r = MmioTransport::restore(&back, dev2, m.clone(), int2).unwrap();
    assert!(r.is_activated());
    assert_eq!(seen2.lock().unwrap().restored, Some((dummy_state(), 2)));
    assert_eq!(r32(&mut r, REG_INTERRUPT_STATUS), 2);
    assert!(irq2.read().unwrap() > 0, "pending interrupt re-raised");
    assert_eq!(r.state(), st);
    r.queue_notify(1);
    assert_eq!(seen2.lock().unwrap().notifies, vec![1]);

    // Untrusted input: each of these must be refused without panicking.
    let mut cases = Vec::new();
    let mut s = st.clone();
    s.device_type = 1;
    cases.push(s);
    let mut s = st.clone();
    s.queues.pop();
    cases.push(s);
    let mut s = st.clone();
    s.queues[0].max_size = 32;
    cases.push(s);
    let mut s = st.clone();
    s.queues[1].size = 3;
    cases.push(s);
    let mut s = st.clone();
    s.queues[1].desc_table = 0x1001;
    cases.push(s);
    let mut s = st.clone();
    s.queues[0].used_ring = 0x4000_0000; // outside memory while active
    cases.push(s);
    let mut s = st.clone();
    s.acked_features |= 1 << 50;
    cases.push(s);
    let mut s = st.clone();
    s.status |= 0x10;
    cases.push(s);
    let mut s = st.clone();
    s.status = ACK | DRV;
    cases.push(s);
    for (i, s) in cases.iter().enumerate() {
        let (dev, _) = dummy(&[16, 16]);
        let (int, _) = interrupt();
        assert!(MmioTransport::restore(s, dev, m.clone(), int).is_err(), "case {i}");
    }

    // An inactive device restores inactive, with its state and no queues.
    let (dev, _) = dummy(&[16, 16]);
    let (int, _) = interrupt();
    let t = MmioTransport::new(dev, m.clone(), int);
    let (dev, seen) = dummy(&[16, 16]);
    let (int, _) = interrupt();
    let r = MmioTransport::restore(&t.state(), dev, m, int).unwrap();
    assert!(!r.is_activated());
    assert_eq!(seen.lock().unwrap().restored.as_ref().unwrap().1, 0);
}

#[test]
fn set_memory_switches_active_devices() {
    let m = mem();
    let (dev, seen) = dummy(&[16]);
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(dev, m.clone(), int);
    bring_up(&mut t, 1);
    // The dummy cannot switch in place: it goes through save/restore.
    t.set_memory(mem());
    assert!(t.is_activated());
    assert_eq!(seen.lock().unwrap().restored.as_ref().unwrap().1, 1);
    // Memory that no longer holds the queues: the device is failed, not panicked.
    let tiny = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    t.set_memory(tiny);
    assert!(!t.is_activated());
    assert_ne!(r32(&mut t, REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    // The block device switches in place: reads land in the new memory.
    let file = TempPath::with_contents(&[0x5a; 4096]);
    let dev = Block::new(std::fs::File::open(&file.0).unwrap(), "b").unwrap();
    let (int, _) = interrupt();
    let mut t = MmioTransport::new(Box::new(dev), m.clone(), int);
    let m2 = mem();
    let vq = MockSplitQueue::create(&m2, GuestAddress(0x1_0000), 16);
    assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
    let (d, a, u) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
    assert_eq!(setup_queue(&mut t, 0, 16, d, a, u), 1);
    w32(&mut t, REG_STATUS, ACK | DRV | FOK | DOK);
    let hdr = 0x10_0000u64;
    vm_memory::Bytes::write_obj(&m2, 0u32, GuestAddress(hdr)).unwrap();
    vm_memory::Bytes::write_obj(&m2, 0u64, GuestAddress(hdr + 8)).unwrap();
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor as Raw};
    let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    vq.add_desc_chains(
        &[
            Raw::from(D::new(hdr, 16, n, 1)),
            Raw::from(D::new(0x20_0000, 512, n | w, 2)),
            Raw::from(D::new(0x30_0000, 1, w, 0)),
        ],
        0,
    )
    .unwrap();
    t.set_memory(m2.clone());
    assert!(t.is_activated());
    t.queue_notify(0);
    assert_eq!(vq.used().idx().load(), 1);
    let b: u8 = vm_memory::Bytes::read_obj(&m2, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(b, 0x5a);
    let old: u8 = vm_memory::Bytes::read_obj(&m, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(old, 0);
}

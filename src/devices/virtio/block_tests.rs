//! Tests of the virtio-blk request path, driven through a mock split queue.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::console::{Console, SinkFlow};
use crate::devices::virtio::testutil::{interrupt, mem, Rng, TempPath};

const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;

fn file_bytes(len: usize) -> Vec<u8> {
    let mut rng = Rng(0x1234_5678);
    (0..len).map(|_| rng.next() as u8).collect()
}

struct Fx {
    dev: Block,
    irq: EventFd,
    data: Vec<u8>,
    _file: TempPath,
}

fn setup<'a>(m: &'a GuestMemory, vq_len: u16) -> (Fx, MockSplitQueue<'a, GuestMemory>) {
    // 64 KiB plus a partial sector that must not be exposed.
    let data = file_bytes(64 * 1024 + 100);
    let file = TempPath::with_contents(&data);
    let mut dev = Block::new(File::open(&file.0).unwrap(), "rootfs-0123456789abcdefXYZ").unwrap();
    assert_eq!(dev.capacity(), 128);
    let vq = MockSplitQueue::new(m, vq_len);
    let (int, irq) = interrupt();
    dev.activate(m.clone(), int, vec![vq.create_queue().unwrap()]).unwrap();
    (Fx { dev, irq, data, _file: file }, vq)
}

/// Posts one chain at descriptor index `start`, linking the parts in order.
fn post(vq: &MockSplitQueue<GuestMemory>, start: u16, parts: &[(u64, u32, u16)]) {
    let descs: Vec<RawDescriptor> = parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let f = if i + 1 == parts.len() { flags } else { flags | VRING_DESC_F_NEXT as u16 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, f, start + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&descs, start).unwrap();
}

fn header(m: &GuestMemory, ty: u32, sector: u64) {
    m.write_obj(ty.to_le(), GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
}

fn used(vq: &MockSplitQueue<GuestMemory>, i: u16) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i as usize).unwrap().load();
    (e.id(), e.len())
}

fn status(m: &GuestMemory) -> u8 {
    m.read_obj(GuestAddress(STATUS)).unwrap()
}

/// Posts a request with the standard header/status and given data parts.
fn request(
    m: &GuestMemory,
    fx: &mut Fx,
    vq: &MockSplitQueue<GuestMemory>,
    ty: u32,
    sector: u64,
    data: &[(u64, u32, u16)],
) -> (u8, u32) {
    header(m, ty, sector);
    m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let mut parts = vec![(HDR, 16, R)];
    parts.extend_from_slice(data);
    parts.push((STATUS, 1, W));
    let n = vq.used().idx().load();
    post(vq, 0, &parts);
    fx.dev.queue_notify(0);
    assert_eq!(vq.used().idx().load(), n.wrapping_add(1), "request not completed");
    (status(m), used(vq, n).1)
}

#[test]
fn read_across_chained_descriptors_is_byte_exact() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 256);
    let parts = [(DATA, 512, W), (DATA + 0x10000, 1000, W), (DATA + 0x30000, 536, W)];
    let (st, len) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 3, &parts);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 2048 + 1);
    let mut want = &fx.data[3 * 512..3 * 512 + 2048];
    for &(addr, plen, _) in &parts {
        let mut got = vec![0u8; plen as usize];
        m.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(got, want[..plen as usize]);
        want = &want[plen as usize..];
    }
    assert!(fx.irq.read().unwrap() > 0);
    assert_eq!(used(&vq, 0).0, 0);

    // A request larger than the bounce buffer, ending exactly at capacity.
    let m2 = mem();
    let (mut fx2, vq2) = setup(&m2, 256);
    let big = 64 * 1024;
    let (st, len) = request(&m2, &mut fx2, &vq2, VIRTIO_BLK_T_IN, 0, &[(DATA, big, W)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, big + 1));
    let mut got = vec![0u8; big as usize];
    m2.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, fx2.data[..big as usize]);
}

#[test]
fn other_request_types() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 256);
    let (st, len) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 21));
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"rootfs-0123456789abc");

    let (st, _) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
    let (st, len) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1));
    let (st, _) = request(&m, &mut fx, &vq, 99, 0, &[(DATA, 512, W)]);
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP as u8);
    // IN into a read-only buffer.
    let (st, _) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, R)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn out_of_range_sectors_and_addresses_fail_cleanly() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 256);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    // Past the end, straddling the end (the partial last sector is hidden).
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 128, &[(DATA, 512, W)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 127, &[(DATA, 1024, W)]).0, ioerr);
    // sector * 512 overflows, and start + len overflows.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, u64::MAX / 256, &[(DATA, 512, W)]).0, ioerr);
    assert_eq!(
        request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, u64::MAX / 512, &[(DATA, u32::MAX - 1024, W)]).0,
        ioerr
    );
    // Data buffer outside guest memory, and one that wraps the address space.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 0, &[(0xffff_ffff_0000, 512, W)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 10, 512, W)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_GET_ID, 0, &[(u64::MAX, 20, W)]).0, ioerr);
    // Header too short, or device-writable.
    let n = vq.used().idx().load();
    post(&vq, 0, &[(HDR, 8, R), (STATUS, 1, W)]);
    post(&vq, 2, &[(HDR, 16, W), (STATUS, 1, W)]);
    fx.dev.queue_notify(0);
    assert_eq!(vq.used().idx().load(), n.wrapping_add(2));
    assert_eq!(status(&m), ioerr);
    // Still serving good requests afterwards.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, 0);
}

#[test]
fn malformed_chains_are_dropped() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 256);
    let expect_dropped = |parts: &[(u64, u32, u16)], fx: &mut Fx| {
        header(&m, VIRTIO_BLK_T_IN, 0);
        m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let n = vq.used().idx().load();
        post(&vq, 0, parts);
        fx.dev.queue_notify(0);
        assert_eq!(vq.used().idx().load(), n.wrapping_add(1));
        assert_eq!(used(&vq, n), (0, 0));
        assert_eq!(status(&m), 0xee, "status written for a dropped chain");
    };
    // Zero-length status, read-only status, status outside memory, header only.
    expect_dropped(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)], &mut fx);
    expect_dropped(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)], &mut fx);
    expect_dropped(&[(HDR, 16, R)], &mut fx);
    // Total chain length over 4 GiB (virtio-queue stops the chain there).
    expect_dropped(&[(HDR, 16, R), (DATA, u32::MAX, W), (STATUS, 1, W)], &mut fx);
    let n = vq.used().idx().load();
    post(&vq, 0, &[(HDR, 16, R), (0xffff_ffff_0000, 1, W)]);
    fx.dev.queue_notify(0);
    assert_eq!(used(&vq, n), (0, 0));

    // A descriptor loop 0 -> 1 -> 0: bounded by the queue size, then dropped.
    let n = vq.used().idx().load();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    fx.dev.queue_notify(0);
    assert_eq!(vq.used().idx().load(), n.wrapping_add(1));
    assert_eq!(used(&vq, n).1, 0);

    // `next` out of range.
    let n = vq.used().idx().load();
    let descs = [RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 9999))];
    vq.add_desc_chains(&descs, 0).unwrap();
    fx.dev.queue_notify(0);
    assert_eq!(used(&vq, n), (0, 0));
}

#[test]
fn bad_avail_ring_does_not_hang_or_panic() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 16);
    // A head index beyond the queue: cannot even be returned.
    let idx = vq.avail().idx().load();
    vq.avail().ring().ref_at(idx as usize % 16).unwrap().store(300);
    vq.avail().idx().store(idx.wrapping_add(1));
    fx.dev.queue_notify(0);
    assert_eq!(vq.used().idx().load(), 0);
    // An avail index far ahead of the device: refused outright.
    vq.avail().idx().store(idx.wrapping_add(1000));
    fx.dev.queue_notify(0);
    vq.avail().idx().store(idx.wrapping_add(1));
    // Back to sane: a good request is served.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 1, &[(DATA, 512, W)]).0, 0);
}

#[test]
fn config_reports_capacity_and_seg_max() {
    let m = mem();
    let (fx, _vq) = setup(&m, 256);
    let mut cap = [0u8; 8];
    fx.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut seg = [0u8; 4];
    fx.dev.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    let mut far = [0xffu8; 8];
    fx.dev.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 8]);
    fx.dev.read_config(14, &mut far);
    assert_eq!(far, [0; 8]);
    assert_ne!(fx.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn save_restore_checks_capacity_and_resumes() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 256);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, 0);
    let saved = fx.dev.save();
    let qs = fx.dev.queue_states();
    assert_eq!(qs.len(), 1);
    assert_eq!(qs[0].next_avail, 1);

    let mut other = Block::new(File::open(&fx._file.0).unwrap(), "x").unwrap();
    let (int, irq) = interrupt();
    let q = Queue::try_from(qs[0]).unwrap();
    other.restore(&saved, m.clone(), int.clone(), vec![q]).unwrap();
    fx.dev = other;
    fx.irq = irq;
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 1, &[(DATA, 512, W)]).0, 0);
    assert_eq!(used(&vq, 1).1, 513);

    let small = TempPath::with_contents(&[0u8; 1024]);
    let mut wrong = Block::new(File::open(&small.0).unwrap(), "x").unwrap();
    assert!(wrong.restore(&saved, m.clone(), int.clone(), vec![]).is_err());
    let console = Console::new(&["p"], Box::new(|_, _| SinkFlow::Continue)).unwrap().0;
    assert!(wrong.restore(&console.save(), m.clone(), int, vec![]).is_err(), "another device's state");
}

#[test]
fn fuzz_random_descriptor_tables() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 16);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let addr_pool = [HDR, STATUS, DATA, 0, 0xfff_fff0, 16 << 20, (16 << 20) - 1, u64::MAX - 3, 0x1_0000_0000];
    for _ in 0..4000 {
        // Random descriptor table entries, mostly pointing somewhere plausible.
        for i in 0..16u16 {
            let addr = if rng.below(4) == 0 {
                rng.next()
            } else {
                addr_pool[rng.below(addr_pool.len() as u64) as usize].wrapping_add(rng.below(64))
            };
            let len = match rng.below(4) {
                0 => rng.next() as u32,
                1 => 0,
                _ => rng.below(4096) as u32,
            };
            let flags = (rng.next() & 0x7) as u16; // NEXT, WRITE, INDIRECT
            let next = if rng.below(8) == 0 { rng.next() as u16 } else { rng.below(16) as u16 };
            vq.desc_table().store(i, RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))).unwrap();
        }
        header(&m, rng.below(10) as u32, if rng.below(2) == 0 { rng.below(200) } else { rng.next() });
        // A few avail entries with random heads; sometimes a wild avail index.
        let idx = vq.avail().idx().load();
        let k = rng.below(5) as u16;
        for j in 0..k {
            let head = if rng.below(6) == 0 { rng.next() as u16 } else { rng.below(16) as u16 };
            vq.avail().ring().ref_at((idx.wrapping_add(j) % 16) as usize).unwrap().store(head);
        }
        let new_idx = if rng.below(20) == 0 { rng.next() as u16 } else { idx.wrapping_add(k) };
        vq.avail().idx().store(new_idx);
        fx.dev.queue_notify(0);
        if rng.below(50) == 0 {
            // Resynchronise the way a driver reset would.
            let qs = fx.dev.queue_states();
            vq.avail().idx().store(qs[0].next_avail);
        }
    }
}

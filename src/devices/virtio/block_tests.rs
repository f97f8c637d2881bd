//! Tests of the virtio-blk request path, driven through a mock split queue.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH};
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
    fuzz(&m, &mut fx, &vq, 0x9e37_79b9_7f4a_7c15, |rng| rng.below(10) as u32);
}

/// Random descriptor tables, headers (types from `ty`) and avail entries:
/// the device must neither panic nor hang.
fn fuzz(
    m: &GuestMemory,
    fx: &mut Fx,
    vq: &MockSplitQueue<GuestMemory>,
    seed: u64,
    mut ty: impl FnMut(&mut Rng) -> u32,
) {
    let mut rng = Rng(seed);
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
        let t = ty(&mut rng);
        header(m, t, if rng.below(2) == 0 { rng.below(200) } else { rng.next() });
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

// --- Writable mode -------------------------------------------------------

/// Capacity of the writable test disks: 1 MiB (2048 sectors).
const CAP: u64 = 1 << 20;
/// A second data area, to read back into without reusing the written bytes.
const DATA2: u64 = 0x80_0000;
/// Where discard / write-zeroes segments are put.
const SEGS: u64 = 0x30_0000;

/// A writable device over a sparse file sized to `CAP` (as the caller of
/// `Block::writable` does), active on a fresh queue.
fn setup_rw<'a>(m: &'a GuestMemory, vq_len: u16) -> (Fx, MockSplitQueue<'a, GuestMemory>) {
    let file = TempPath::with_contents(&[]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&file.0).unwrap();
    f.set_len(CAP).unwrap();
    let dev = Block::writable(f, "disk-0", CAP).unwrap();
    activate(m, dev, file, vq_len)
}

fn activate(
    m: &GuestMemory,
    mut dev: Block,
    file: TempPath,
    vq_len: u16,
) -> (Fx, MockSplitQueue<'_, GuestMemory>) {
    let vq = MockSplitQueue::new(m, vq_len);
    let (int, irq) = interrupt();
    dev.activate(m.clone(), int, vec![vq.create_queue().unwrap()]).unwrap();
    (Fx { dev, irq, data: Vec::new(), _file: file }, vq)
}

/// The whole backing file, as the host sees it.
fn disk(fx: &Fx) -> Vec<u8> {
    std::fs::read(&fx._file.0).unwrap()
}

/// Puts `bytes` at `addr` in guest memory and returns them.
fn fill(m: &GuestMemory, addr: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    m.write_slice(&bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// Writes random bytes over sectors `[sector, sector + n)` and returns them.
fn write_random(
    m: &GuestMemory,
    fx: &mut Fx,
    vq: &MockSplitQueue<GuestMemory>,
    sector: u64,
    n: u32,
) -> Vec<u8> {
    let bytes = fill(m, DATA, n as usize * 512, sector + 1);
    let (st, len) = request(m, fx, vq, VIRTIO_BLK_T_OUT, sector, &[(DATA, n * 512, R)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1));
    bytes
}

/// Puts `segs` (sector, num_sectors, flags) at `SEGS` as
/// `virtio_blk_discard_write_zeroes` records.
fn segments(m: &GuestMemory, segs: &[(u64, u32, u32)]) -> u32 {
    for (i, &(sector, num, flags)) in segs.iter().enumerate() {
        let at = SEGS + 16 * i as u64;
        m.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(num.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    }
    16 * segs.len() as u32
}

#[test]
fn writes_read_back_byte_exact_across_descriptors_and_chunks() {
    let m = mem();
    let (mut fx, vq) = setup_rw(&m, 256);
    assert!(fx.dev.is_writable());
    assert_eq!((fx.dev.capacity(), fx.dev.write_limit()), (CAP / 512, CAP));
    // 4 KiB + 200 KiB (more than the 128 KiB bounce buffer) + 1.5 KiB.
    let parts = [(DATA, 4096, R), (DATA + 0x10_0000, 200 * 1024, R), (DATA + 0x40_0000, 1536, R)];
    let mut want = Vec::new();
    for (i, &(addr, len, _)) in parts.iter().enumerate() {
        want.extend(fill(&m, addr, len as usize, 7 + i as u64));
    }
    let (st, len) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 5, &parts);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1), "OUT's used length is the status byte");
    let host = disk(&fx);
    assert_eq!(host.len() as u64, CAP);
    assert_eq!(&host[5 * 512..5 * 512 + want.len()], &want[..]);
    assert!(host[..5 * 512].iter().all(|&b| b == 0));
    assert!(host[5 * 512 + want.len()..].iter().all(|&b| b == 0));

    // Read back through the device into other buffers, split differently.
    let total = want.len() as u32;
    let back = [(DATA2, 1000, W), (DATA2 + 0x1000, total - 1000, W)];
    let (st, len) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 5, &back);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, total + 1));
    let mut got = vec![0u8; 1000];
    m.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
    let mut rest = vec![0u8; (total - 1000) as usize];
    m.read_slice(&mut rest, GuestAddress(DATA2 + 0x1000)).unwrap();
    got.extend(rest);
    assert_eq!(got, want);

    // A flush (not offered, but possible) is answered OK.
    let (st, len) = request(&m, &mut fx, &vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1));
}

#[test]
fn writes_past_the_limit_or_from_bad_buffers_fail_and_change_nothing() {
    let m = mem();
    let (mut fx, vq) = setup_rw(&m, 256);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    fx.dev.set_write_limit(64 * 1024);
    assert_eq!(fx.dev.write_limit(), 64 * 1024);
    fill(&m, DATA, 4096, 1);
    let before = disk(&fx);
    // Straddling the limit, past it, overflowing sector * 512 and start + len.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 127, &[(DATA, 1024, R)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 128, &[(DATA, 512, R)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, u64::MAX / 256, &[(DATA, 512, R)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, u64::MAX / 512, &[(DATA, 4096, R)]).0, ioerr);
    // A device-writable data descriptor, alone or after a good one.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R), (DATA, 512, W)]).0, ioerr);
    // A good buffer followed by one outside guest memory: not half written.
    let bad = [(DATA, 512, R), (0xffff_ffff_0000, 512, R)];
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &bad).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &[(u64::MAX - 10, 512, R)]).0, ioerr);
    assert_eq!(disk(&fx), before, "a refused write changed the disk");

    // Ending exactly at the limit is fine; reads past it, within capacity, too.
    write_random(&m, &mut fx, &vq, 120, 8);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 2040, &[(DATA2, 4096, W)]).0, 0);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 2047, &[(DATA2, 1024, W)]).0, ioerr);
    // A limit above the capacity is the capacity.
    fx.dev.set_write_limit(u64::MAX);
    assert_eq!(fx.dev.write_limit(), CAP);
    write_random(&m, &mut fx, &vq, 2040, 8);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 2041, &[(DATA, 4096, R)]).0, ioerr);
}

#[test]
fn a_shared_limit_moves_while_the_device_runs() {
    let m = mem();
    let file = TempPath::with_contents(&[]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&file.0).unwrap();
    let limit = Arc::new(AtomicU64::new(8192));
    let dev = Block::writable(f, "d", CAP).unwrap().sharing_limit(limit.clone());
    let (mut fx, vq) = activate(&m, dev, file, 256);
    assert_eq!(fx.dev.write_limit(), 8192);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 16, &[(DATA, 512, R)]).0, ioerr);
    limit.store(CAP / 2, Ordering::Relaxed);
    write_random(&m, &mut fx, &vq, 16, 1);
    fx.dev.set_write_limit(4096);
    assert_eq!(limit.load(Ordering::Relaxed), 4096, "the owner sees the device's limit");
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 16, &[(DATA, 512, R)]).0, ioerr);
    // The file was never sized: past its end reads as zeros.
    m.write_slice(&[0xaa; 512], GuestAddress(DATA2)).unwrap();
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 1000, &[(DATA2, 512, W)]).0, 0);
    let mut got = [0xffu8; 512];
    m.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
    assert_eq!(got, [0u8; 512]);
}

#[test]
fn write_zeroes_and_discard_zero_their_ranges_within_the_limit() {
    let m = mem();
    let (mut fx, vq) = setup_rw(&m, 256);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let written = write_random(&m, &mut fx, &vq, 0, 256);
    let zeroed = |host: &[u8], from: usize, n: usize| host[from * 512..(from + n) * 512].iter().all(|&b| b == 0);

    // Write-zeroes (with and without unmap) and a discard, unaligned to 4 KiB.
    let len = segments(&m, &[(3, 5, unmap)]);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(SEGS, len, R)]), (0, 1));
    let len = segments(&m, &[(20, 4, 0)]);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(SEGS, len, R)]).0, 0);
    // Two segments, the second straddling two descriptors.
    let len = segments(&m, &[(64, 16, 0), (100, 1, 0)]);
    let split = [(SEGS, 20, R), (SEGS + 20, len - 20, R)];
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_DISCARD, 0, &split).0, 0);
    let host = disk(&fx);
    for (from, n) in [(3, 5), (20, 4), (64, 16), (100, 1)] {
        assert!(zeroed(&host, from, n), "sectors {from}+{n} not zero");
    }
    let mut want = written.clone();
    for (from, n) in [(3usize, 5usize), (20, 4), (64, 16), (100, 1)] {
        want[from * 512..(from + n) * 512].fill(0);
    }
    assert_eq!(&host[..written.len()], &want[..], "bytes outside the ranges changed");
    // Read back through the device, too.
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 64, &[(DATA2, 16 * 512, W)]).0, 0);
    let mut got = vec![0xffu8; 16 * 512];
    m.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
    assert!(got.iter().all(|&b| b == 0));

    // Refused, changing nothing: past the limit (one bad segment of two),
    // overflow, too many sectors or segments, bad lengths, writable data.
    fx.dev.set_write_limit(128 * 512);
    let before = disk(&fx);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    for ty in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        let refused = |segs: &[(u64, u32, u32)], fx: &mut Fx| {
            let len = segments(&m, segs);
            request(&m, fx, &vq, ty, 0, &[(SEGS, len, R)]).0
        };
        assert_eq!(refused(&[(0, 8, 0), (127, 2, 0)], &mut fx), ioerr);
        assert_eq!(refused(&[(128, 1, 0)], &mut fx), ioerr);
        assert_eq!(refused(&[(u64::MAX / 256, 1, 0)], &mut fx), ioerr);
        assert_eq!(refused(&[(u64::MAX / 512, u32::MAX, 0)], &mut fx), ioerr);
        assert_eq!(refused(&[(0, DWZ_MAX_SECTORS + 1, 0)], &mut fx), ioerr);
        assert_eq!(refused(&[(0, 1, 0); DWZ_MAX_SEGS as usize + 1], &mut fx), ioerr);
        assert_eq!(refused(&[(0, 1, 1 << 1)], &mut fx), VIRTIO_BLK_S_UNSUPP as u8, "reserved flag");
        assert_eq!(request(&m, &mut fx, &vq, ty, 0, &[(SEGS, 15, R)]).0, ioerr);
        assert_eq!(request(&m, &mut fx, &vq, ty, 0, &[(SEGS, 17, R)]).0, ioerr);
        assert_eq!(request(&m, &mut fx, &vq, ty, 0, &[]).0, ioerr);
        assert_eq!(request(&m, &mut fx, &vq, ty, 0, &[(SEGS, 16, W)]).0, ioerr);
        assert_eq!(request(&m, &mut fx, &vq, ty, 0, &[(0xffff_ffff_0000, 16, R)]).0, ioerr);
    }
    let len = segments(&m, &[(0, 8, unmap)]);
    let st = request(&m, &mut fx, &vq, VIRTIO_BLK_T_DISCARD, 0, &[(SEGS, len, R)]).0;
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP as u8, "unmap on a discard");
    assert_eq!(disk(&fx), before, "a refused request changed the disk");
    // Up to the limit and the full advertised count are accepted; an empty
    // segment is a no-op.
    let full = [(120, 8, 0), (0, 0, 0), (1, 1, 0), (2, 1, 0), (4, 1, 0), (5, 1, 0), (6, 1, 0), (7, 1, 0)];
    let len = segments(&m, &full);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(SEGS, len, R)]).0, 0);
    assert!(zeroed(&disk(&fx), 120, 8));
}

#[test]
fn zero_writing_fallback_covers_exactly_its_range() {
    let file = TempPath::with_contents(&[0x5a; 40_000]);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&file.0).unwrap();
    // A small buffer, so the range takes several rounds and a partial one.
    let mut buf = vec![0xffu8; 4096];
    write_zeros(&f, &mut buf, 1000, 30_000).unwrap();
    let host = std::fs::read(&file.0).unwrap();
    assert!(host[..1000].iter().all(|&b| b == 0x5a));
    assert!(host[1000..31_000].iter().all(|&b| b == 0));
    assert!(host[31_000..].iter().all(|&b| b == 0x5a));
    assert!(write_zeros(&f, &mut [], 0, 1).is_err(), "an empty buffer would never progress");
}

#[test]
fn host_write_errors_are_ioerr() {
    let m = mem();
    // A writable device over a file opened read-only: every write fails on
    // the host, none panics; reads still work.
    let file = TempPath::with_contents(&[]);
    let dev = Block::writable(File::open(&file.0).unwrap(), "d", CAP).unwrap();
    let (mut fx, vq) = activate(&m, dev, file, 256);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    fill(&m, DATA, 512, 3);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]), (ioerr, 1));
    let len = segments(&m, &[(0, 8, 0)]);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(SEGS, len, R)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_DISCARD, 0, &[(SEGS, len, R)]).0, ioerr);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA2, 512, W)]).0, 0);
    assert!(disk(&fx).is_empty());
}

#[test]
fn read_only_device_is_unchanged() {
    let m = mem();
    let (mut fx, vq) = setup(&m, 256);
    assert!(!fx.dev.is_writable());
    let want = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_RO) | (1 << VIRTIO_BLK_F_SEG_MAX);
    assert_eq!(fx.dev.features(), want);
    let mut cfg = [0xffu8; 64];
    fx.dev.read_config(0, &mut cfg);
    let mut old = [0u8; 64];
    old[..8].copy_from_slice(&128u64.to_le_bytes());
    old[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    assert_eq!(cfg, old, "config is the 16 bytes it always was");
    // No writes, write-zeroes or discards; the limit stays 0.
    fx.dev.set_write_limit(1 << 20);
    assert_eq!(fx.dev.write_limit(), 0);
    let before = fx.data.clone();
    fill(&m, DATA, 512, 9);
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]).0, VIRTIO_BLK_S_IOERR as u8);
    let len = segments(&m, &[(0, 8, 0)]);
    for ty in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        assert_eq!(request(&m, &mut fx, &vq, ty, 0, &[(SEGS, len, R)]).0, VIRTIO_BLK_S_UNSUPP as u8);
    }
    assert_eq!(disk(&fx), before);
}

#[test]
fn writable_config_and_features() {
    let m = mem();
    let (fx, _vq) = setup_rw(&m, 256);
    let f = fx.dev.features();
    for bit in [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES] {
        assert_ne!(f & (1 << bit), 0, "feature {bit} missing");
    }
    for bit in [VIRTIO_BLK_F_RO, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_BLK_SIZE] {
        assert_eq!(f & (1 << bit), 0, "feature {bit} offered");
    }
    let mut cfg = [0xffu8; 64];
    fx.dev.read_config(0, &mut cfg);
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), CAP / 512);
    assert_eq!(u32_at(12), SEG_MAX);
    assert_eq!(u32_at(20), 0, "blk_size");
    assert_eq!((u32_at(36), u32_at(40), u32_at(44)), (DWZ_MAX_SECTORS, DWZ_MAX_SEGS, 8));
    assert_eq!((u32_at(48), u32_at(52), cfg[56]), (DWZ_MAX_SECTORS, DWZ_MAX_SEGS, 1));
    assert_eq!(&cfg[57..], &[0; 7], "padding and past the end");
    // A partial last sector of capacity is not exposed.
    let file = TempPath::with_contents(&[]);
    let dev = Block::writable(File::open(&file.0).unwrap(), "d", 4096 + 100).unwrap();
    assert_eq!((dev.capacity(), dev.write_limit()), (8, 4096));
}

#[test]
fn writable_save_restore_round_trip_and_mode_checks() {
    let m = mem();
    let (mut fx, vq) = setup_rw(&m, 256);
    let data = write_random(&m, &mut fx, &vq, 10, 4);
    fx.dev.set_write_limit(256 * 1024);
    let saved = fx.dev.save();
    let DeviceState::Block(st) = &saved else { panic!("not a block state") };
    assert_eq!((st.capacity, st.writable, st.write_limit), (CAP / 512, true, 256 * 1024));
    // Through the snapshot's encoding and back.
    let saved: DeviceState = serde_json::from_slice(&serde_json::to_vec(&saved).unwrap()).unwrap();
    let qs = fx.dev.queue_states();
    let path = fx._file.0.clone();
    let reopen = || std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();

    // No limit set by the caller: the saved one applies.
    let mut other = Block::writable(reopen(), "disk-0", CAP).unwrap();
    let (int, irq) = interrupt();
    other.restore(&saved, m.clone(), int.clone(), vec![Queue::try_from(qs[0]).unwrap()]).unwrap();
    assert_eq!(other.write_limit(), 256 * 1024);
    fx.dev = other;
    fx.irq = irq;
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_IN, 10, &[(DATA2, 2048, W)]).0, 0);
    let mut got = vec![0u8; 2048];
    m.read_slice(&mut got, GuestAddress(DATA2)).unwrap();
    assert_eq!(got, data);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    assert_eq!(request(&m, &mut fx, &vq, VIRTIO_BLK_T_OUT, 512, &[(DATA, 512, R)]).0, ioerr);

    // A limit the caller set before the restore wins; a shared limit's
    // owner is handed the saved one.
    let mut set = Block::writable(reopen(), "d", CAP).unwrap();
    set.set_write_limit(4096);
    set.restore(&saved, m.clone(), int.clone(), vec![]).unwrap();
    assert_eq!(set.write_limit(), 4096);
    let shared = Arc::new(AtomicU64::new(1));
    let mut sh = Block::writable(reopen(), "d", CAP).unwrap().sharing_limit(shared.clone());
    sh.restore(&saved, m.clone(), int.clone(), vec![]).unwrap();
    assert_eq!(shared.load(Ordering::Relaxed), 256 * 1024);

    // Refused: another mode either way, another capacity, a limit past the
    // capacity; a refused restore leaves the limit as it was.
    let mut ro = Block::new(reopen(), "d").unwrap();
    let e = ro.restore(&saved, m.clone(), int.clone(), vec![]).unwrap_err();
    assert!(e.to_string().contains("writable"), "{e}");
    let ro_state = DeviceState::Block(BlockState { capacity: CAP / 512, ..Default::default() });
    let mut rw = Block::writable(reopen(), "d", CAP).unwrap();
    assert!(rw.restore(&ro_state, m.clone(), int.clone(), vec![]).is_err());
    let mut small = Block::writable(reopen(), "d", CAP / 2).unwrap();
    assert!(small.restore(&saved, m.clone(), int.clone(), vec![]).is_err());
    let past = DeviceState::Block(BlockState { capacity: CAP / 512, writable: true, write_limit: CAP + 1 });
    assert!(rw.restore(&past, m.clone(), int, vec![]).is_err());
    assert_eq!(rw.write_limit(), CAP);
}

#[test]
fn old_format_state_still_loads_and_read_only_saves_the_same() {
    let old: DeviceState = serde_json::from_str(r#"{"Block":{"capacity":128}}"#).unwrap();
    assert_eq!(old, DeviceState::Block(BlockState { capacity: 128, writable: false, write_limit: 0 }));
    let m = mem();
    let (mut fx, _vq) = setup(&m, 256);
    let (int, _irq) = interrupt();
    fx.dev.restore(&old, m.clone(), int, vec![]).unwrap();
    // A read-only device's state is encoded exactly as before writable mode.
    assert_eq!(serde_json::to_string(&fx.dev.save()).unwrap(), r#"{"Block":{"capacity":128}}"#);
}

#[test]
fn fuzz_writable_stays_within_its_limit() {
    let m = mem();
    let (mut fx, vq) = setup_rw(&m, 16);
    fx.dev.set_write_limit(100 * 512);
    // Segment records where the fuzzer's descriptors often point.
    let mut rng = Rng(42);
    for i in 0..64u64 {
        let (sector, num) = (rng.below(300), rng.below(300) as u32);
        m.write_obj(sector.to_le(), GuestAddress(DATA + 16 * i)).unwrap();
        m.write_obj(num.to_le(), GuestAddress(DATA + 16 * i + 8)).unwrap();
        m.write_obj((rng.below(2) as u32).to_le(), GuestAddress(DATA + 16 * i + 12)).unwrap();
    }
    fill(&m, DATA + 1024, 4096, 5);
    let types = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID];
    let more = [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 99];
    fuzz(&m, &mut fx, &vq, 0x1234_5678_9abc_def0, |rng| {
        let i = rng.below(7) as usize;
        if i < 4 {
            types[i]
        } else {
            more[i - 4]
        }
    });
    let host = disk(&fx);
    assert_eq!(host.len() as u64, CAP);
    assert!(host[100 * 512..].iter().all(|&b| b == 0), "written past the limit");
}

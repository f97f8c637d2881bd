//! Tests of the virtio-net queues, driven through mock split queues; a Unix
//! datagram socket pair stands in for the tap (one frame per message, as a
//! tap reads and writes them).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::testutil::{interrupt, mem};

const W: u16 = VRING_DESC_F_WRITE as u16;
const RXQ_AT: u64 = 0;
const TXQ_AT: u64 = 0x4_0000;
const TX_BUF: u64 = 0x10_0000;
const RX_BUF: u64 = 0x20_0000;

struct Fx<'a> {
    net: Arc<Mutex<Net>>,
    handle: NetHandle,
    rx: MockSplitQueue<'a, GuestMemory>,
    tx: MockSplitQueue<'a, GuestMemory>,
    irq: vmm_sys_util::eventfd::EventFd,
    tx_posted: u16,
    rx_posted: u16,
}

fn setup(m: &GuestMemory) -> Fx<'_> {
    let rx = MockSplitQueue::create(m, GuestAddress(RXQ_AT), 16);
    let tx = MockSplitQueue::create(m, GuestAddress(TXQ_AT), 16);
    let (int, irq) = interrupt();
    let mut net = Net::new();
    net.activate(m.clone(), int, vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()]).unwrap();
    let net = Arc::new(Mutex::new(net));
    let handle = NetHandle::new(net.clone(), Arc::new(Epoll::new().unwrap()));
    Fx { net, handle, rx, tx, irq, tx_posted: 0, rx_posted: 0 }
}

fn one_desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

impl Fx<'_> {
    /// The guest sends `frame` behind a zeroed header, as one descriptor.
    fn send(&mut self, m: &GuestMemory, frame: &[u8]) {
        let at = TX_BUF + u64::from(self.tx_posted) * 0x1000;
        m.write_slice(&[0u8; HDR_LEN], GuestAddress(at)).unwrap();
        m.write_slice(frame, GuestAddress(at + HDR_LEN as u64)).unwrap();
        self.tx.add_desc_chains(&[one_desc(at, (HDR_LEN + frame.len()) as u32, 0)], self.tx_posted).unwrap();
        self.tx_posted += 1;
        lock(&self.net).queue_notify(TX);
    }

    /// The guest posts one receive buffer of `len` bytes.
    fn post_rx(&mut self, len: u32) {
        let at = RX_BUF + u64::from(self.rx_posted) * 0x1000;
        self.rx.add_desc_chains(&[one_desc(at, len, W)], self.rx_posted).unwrap();
        self.rx_posted += 1;
        lock(&self.net).queue_notify(RX);
    }

    /// Used length of receive buffer `i` and the frame in it (header stripped).
    fn received(&self, m: &GuestMemory, i: u16) -> Option<(u32, Vec<u8>)> {
        if self.rx.used().idx().load() <= i {
            return None;
        }
        let e = self.rx.used().ring().ref_at(i as usize).unwrap().load();
        let at = RX_BUF + u64::from(i) * 0x1000;
        let mut hdr = [0u8; HDR_LEN];
        m.read_slice(&mut hdr, GuestAddress(at)).unwrap();
        let n = (e.len() as usize).saturating_sub(HDR_LEN);
        let mut frame = vec![0; n];
        m.read_slice(&mut frame, GuestAddress(at + HDR_LEN as u64)).unwrap();
        if e.len() > 0 {
            assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "zero header, num_buffers 1");
        }
        Some((e.len(), frame))
    }
}

/// A TCP SYN from the guest to 10.0.0.7:80 (checksums are not checked here).
fn syn() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[10, 0, 0, 7]);
    f.extend_from_slice(&[0xc0, 0x01, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

fn tap_pair() -> (File, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    (File::from(OwnedFd::from(a)), b)
}

#[test]
fn a_card_with_no_tap_refuses_at_once_and_sends_nothing_out() {
    let m = mem();
    let mut fx = setup(&m);
    fx.post_rx(2048);
    fx.send(&m, &syn());
    let (len, frame) = fx.received(&m, 0).expect("an answer");
    assert_eq!(len as usize, HDR_LEN + frame.len());
    // Ethernet back to the guest from the gateway; ICMP type 3 code 13.
    assert_eq!(&frame[..6], &GUEST_MAC);
    assert_eq!(&frame[6..12], &GATEWAY_MAC);
    assert_eq!(frame[14 + 9], 1, "ICMP");
    assert_eq!((frame[34], frame[35]), (3, 13));
    assert_eq!(fx.tx.used().idx().load(), 1, "the sent buffer is returned");
    assert!(fx.irq.read().unwrap() >= 1);
    let c = fx.handle.counters();
    assert_eq!((c.tx_frames, c.rx_frames, c.dropped), (1, 1, 0));
}

#[test]
fn an_answer_waits_for_a_receive_buffer() {
    let m = mem();
    let mut fx = setup(&m);
    fx.send(&m, &syn());
    assert!(fx.received(&m, 0).is_none());
    fx.post_rx(2048);
    let (_, frame) = fx.received(&m, 0).expect("delivered on the guest's kick");
    assert_eq!((frame[34], frame[35]), (3, 13));
}

#[test]
fn frames_go_to_the_tap_and_come_back_from_it() {
    let m = mem();
    let mut fx = setup(&m);
    let (tap, peer) = tap_pair();
    fx.handle.attach_tap(tap).unwrap();
    assert!(fx.handle.has_tap());
    fx.send(&m, &syn());
    let mut got = [0u8; 2048];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &syn()[..], "the frame without its virtio header");
    // Two frames arrive while the guest has one buffer: one waits.
    peer.send(b"first frame from the network").unwrap();
    peer.send(b"second").unwrap();
    fx.post_rx(2048);
    fx.handle.tap_readable();
    assert_eq!(fx.received(&m, 0).unwrap().1, b"first frame from the network");
    assert!(fx.received(&m, 1).is_none());
    fx.post_rx(2048);
    assert_eq!(fx.received(&m, 1).unwrap().1, b"second");
    // No answers from the refusing backend once a tap is there.
    assert_eq!(fx.handle.counters().rx_frames, 2);
    assert!(fx.handle.attach_tap(tap_pair().0).is_err(), "one tap per card");
}

#[test]
fn malformed_chains_are_returned_and_their_frames_dropped() {
    let m = mem();
    let mut fx = setup(&m);
    let (tap, peer) = tap_pair();
    peer.set_nonblocking(true).unwrap();
    fx.handle.attach_tap(tap).unwrap();
    // A transmit descriptor the device may write: not a frame.
    fx.tx.add_desc_chains(&[one_desc(TX_BUF, 100, W)], 0).unwrap();
    // One larger than any frame.
    fx.tx.add_desc_chains(&[one_desc(TX_BUF, (HDR_LEN + MAX_FRAME + 1) as u32, 0)], 1).unwrap();
    // One outside guest memory.
    fx.tx.add_desc_chains(&[one_desc(0xffff_0000, 64, 0)], 2).unwrap();
    lock(&fx.net).queue_notify(TX);
    assert_eq!(fx.tx.used().idx().load(), 3);
    assert!(peer.recv(&mut [0u8; 64]).is_err(), "nothing reached the tap");
    // A receive buffer too small for the frame comes back empty.
    peer.send(&[7u8; 200]).unwrap();
    fx.post_rx(100);
    assert_eq!(fx.received(&m, 0).unwrap().0, 0);
    // A readable receive descriptor is not written.
    peer.send(&[8u8; 20]).unwrap();
    fx.rx.add_desc_chains(&[one_desc(RX_BUF + 0x1000, 2048, 0)], 1).unwrap();
    lock(&fx.net).queue_notify(RX);
    assert_eq!(fx.received(&m, 1).unwrap().0, 0);
    assert_eq!(fx.handle.counters().dropped, 5);
}

#[test]
fn a_frame_split_across_descriptors_arrives_whole() {
    let m = mem();
    let fx = setup(&m);
    let (tap, peer) = tap_pair();
    fx.handle.attach_tap(tap).unwrap();
    let frame: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    peer.send(&frame).unwrap();
    // 5 bytes (inside the header), then 100, then the rest.
    let chain = [
        RawDescriptor::from(SplitDescriptor::new(RX_BUF, 5, W | 1, 1)),
        RawDescriptor::from(SplitDescriptor::new(RX_BUF + 0x100, 100, W | 1, 2)),
        RawDescriptor::from(SplitDescriptor::new(RX_BUF + 0x400, 1000, W, 0)),
    ];
    fx.rx.add_desc_chains(&chain, 0).unwrap();
    lock(&fx.net).queue_notify(RX);
    let e = fx.rx.used().ring().ref_at(0).unwrap().load();
    assert_eq!(e.len() as usize, HDR_LEN + frame.len());
    let mut got = vec![0u8; HDR_LEN + frame.len()];
    m.read_slice(&mut got[..5], GuestAddress(RX_BUF)).unwrap();
    m.read_slice(&mut got[5..105], GuestAddress(RX_BUF + 0x100)).unwrap();
    m.read_slice(&mut got[105..], GuestAddress(RX_BUF + 0x400)).unwrap();
    assert_eq!(got[10], 1);
    assert_eq!(&got[HDR_LEN..], &frame[..]);
}

#[test]
fn state_names_the_mac_and_refuses_another() {
    let m = mem();
    let net = Net::new();
    let st = net.save();
    assert_eq!(st, DeviceState::Net(NetState { mac: GUEST_MAC }));
    let mut other = Net::new();
    let (int, _irq) = interrupt();
    let bad = DeviceState::Net(NetState { mac: [2, 0, 0, 0, 0, 1] });
    assert!(other.restore(&bad, m.clone(), int.clone(), vec![]).is_err());
    assert!(other.restore(&st, m, int, vec![]).is_ok());
    assert!(other.queue_states().is_empty(), "not active: no queues");
}

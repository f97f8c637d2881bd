use std::sync::{Arc, Mutex};

use podflare_proto::ring as layout;
use vm_memory::{Bytes, GuestAddress};

use super::*;

#[derive(Default)]
struct Seen {
    bytes: Vec<u8>,
    wakes: usize,
    failed: Option<String>,
    pause: bool,
}

struct Peer(Arc<Mutex<Seen>>);

impl RingPeer for Peer {
    fn deliver(&mut self, bytes: &[u8]) -> SinkFlow {
        let mut s = self.0.lock().unwrap();
        s.bytes.extend_from_slice(bytes);
        if s.pause {
            SinkFlow::Pause
        } else {
            SinkFlow::Continue
        }
    }
    fn wake_guest(&mut self) {
        self.0.lock().unwrap().wakes += 1;
    }
    fn fail(&mut self, why: &str) {
        self.0.lock().unwrap().failed = Some(why.to_string());
    }
}

fn vm() -> (GuestMemory, Ring, RingHandle, Arc<Mutex<Seen>>) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (16 << 20) as usize)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (ring, handle) = Ring::new(&mem, Box::new(Peer(seen.clone()))).unwrap();
    (mem, ring, handle, seen)
}

fn at(off: u64) -> GuestAddress {
    GuestAddress(layout::BASE + off)
}

fn get64(mem: &GuestMemory, off: u64) -> u64 {
    mem.load(at(off), std::sync::atomic::Ordering::Acquire).unwrap()
}

fn set64(mem: &GuestMemory, off: u64, v: u64) {
    mem.store(v, at(off), std::sync::atomic::Ordering::Release).unwrap();
}

fn set32(mem: &GuestMemory, off: u64, v: u32) {
    mem.store(v, at(off), std::sync::atomic::Ordering::Release).unwrap();
}

/// What the guest side does: takes every byte in the host -> guest ring.
fn guest_take(mem: &GuestMemory) -> Vec<u8> {
    let (head, tail) = (get64(mem, layout::H2G_HEAD), get64(mem, layout::H2G_TAIL));
    let mut out = vec![0u8; (head - tail) as usize];
    read_ring(mem, layout::H2G_DATA, layout::H2G_SIZE, tail, &mut out).unwrap();
    set64(mem, layout::H2G_TAIL, head);
    out
}

/// What the guest side does: appends bytes to the guest -> host ring.
fn guest_put(mem: &GuestMemory, bytes: &[u8]) {
    let head = get64(mem, layout::G2H_HEAD);
    write_ring(mem, layout::G2H_DATA, layout::G2H_SIZE, head, bytes).unwrap();
    set64(mem, layout::G2H_HEAD, head + bytes.len() as u64);
}

#[test]
fn host_bytes_larger_than_the_ring_arrive_in_order_as_the_guest_takes_them() {
    let (mem, mut ring, handle, seen) = vm();
    let data: Vec<u8> = (0..(layout::H2G_SIZE as usize * 5 / 2)).map(|i| (i * 7 % 251) as u8).collect();
    handle.send(&data);
    let mut got = Vec::new();
    for _ in 0..10 {
        let p = ring.poll();
        got.extend(guest_take(&mem));
        if !p.busy {
            break;
        }
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes wrapped around the ring in order");
    assert!(handle.pending().is_empty());
    assert!(!ring.poll().busy, "nothing left to do and nobody waits: the thread may sleep");
    assert_eq!(seen.lock().unwrap().wakes, 0, "a polling REPL needs no wake-up");
}

#[test]
fn guest_bytes_reach_the_peer_across_the_wrap_and_busy_follows_the_host() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (16 << 20) as usize)]).unwrap();
    // Counters near the end of the ring, as after a long life (a restored VM).
    let start = layout::G2H_SIZE * 3 - 5;
    set64(&mem, layout::G2H_HEAD, start);
    set64(&mem, layout::G2H_TAIL, start);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (mut ring, handle) = Ring::new(&mem, Box::new(Peer(seen.clone()))).unwrap();
    assert!(!ring.poll().busy);
    guest_put(&mem, b"hello, wrapped world");
    handle.set_busy(1);
    let p = ring.poll();
    assert!(p.moved && p.busy);
    assert_eq!(seen.lock().unwrap().bytes, b"hello, wrapped world");
    assert_eq!(get64(&mem, layout::G2H_TAIL), start + 20);
    handle.set_busy(0);
    assert!(!ring.poll().busy);
}

#[test]
fn a_counter_no_honest_guest_writes_fails_the_ring_and_nothing_moves_after() {
    let (mem, mut ring, handle, seen) = vm();
    set64(&mem, layout::G2H_HEAD, layout::G2H_SIZE + 1);
    ring.poll();
    assert!(seen.lock().unwrap().failed.as_deref().unwrap().contains("guest-to-host head"));
    handle.send(b"never delivered");
    assert_eq!(ring.poll(), Polled::default());
    assert_eq!(get64(&mem, layout::H2G_HEAD), 0, "a failed ring writes nothing");

    let (mem, mut ring, handle, seen) = vm();
    handle.send(b"abc");
    ring.poll();
    set64(&mem, layout::H2G_TAIL, 4); // took more than was written
    ring.poll();
    assert!(seen.lock().unwrap().failed.as_deref().unwrap().contains("host-to-guest tail"));

    let (mem, mut ring, _, seen) = vm();
    set64(&mem, layout::H2G_TAIL, 1 << 40); // far ahead of a head of 0
    ring.poll();
    assert!(seen.lock().unwrap().failed.is_some());
}

#[test]
fn a_sleeping_repl_is_woken_once_per_sleep_only_when_bytes_wait() {
    let (mem, mut ring, handle, seen) = vm();
    set32(&mem, layout::SLEEP, 1);
    ring.poll();
    assert_eq!(seen.lock().unwrap().wakes, 0, "nothing waits: no wake-up");
    handle.send(b"exec");
    ring.poll();
    ring.poll();
    assert_eq!(seen.lock().unwrap().wakes, 1, "one wake-up per sleep");
    set32(&mem, layout::SLEEP, 2); // awake, then asleep again before taking
    ring.poll();
    set32(&mem, layout::SLEEP, 3);
    ring.poll();
    assert_eq!(seen.lock().unwrap().wakes, 2);
    assert_eq!(guest_take(&mem), b"exec");
    set32(&mem, layout::SLEEP, 5);
    ring.poll();
    assert_eq!(seen.lock().unwrap().wakes, 2, "everything taken: no wake-up");
}

#[test]
fn a_paused_peer_leaves_guest_bytes_in_the_ring_until_resumed() {
    let (mem, mut ring, handle, seen) = vm();
    seen.lock().unwrap().pause = true;
    guest_put(&mem, b"one");
    ring.poll();
    guest_put(&mem, b"two");
    ring.poll();
    assert_eq!(seen.lock().unwrap().bytes, b"one");
    seen.lock().unwrap().pause = false;
    handle.resume();
    ring.poll();
    assert_eq!(seen.lock().unwrap().bytes, b"onetwo");
}

#[test]
fn one_poll_takes_a_bounded_amount() {
    let (mem, mut ring, _, seen) = vm();
    guest_put(&mem, &vec![9u8; MAX_TAKE + 100]);
    ring.poll();
    assert_eq!(seen.lock().unwrap().bytes.len(), MAX_TAKE);
    ring.poll();
    assert_eq!(seen.lock().unwrap().bytes.len(), MAX_TAKE + 100);
}

#[test]
fn ram_without_the_region_is_refused() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (layout::BASE + layout::LEN - 4096) as usize)]).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    assert!(Ring::new(&mem, Box::new(Peer(seen))).is_err());
}

#[test]
fn the_generation_word_counts_up_and_the_window_is_written() {
    let (mem, _ring, handle, _) = vm();
    assert!(!handle.attached());
    set32(&mem, layout::GUEST_MAGIC, layout::GUEST_MAGIC_VALUE);
    assert!(handle.attached());
    assert_eq!(handle.next_generation(5000), 1);
    assert_eq!(handle.next_generation(5000), 2);
    let window: u32 = mem.load(at(layout::POLL_US), std::sync::atomic::Ordering::Acquire).unwrap();
    assert_eq!(window, 5000);
}

#[test]
fn a_repl_restored_asleep_is_woken_for_its_first_request() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (16 << 20) as usize)]).unwrap();
    set32(&mem, layout::SLEEP, 7); // asleep when the snapshot was taken
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (mut ring, handle) = Ring::new(&mem, Box::new(Peer(seen.clone()))).unwrap();
    handle.send(b"first exec");
    ring.poll();
    assert_eq!(seen.lock().unwrap().wakes, 1);
}

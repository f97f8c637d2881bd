//! The committed seed corpora under `tests/fuzz/seeds/<target>/`, made here
//! from real frames, real requests and live devices.
//!
//! `PODFLARE_FUZZ_WRITE_SEEDS=1 cargo test --manifest-path tests/fuzz/Cargo.toml`
//! rewrites them; without it the test checks the committed files are what
//! this code makes (so a change of an input format cannot leave stale
//! seeds) and that each seed does what it is for.

use std::path::PathBuf;

use podflare_fuzz::snapshot::{expect_meta, frame, payload};
use podflare_fuzz::ops::{self as virtio, Ops};
use podflare_fuzz::ring::{self, RingOps, RingRig};
use podflare_fuzz::virtio::{Kind, Rig, DATA_START};
use podflare_fuzz::Reader;
use podflare_hostd::devices::serial::{ConsoleLog, SerialDevice};
use podflare_hostd::vmm::device_manager::{DeviceSnapshot, DevicesState};
use podflare_hostd::vmm::snapshot::decode_state;
use podflare_proto::{encode, encode_json, ExecRequest, Hello, Kind as FrameKind, Language, Ready};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const BLOCK_FEATURES: u64 = (1 << 32) | (1 << 5) | (1 << 2);
const CONSOLE_FEATURES: u64 = (1 << 32) | 1;
const NET_FEATURES: u64 = (1 << 32) | (1 << 5);
/// A TCP SYN from the guest (172.16.0.2) to 10.0.0.7:80 behind a zeroed
/// 12-byte virtio-net header.
const SYN: [u8; 66] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // virtio_net_hdr_v1
    6, 0, 0xac, 0x10, 0, 1, 6, 0, 0xac, 0x10, 0, 2, 8, 0, // Ethernet
    0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 172, 16, 0, 2, 10, 0, 0, 7, // IPv4
    0xc0, 1, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 2, 0xff, 0xff, 0, 0, 0, 0, // TCP
];

/// Named seed inputs of one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn proto() -> Seeds {
    let mut a = vec![7u8];
    let hello = Hello { wall_clock_ns: 1_700_000_000_000_000_000, entropy_hex: "00ff".repeat(8), ..Default::default() };
    encode_json(&mut a, FrameKind::Hello, 0, &hello);
    encode_json(&mut a, FrameKind::Exec, 1, &ExecRequest { language: Language::Python, code: "print(1)".into() });
    encode(&mut a, FrameKind::Stdout, 1, b"1\n");
    encode(&mut a, FrameKind::Exit, 1, &0i32.to_le_bytes());
    let mut b = vec![200u8];
    let ready = Ready { protocol: 1, role: "agent".into(), version: "0.1.0".into() };
    encode_json(&mut b, FrameKind::Ready, 0, &ready);
    encode(&mut b, FrameKind::Stderr, 9, &[b'x'; 300]);
    encode(&mut b, FrameKind::Pong, 0, b"ping");
    encode(&mut b, FrameKind::Error, 10, b"no such language");
    vec![("exec", a), ("ready", b)]
}

fn http() -> Seeds {
    let body = br#"{"code":"print(1)","language":"python"}"#;
    let mut a = vec![3u8, 5];
    a.extend_from_slice(format!("POST /v1/sandboxes/sbx_1/exec HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
    a.extend_from_slice(body);
    a.extend_from_slice(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut b = vec![4 | 8, 9];
    b.extend_from_slice(b"POST /v1/sandboxes HTTP/1.1\r\nAuthorization: Bearer fuzz-key\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n");
    b.extend_from_slice(b"c;ext=1\r\n{\"template\":\r\n0b\r\n \"default\"}\r\n0\r\nTrailer: t\r\n\r\n");
    b.extend_from_slice(b"DELETE /v1/sandboxes/sbx_2 HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}");
    vec![("exec_pipelined", a), ("chunked_auth", b)]
}

fn router() -> Seeds {
    let r = |m: u8, target: &str, body: &str| {
        let mut v = vec![m];
        v.extend_from_slice(target.as_bytes());
        v.push(0);
        v.extend_from_slice(body.as_bytes());
        v
    };
    vec![
        ("create", r(1, "/v1/sandboxes", r#"{"template":"python-datasci","timeout_seconds":60,"persistent":false}"#)),
        ("exec", r(1, "/v1/sandboxes/sbx_1/exec/", r#"{"code":"echo hi","language":"bash"}"#)),
        ("pty", r(1, "/v1/sandboxes/a/pty", r#"{"argv":["bash","-l"],"cols":120,"env":{"TERM":"xterm"}}"#)),
        ("pty_input", r(1, "/v1/sandboxes/a/pty/p1/input", r#"{"data_b64":"aGVsbG8K"}"#)),
        ("pty_read", r(1, "/v1/sandboxes/a/pty/p1/read", r#"{"since_seq":3,"max_bytes":100,"timeout_ms":50}"#)),
        ("resume", r(1, "/v1/spaces/s1/resume?x=1", r#"{"idle_timeout_seconds":5,"egress":false}"#)),
        ("delete", r(2, "/v1/sandboxes/sbx_1", "")),
        ("healthz", r(0, "/v1/healthz#frag", "")),
    ]
}

/// A read of sector 1 across two buffers and a GET_ID, with a snapshot
/// restore and a mutated one between them.
fn block_ops() -> Ops {
    let mut o = Ops::default();
    o.init(BLOCK_FEATURES, [3; 6]);
    let d = DATA_START;
    let mut hdr = [0u8; 16];
    hdr[8] = 1;
    o.mem(d as u32, &hdr)
        .desc(0, 0, d, 16, NEXT, 1)
        .desc(0, 1, d + 0x200, 300, WRITE | NEXT, 2)
        .desc(0, 2, d + 0x400, 212, WRITE | NEXT, 3)
        .desc(0, 3, d + 0x1000, 1, WRITE, 0)
        .avail(0, 0)
        .notify(0)
        .op(virtio::OP_SNAPSHOT);
    let mut id = [0u8; 16];
    id[0] = 8;
    o.mem(d as u32 + 0x20, &id)
        .desc(0, 4, d + 0x20, 16, NEXT, 5)
        .desc(0, 5, d + 0x600, 20, WRITE | NEXT, 6)
        .desc(0, 6, d + 0x1001, 1, WRITE, 0)
        .avail(0, 4)
        .notify(0);
    // Restore with the queue's next_avail moved back by one (queue field 1).
    o.op(virtio::OP_MUTATED).0.u8(1).u8(16 + 1).u64(1);
    o.notify(0);
    o
}

fn ctrl(o: &mut Ops, slot: u16, at: u64, id: u32, event: u16, value: u16) {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    o.mem(at as u32, &m).desc(3, slot, at, 8, 0, 0).avail(3, slot).notify(3);
}

/// The multiport handshake, host bytes to port 0, guest bytes from port 1
/// with the sink pausing and resuming, a snapshot restore in between.
fn console_ops() -> Ops {
    let mut o = Ops::default();
    let d = DATA_START;
    o.init(CONSOLE_FEATURES, [3; 6]);
    for i in 0..4u16 {
        o.desc(2, i, d + 0x100 * u64::from(i), 0x100, WRITE, 0).avail(2, i);
    }
    o.notify(2);
    ctrl(&mut o, 0, d + 0x1000, 0, 0, 1); // DEVICE_READY
    ctrl(&mut o, 1, d + 0x1010, 0, 3, 1); // PORT_READY 0
    ctrl(&mut o, 2, d + 0x1020, 1, 3, 1); // PORT_READY 1
    ctrl(&mut o, 3, d + 0x1030, 0, 6, 1); // PORT_OPEN 0
    o.desc(0, 0, d + 0x2000, 0x400, WRITE, 0).avail(0, 0).notify(0);
    o.send(0, b"hello guest").op(virtio::OP_HOST_OUTPUT).op(virtio::OP_SNAPSHOT);
    o.mem(d as u32 + 0x3000, b"echo from port 1")
        .desc(5, 0, d + 0x3000, 16, NEXT, 1)
        .desc(5, 1, d + 0x3000, 4, 0, 0)
        .avail(5, 0);
    o.op(virtio::OP_PAUSE).0.u8(1);
    o.notify(5).avail(5, 0).notify(5);
    o.op(virtio::OP_PAUSE).0.u8(0);
    o.op(virtio::OP_RESUME).0.u8(1);
    o.op(virtio::OP_HOST_OUTPUT);
    o
}

/// The card refuses a SYN (the answer lands in a receive buffer), is
/// snapshotted, gets its tap, sends the SYN out and receives a frame.
fn net_ops() -> Ops {
    let mut o = Ops::default();
    let d = DATA_START;
    o.init(NET_FEATURES, [3; 6]);
    for i in 0..2u16 {
        o.desc(0, i, d + 0x800 * u64::from(i), 0x800, WRITE, 0).avail(0, i);
    }
    o.notify(0);
    o.mem(d as u32 + 0x2000, &SYN).desc(1, 0, d + 0x2000, SYN.len() as u32, 0, 0).avail(1, 0).notify(1);
    o.op(virtio::OP_SNAPSHOT);
    o.op(virtio::OP_PAUSE).0.u8(0);
    o.desc(1, 1, d + 0x2000, SYN.len() as u32, 0, 0).avail(1, 1).notify(1);
    o.op(virtio::OP_HOST_OUTPUT);
    o.send(0, &SYN[12..]);
    o
}

fn snapshot_payload() -> Vec<u8> {
    let mut devices = Vec::new();
    let serial = SerialDevice::new(EventFd::new(EFD_NONBLOCK).unwrap(), ConsoleLog::new(64)).unwrap();
    devices.push(("serial".to_string(), DeviceSnapshot::Serial(serial.state())));
    for (name, kind, ops) in [("block", Kind::Block, block_ops()), ("console", Kind::Console, console_ops())] {
        let mut rig = Rig::new(kind);
        rig.run(&mut Reader::new(&ops.bytes()));
        assert!(rig.transport.is_activated(), "{name} seed did not activate its device");
        devices.push((name.to_string(), DeviceSnapshot::Virtio(rig.transport.state())));
    }
    serde_json::to_vec(&payload(DevicesState { devices })).unwrap()
}

/// Host bytes through the ring to the guest and guest frames back, polled
/// in between: the data paths both ways.
fn ring_ops() -> RingOps {
    let mut frame = Vec::new();
    encode(&mut frame, FrameKind::Stdout, 3, b"hello host");
    let mut o = RingOps::default();
    o.op(ring::OP_BUSY).0.u8(1);
    o.op(ring::OP_SEND).blob(b"exec request");
    o.op(ring::OP_POLL).op(ring::OP_GUEST_TAKE);
    o.op(ring::OP_GUEST_PUT).blob(&frame);
    o.op(ring::OP_POLL);
    o
}

fn all() -> Vec<(&'static str, Seeds)> {
    let p = snapshot_payload();
    vec![
        ("proto_decoder", proto()),
        ("virtio_block", vec![("read_get_id", block_ops().bytes())]),
        ("virtio_console", vec![("handshake_io", console_ops().bytes())]),
        ("virtio_net", vec![("refuse_then_tap", net_ops().bytes())]),
        ("ring", vec![("both_ways", ring_ops().bytes())]),
        ("http_request", http()),
        ("router", router()),
        ("snapshot_state", vec![("state_file", frame(&p)), ("payload", p)]),
    ]
}

#[test]
fn seeds_are_current_and_valid() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let write = std::env::var_os("PODFLARE_FUZZ_WRITE_SEEDS").is_some();
    for (target, seeds) in all() {
        let dir = root.join(target);
        let total: usize = seeds.iter().map(|(_, s)| s.len()).sum();
        assert!(total < 64 << 10, "{target}: {total} bytes of seeds");
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(committed == bytes, "{} is stale: rerun with PODFLARE_FUZZ_WRITE_SEEDS=1", path.display());
        }
    }
}

#[test]
fn snapshot_seed_decodes_and_restores() {
    let file = frame(&snapshot_payload());
    let snap = decode_state(&file, "seed", &expect_meta()).expect("seed decodes");
    let mut restored = 0;
    for (name, st) in &snap.machine.devices.devices {
        if let DeviceSnapshot::Virtio(st) = st {
            let kind = if name == "block" { Kind::Block } else { Kind::Console };
            assert!(Rig::new(kind).restore(st), "{name} does not restore");
            restored += 1;
        }
    }
    assert_eq!(restored, 2);
}

#[test]
fn device_seeds_reach_the_data_paths() {
    use vm_memory::{Bytes, GuestAddress};
    let d = DATA_START;
    let mut rig = Rig::new(Kind::Block);
    rig.run(&mut Reader::new(&block_ops().bytes()));
    let mut got = [0u8; 512];
    rig.mem.read_slice(&mut got[..300], GuestAddress(d + 0x200)).unwrap();
    rig.mem.read_slice(&mut got[300..], GuestAddress(d + 0x400)).unwrap();
    let want: Vec<u8> = (512..1024u64).map(|i| (i * 7 + i / 512) as u8).collect();
    assert_eq!(&got[..], &want[..], "sector 1 was not read");
    let status: [u8; 2] = rig.mem.read_obj(GuestAddress(d + 0x1000)).unwrap();
    assert_eq!(status, [0, 0], "read and GET_ID did not both succeed");

    // The net seed: the refusal in buffer 0, the tap's frame in buffer 1.
    let mut rig = Rig::new(Kind::Net);
    rig.run(&mut Reader::new(&net_ops().bytes()));
    let mut icmp = [0u8; 2];
    rig.mem.read_slice(&mut icmp, GuestAddress(d + 12 + 34)).unwrap();
    assert_eq!(icmp, [3, 13], "the SYN was not refused");
    let mut frame = [0u8; 54];
    rig.mem.read_slice(&mut frame, GuestAddress(d + 0x800 + 12)).unwrap();
    assert_eq!(&frame[..], &SYN[12..], "the tap's frame did not arrive");

    let mut rig = RingRig::new();
    rig.run(&mut Reader::new(&ring_ops().bytes()));
    assert!(!rig.failed());
    assert_eq!(rig.delivered(), 22, "the guest's frame did not reach the host");

    let mut rig = Rig::new(Kind::Console);
    rig.run(&mut Reader::new(&console_ops().bytes()));
    let mut got = [0u8; 11];
    rig.mem.read_slice(&mut got, GuestAddress(d + 0x2000)).unwrap();
    assert_eq!(&got, b"hello guest");
}

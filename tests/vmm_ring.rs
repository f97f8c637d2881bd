//! The REPL's shared-memory ring on real VMs restored from the cached
//! template snapshot: Python execs go through it, back-to-back execs cost
//! no exit to hostd and no thread wake-up in the guest, a REPL that went to
//! sleep is woken, and a guest that writes garbage into the ring (lying
//! counters, malformed frames, a ring it stops draining) harms only its own
//! sandbox while hostd serves the others. Needs `/dev/kvm`; fails where it
//! exists and anything does not work.
//!
//! Env: `PODFLARE_TEST_WAIT_S` (seconds one exec may take, default 600).

mod common;

use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use podflare_hostd::guest::{ExecChunk, Guest, GuestSpec, Language};
use podflare_hostd::vmm::factory::{RunningGuest, VmFactory};
use podflare_hostd::vmm::VmmConfig;
use podflare_proto::ring;
use vm_memory::{Bytes, GuestAddress};

fn factory() -> Option<&'static VmFactory> {
    static F: OnceLock<Option<VmFactory>> = OnceLock::new();
    F.get_or_init(|| {
        common::kvm_or_skip()?;
        let mut cfg = VmmConfig::from_env().expect("PODFLARE_* settings");
        cfg.templates = vec!["default".into()];
        cfg.pool_size = 0;
        Some(VmFactory::open(cfg).expect("template snapshot of `default` (run scripts/setup first)"))
    })
    .as_ref()
}

fn sandbox(f: &VmFactory, id: &str) -> RunningGuest {
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: id.into(), ram_mib: None, rootfs_gb: None };
    f.create_running(&spec).expect("restore from the template")
}

fn wait() -> Duration {
    common::exec::wait(600)
}

fn py(g: &dyn Guest, code: &str) -> String {
    common::exec::py(g, code, wait())
}

/// Runs `code` and returns how the exec ended: its output and exit code,
/// or the failure message.
fn outcome(g: &dyn Guest, code: &str) -> Result<(String, i32), String> {
    let rx = g.exec(Language::Python, code).map_err(|e| e.to_string())?;
    let mut out = String::new();
    loop {
        match rx.recv_timeout(wait()).expect("exec produced no result in time") {
            ExecChunk::Stdout(b) | ExecChunk::Stderr(b) => out.push_str(&String::from_utf8_lossy(&b)),
            ExecChunk::Exit(c) => return Ok((out, c)),
            ExecChunk::Failed(m) => return Err(m),
            ExecChunk::Started => {}
        }
    }
}

/// Defines `_counts()` in the REPL: context switches and interrupts.
const COUNTERS: &str = include_str!("guest/ring_counters.py");

/// User code that maps the ring region itself (the guest is root in its
/// sandbox: nothing stops it) and does `act` to it, then gives hostd time
/// to look.
fn hostile(act: &str) -> String {
    format!(
        "import mmap, os, struct, time\n\
         fd = os.open('/dev/mem', os.O_RDWR)\n\
         m = mmap.mmap(fd, {len:#x}, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset={base:#x})\n\
         {act}\n\
         time.sleep(3)\n",
        len = ring::LEN,
        base = ring::BASE,
    )
}

#[test]
fn back_to_back_execs_go_through_the_ring_without_exits_or_wake_ups() {
    let Some(f) = factory() else { return };
    let g = sandbox(f, "ring-fast");
    assert!(g.vm().channel().uses_ring(), "the restored REPL serves its ring");
    py(&g, COUNTERS);
    py(&g, "S = _counts()");
    let exits = g.vm().status().exits();
    let started = Instant::now();
    const N: usize = 50;
    for i in 0..N {
        assert_eq!(py(&g, &format!("print({i} * 3)")), (i * 3).to_string());
    }
    let took = started.elapsed();
    let exits = g.vm().status().exits() - exits;
    let counts = py(&g, "E = _counts()\nprint(E[0] - S[0], E[1] - S[1])");
    let (switches, irqs) = counts.split_once(' ').map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())).unwrap();
    eprintln!("{N} execs in {took:?}: {exits} exits to hostd, {switches} REPL context switches, {irqs} guest interrupts");
    // The console path costs each exec a read and a write on the port, a
    // wake-up of the reader thread and the exits of its interrupt; the ring
    // costs none of them.
    assert!(exits < N as u64 / 5, "{exits} exits to hostd for {N} execs");
    assert!(switches < N as u64 / 2, "{switches} REPL context switches for {N} execs");

    // After the polling window the REPL sleeps (odd SLEEP word) and the next
    // exec wakes it.
    std::thread::sleep(Duration::from_millis(300));
    let sleep: u32 = g.vm().memory().load(GuestAddress(ring::BASE + ring::SLEEP), Ordering::Acquire).unwrap();
    assert_eq!(sleep % 2, 1, "the REPL sleeps once its window is over");
    assert_eq!(py(&g, "print('awake')"), "awake");
}

#[test]
fn big_requests_and_outputs_cross_the_ring_byte_exact() {
    let Some(f) = factory() else { return };
    let g = sandbox(f, "ring-big");
    // 3 MiB in (three times the host -> guest ring) and 5 MiB out (more
    // than twice the guest -> host ring), checked by digest.
    let blob: String = (0..3 << 20).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
    let digest = py(&g, &format!("import hashlib\nx = '{blob}'\nprint(len(x), hashlib.sha256(x.encode()).hexdigest())"));
    let want: String = {
        use sha2::Digest;
        sha2::Sha256::digest(blob.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(digest, format!("{} {want}", 3 << 20));
    let out = py(&g, "import random\nrandom.seed(7)\nprint(random.randbytes(5 << 19).hex())");
    let check = py(&g, "import random\nrandom.seed(7)\nprint(len(random.randbytes(5 << 19).hex()))");
    assert_eq!(out.len().to_string(), check);
    assert!(out.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn a_guest_that_breaks_its_ring_fails_only_its_own_sandbox() {
    let Some(f) = factory() else { return };
    let bystander = sandbox(f, "ring-bystander");
    let cases = [
        ("a guest-to-host head past the ring", "h = struct.unpack_from('<Q', m, 0x80)[0]\nstruct.pack_into('<Q', m, 0x80, h + (1 << 40))", "out of range"),
        ("a host-to-guest tail past the head", "t = struct.unpack_from('<Q', m, 0x48)[0]\nstruct.pack_into('<Q', m, 0x48, t + 12345)", "out of range"),
        (
            "garbage frames",
            "h = struct.unpack_from('<Q', m, 0x80)[0]\noff = 0x200000 + h % 0x200000\nm[off:off + 64] = bytes(64) if off + 64 <= 0x400000 else m[off:off + 64]\nstruct.pack_into('<Q', m, 0x80, h + 64)",
            "malformed",
        ),
    ];
    for (i, (what, act, why)) in cases.iter().enumerate() {
        let g = sandbox(f, &format!("ring-hostile-{i}"));
        assert_eq!(py(&g, "print('before')"), "before");
        let ended = outcome(&g, &hostile(act));
        let failure = ended.expect_err(&format!("{what}: the exec must fail, not finish"));
        assert!(failure.contains(why), "{what}: {failure}");
        assert!(outcome(&g, "print(1)").is_err(), "{what}: the broken sandbox stays failed");
        // hostd and every other sandbox are fine.
        let t = Instant::now();
        assert_eq!(py(&bystander, &format!("print({i} + 100)")), (i + 100).to_string());
        eprintln!("{what}: refused ({failure}); the bystander answered in {:?}", t.elapsed());
    }
}

#[test]
fn a_repl_that_stops_draining_its_ring_holds_up_only_its_own_execs() {
    let Some(f) = factory() else { return };
    let stuck = sandbox(f, "ring-stuck");
    let other = sandbox(f, "ring-other");
    // The REPL's main thread sleeps, so it takes nothing from its ring, and
    // a request three times the ring's size waits on the host side.
    let sleeping = stuck.exec(Language::Python, "import time\ntime.sleep(4)\nprint('slept')").unwrap();
    let big = format!("x = '{}'\nprint(len(x))", "y".repeat(3 << 20));
    let queued = stuck.exec(Language::Python, &big).unwrap();
    let t = Instant::now();
    for i in 0..5 {
        assert_eq!(py(&other, &format!("print({i})")), i.to_string());
    }
    assert!(t.elapsed() < Duration::from_secs(4), "the other sandbox was held up: {:?}", t.elapsed());
    assert_eq!(common::exec::collect(sleeping, wait()), ("slept\n".to_string(), 0));
    assert_eq!(common::exec::collect(queued, wait()), (format!("{}\n", 3 << 20), 0));
}

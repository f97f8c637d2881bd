//! Memory at native speed in restored and forked sandboxes (the prepared
//! heap): the REPL's allocations come from pages the template snapshot
//! already maps, so they take no guest page faults (each one is ~2.5 ms of
//! emulated kernel on a PVM host), and every byte written is checked.
//!
//! Needs `/dev/kvm` and the `default` template snapshot (`scripts/setup`);
//! where `/dev/kvm` exists, anything that does not work fails the test.

mod common;

use podflare_hostd::guest::StreamRx;
use sha2::{Digest, Sha256};
use std::sync::OnceLock;
use std::time::Duration;

use podflare_hostd::guest::{ExecChunk, Guest, GuestSpec, Language};
use podflare_hostd::vmm::factory::VmFactory;
use podflare_hostd::vmm::VmmConfig;

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

fn spec(id: &str) -> GuestSpec {
    GuestSpec { template: "default".into(), egress: true, sandbox_id: id.into(), ram_mib: None, rootfs_gb: None }
}

/// How long one exec may take: generous, an emulated guest kernel is slow.
fn wait() -> Duration {
    Duration::from_secs(std::env::var("PODFLARE_TEST_WAIT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(600))
}

fn py(g: &dyn Guest, code: &str) -> String {
    let rx: StreamRx<ExecChunk> = g.exec(Language::Python, code).expect("exec");
    let (mut out, mut err) = (String::new(), String::new());
    loop {
        match rx.recv_timeout(wait()).expect("exec produced no result in time") {
            ExecChunk::Stdout(b) => out.push_str(&String::from_utf8_lossy(&b)),
            ExecChunk::Stderr(b) => err.push_str(&String::from_utf8_lossy(&b)),
            ExecChunk::Exit(0) => return out,
            ExecChunk::Exit(c) => panic!("exit {c}\nstdout: {out}\nstderr: {err}"),
            ExecChunk::Failed(m) => panic!("exec failed: {m}"),
            ExecChunk::Started => {}
        }
    }
}

/// This process's minor and major page faults, as `faults()` in the guest.
const FAULTS_PY: &str = "\
def faults():
    with open('/proc/self/stat') as f:
        s = f.read().rsplit(')', 1)[1].split()
    return int(s[7]) + int(s[9])
";

const MIB: usize = 1 << 20;
const BLOCK_MIB: usize = 64;
const ROUNDS: usize = 10;

/// Allocates and frees a 64 MiB block ten times, each filled with a pattern
/// of its round, and prints each block's SHA-256 and the faults taken.
fn alloc_loop_py() -> String {
    format!(
        "{FAULTS_PY}import hashlib
digests = []
f0 = faults()
for i in range({ROUNDS}):
    pattern = bytes((k + i) & 0xff for k in range(256)) * 4096
    b = bytearray({BLOCK_MIB} << 20)
    mv = memoryview(b)
    for off in range(0, len(b), len(pattern)):
        mv[off:off + len(pattern)] = pattern
    digests.append(hashlib.sha256(mv).hexdigest())
    del mv, b, pattern
print(faults() - f0, ' '.join(digests))
"
    )
}

/// What the guest must report for round `i`: the same bytes hashed here.
fn expected_digest(i: usize) -> String {
    let pattern: Vec<u8> = (0..256).map(|k| ((k + i) & 0xff) as u8).collect::<Vec<u8>>().repeat(4096);
    let mut h = Sha256::new();
    for _ in 0..(BLOCK_MIB * MIB / pattern.len()) {
        h.update(&pattern);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Page faults allowed for the whole loop. Measured here: 0 in a restored
/// sandbox and in a fork child (every block reuses prepared heap pages);
/// without the prepared heap the same loop takes one fault per 4 KiB page
/// the first time, 16,384 per block (or 32 huge-page faults), plus again
/// each time the heap gives the block back. The bound leaves room for the
/// interpreter's own small growth (a new page of objects here and there).
const MAX_FAULTS: u64 = 64;

fn check_alloc_loop(g: &dyn Guest, who: &str) {
    let out = py(g, &alloc_loop_py());
    let mut words = out.split_whitespace();
    let faults: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{who}: no fault count in {out:?}"));
    let digests: Vec<&str> = words.collect();
    assert_eq!(digests.len(), ROUNDS, "{who}: one digest per round: {out:?}");
    for (i, d) in digests.iter().enumerate() {
        assert_eq!(*d, expected_digest(i), "{who}: round {i} did not hold what it wrote");
    }
    eprintln!("{who}: {ROUNDS} x {BLOCK_MIB} MiB allocated, written, checked and freed with {faults} page faults");
    assert!(faults <= MAX_FAULTS, "{who}: {faults} page faults for memory the heap should have had prepared");
}

/// The settings the prepared heap needs are in place in a restored sandbox,
/// and how much it prepared (MiB).
fn prepared_mib(g: &dyn Guest) -> usize {
    let out = py(
        g,
        "import sys\nprint(sys.modules['__main__'].PREPARED_HEAP_MIB, open('/sys/kernel/mm/transparent_hugepage/enabled').read().strip())",
    );
    let mut w = out.split_whitespace();
    let mib: usize = w.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no prepared size in {out:?}"));
    let thp = w.collect::<Vec<_>>().join(" ");
    assert!(thp.contains("[always]"), "transparent huge pages are not `always` in the guest: {thp:?}");
    mib
}

#[test]
fn repl_allocations_in_restored_and_forked_sandboxes_take_no_page_faults() {
    let Some(f) = factory() else { return };
    let g = f.create_running(&spec("sbx_memory")).expect("create");
    let mib = prepared_mib(&g);
    // A 512 MiB guest with its reserve of 96 MiB: ~330 MiB measured here.
    assert!(mib >= 2 * BLOCK_MIB + 64, "only {mib} MiB of heap prepared");
    check_alloc_loop(&g, "restored sandbox");
    let (kids, _) = g.fork_running(&[spec("sbx_memory_child")]).expect("fork");
    check_alloc_loop(&kids[0], "fork child");
}

#[test]
fn allocating_past_the_prepared_heap_works_and_the_heap_stays_prepared() {
    let Some(f) = factory() else { return };
    let g = f.create_running(&spec("sbx_memory_past")).expect("create");
    let mib = prepared_mib(&g);
    // Past the prepared size: the heap grows through first-touch faults (the
    // slow rate) and must still give correct memory.
    let out = py(
        &g,
        &format!(
            "{FAULTS_PY}f0 = faults()
n = ({mib} + 16) << 20
b = bytearray(n)
b[0] = 1
b[n // 2] = 2
b[-1] = 3
print(len(b), b[0] + b[n // 2] + b[-1], sum(b[::1 << 20]), faults() - f0)
del b
"
        ),
    );
    let w: Vec<u64> = out.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    assert_eq!(w.len(), 4, "{out:?}");
    assert_eq!(w[0], ((mib + 16) * MIB) as u64);
    assert_eq!(w[1], 6, "the three bytes written read back");
    assert!(w[3] > 0, "memory past the prepared heap came without a fault: {out:?}");
    eprintln!("{} MiB, {mib} MiB of them prepared: {} page faults", mib + 16, w[3]);
    // Given back past the prepared size only: the loop runs fault-free again.
    check_alloc_loop(&g, "after a block past the prepared heap");
}

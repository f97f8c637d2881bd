//! The vector-state check run in a sandbox (`tests/guest/vector_check.py`):
//! its two workers, the protected run asserted and the unprotected one
//! reported. Shared by `guest_vector.rs` (one vCPU) and `vmm_smp.rs` (two).

use std::time::{Duration, Instant};

use podflare_hostd::guest::{ExecChunk, Guest, GuestSpec, Language, StreamRx};
use podflare_hostd::vmm::factory::VmFactory;
use serde_json::Value;

const CHECK_PY: &str = include_str!("../guest/vector_check.py");
/// Seconds each worker pair runs (after setup), and operations per worker.
const CHECK_SECONDS: f64 = 10.0;
const MIN_OPS_PER_WORKER: u64 = 5000;
const MIN_OPS: u64 = 10_000;
/// The unprotected run is evidence, not a gate: it asks for fewer.
const EVIDENCE_OPS_PER_WORKER: u64 = 1500;
const PROTECT_VARS: [&str; 5] =
    ["GLIBC_TUNABLES", "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS", "OPENSSL_ia32cap"];

fn pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

struct Output {
    stdout: String,
    stderr: String,
    code: i32,
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn collect(rx: StreamRx<ExecChunk>) -> Output {
    let mut out = Output { stdout: String::new(), stderr: String::new(), code: -1 };
    let wait = env_secs("PODFLARE_TEST_WAIT_S", 1800);
    loop {
        match rx.recv_timeout(Duration::from_secs(wait)).unwrap_or_else(|e| panic!("exec produced no result in {wait} s: {e}")) {
            ExecChunk::Stdout(b) => out.stdout.push_str(&String::from_utf8_lossy(&b)),
            ExecChunk::Stderr(b) => out.stderr.push_str(&String::from_utf8_lossy(&b)),
            ExecChunk::Exit(c) => {
                out.code = c;
                return out;
            }
            ExecChunk::Failed(m) => panic!("exec failed: {m}"),
            // Execs never report a start (terminal sessions do).
            ExecChunk::Started => {}
        }
    }
}

fn py(g: &dyn Guest, code: &str) -> String {
    let out = collect(g.exec(Language::Python, code).expect("exec starts"));
    assert_eq!(out.code, 0, "{code:.200} failed: stdout {:?} stderr {:?}", out.stdout, out.stderr);
    out.stdout
}

/// The last line of a Python exec's stdout, as JSON.
fn py_json(g: &dyn Guest, code: &str) -> Value {
    let out = py(g, code);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

/// A restored sandbox of `template` with the check program at /tmp/vector_check.py.
fn sandbox(f: &VmFactory, template: &str) -> impl Guest {
    let g = f.create_running(&GuestSpec { template: template.into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None }).expect("create");
    let hex: String = CHECK_PY.bytes().map(|b| format!("{b:02x}")).collect();
    py(&g, &format!("open('/tmp/vector_check.py', 'wb').write(bytes.fromhex('{hex}'))\nNone"));
    py(&g, "import sys\nsys.path.insert(0, '/tmp')\nimport vector_check");
    g
}

/// One run of the two workers; with `cost`, worker 0 then measures the cost
/// figures alone, in the same environment (a fresh process would pay tens of
/// seconds of Python start and numpy import again).
fn check(g: &dyn Guest, unprotected: bool, cost: bool) -> Value {
    let py_bool = |b: bool| if b { "True" } else { "False" };
    let min_ops = if unprotected { EVIDENCE_OPS_PER_WORKER } else { MIN_OPS_PER_WORKER };
    let patience = env_secs("PODFLARE_VECTOR_PATIENCE_S", 600);
    py_json(
        g,
        &format!(
            "import json\nprint(json.dumps(vector_check.check(unprotected={}, seconds={CHECK_SECONDS}, \
             min_ops={min_ops}, cost={}, patience={patience})))",
            py_bool(unprotected),
            py_bool(cost)
        ),
    )
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn protections_on(v: &Value) -> Vec<&'static str> {
    PROTECT_VARS.iter().copied().filter(|k| v["protections"][*k].as_bool() == Some(true)).collect()
}

/// Per-operation counts, as `name ops/mismatches` (summed over the workers).
fn by_op(v: &Value) -> String {
    let mut sums: Vec<(String, u64, u64)> = Vec::new();
    for w in v["workers"].as_array().into_iter().flatten() {
        for (name, c) in w["by_op"].as_object().into_iter().flatten() {
            let (n, m) = (c[0].as_u64().unwrap_or(0), c[1].as_u64().unwrap_or(0));
            match sums.iter_mut().find(|s| &s.0 == name) {
                Some(s) => {
                    s.1 += n;
                    s.2 += m;
                }
                None => sums.push((name.clone(), n, m)),
            }
        }
    }
    sums.iter().map(|(k, n, m)| format!("{k} {m}/{n}")).collect::<Vec<_>>().join(", ")
}

/// Both runs for one template: asserts the protected one, reports the other
/// (with `evidence`; without, only the protected run, which is all that is
/// asserted); with `numpy`, also measures and prints what the protections cost.
pub fn vectors_stay_private(f: &VmFactory, template: &str, numpy: bool, evidence: bool) {
    let pvm = pvm_host();
    let started = Instant::now();
    let g = sandbox(f, template);

    let p = check(&g, false, numpy);
    let (ops, bad) = (u(&p, "ops"), u(&p, "mismatches"));
    eprintln!(
        "vector-check {template}: protected: {bad} mismatches in {ops} ops ({:.0} s, of which starting the workers {:.0} s; \
         wrong/total per op: {})",
        p["seconds"].as_f64().unwrap_or(0.0),
        p["setup_seconds"].as_f64().unwrap_or(0.0),
        by_op(&p)
    );
    let workers = p["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{p}");
    for w in workers {
        assert!(u(w, "ops") >= MIN_OPS_PER_WORKER, "a worker did too little: {w}");
        assert_eq!(w["numpy"].as_bool(), Some(numpy), "numpy importable in {template}? {w}");
        assert!(u(w, "yields") > 0 && u(w, "bursts") > 0, "{w}");
    }
    if pvm {
        assert_eq!(protections_on(&p), PROTECT_VARS.to_vec(), "PVM sandbox env lacks protections: {p}");
    } else {
        assert!(protections_on(&p).is_empty(), "hardware KVM sandbox env has PVM protections: {p}");
        eprintln!("vector-check {template}: hardware KVM host: AVX protections are off by design (XSAVE saves full state)");
    }
    assert!(ops >= MIN_OPS, "only {ops} operations: {p}");
    assert_eq!(bad, 0, "vector state leaked between processes in {template} with protections on: {p}");
    if !evidence {
        eprintln!("vector-check {template}: protected run in {:.0} s", started.elapsed().as_secs_f64());
        return;
    }

    let q = check(&g, true, numpy);
    let (ops, bad) = (u(&q, "ops"), u(&q, "mismatches"));
    let errors: Vec<&Value> = q["workers"].as_array().into_iter().flatten().flat_map(|w| w["errors"].as_array().into_iter().flatten()).take(4).collect();
    eprintln!(
        "vector-check {template}: UNPROTECTED (evidence, not a failure): {bad} mismatches in {ops} ops ({:.0} s; wrong/total per op: {}); first errors: {errors:?}",
        q["seconds"].as_f64().unwrap_or(0.0),
        by_op(&q)
    );
    assert!(protections_on(&q).is_empty(), "unprotected run still had protections: {q}");
    assert_eq!(q["workers"].as_array().map(Vec::len), Some(2), "{q}");
    for w in q["workers"].as_array().into_iter().flatten() {
        assert!(u(w, "ops") > 0, "an unprotected worker counted nothing: {w}");
    }
    if pvm && bad == 0 {
        eprintln!("vector-check {template}: WARNING: no corruption provoked without protections this time");
    }
    if numpy {
        print_cost(&p["cost"], &q["cost"], pvm);
    }
    eprintln!("vector-check {template}: both runs in {:.0} s", started.elapsed().as_secs_f64());
}

/// The cost table: numpy 512x512 matmul and a 64 MiB copy, medians of 15.
fn print_cost(on: &Value, off: &Value, pvm: bool) {
    let secs = |v: &Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {v}"));
    let label = if pvm { "protected" } else { "sandbox-env(no protections on hardware KVM)" };
    for (name, key) in [("matmul512", "matmul512_s"), ("copy64MiB", "copy64m_s")] {
        let (a, b) = (secs(on, key), secs(off, key));
        assert!(a > 0.0 && b > 0.0, "{on} {off}");
        eprintln!("vector-cost: {name:<10} {label} {a:.4} s  unprotected {b:.4} s  (protected/unprotected x{:.2})", a / b);
    }
    eprintln!("vector-cost: libraries: protected {}  unprotected {}", on["libs"], off["libs"]);
    for (k, v) in [("protected", on), ("unprotected", off)] {
        eprintln!("vector-cost: samples {k}: matmul512 {} copy64MiB {}", v["matmul512_all"], v["copy64m_all"]);
    }
}


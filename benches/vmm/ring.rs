//! The `ring` section: the data path through the REPL's shared-memory ring
//! (in process, no HTTP): back-to-back execs, create -> first output, what
//! a warm exec costs the guest (exits to hostd, guest context switches and
//! interrupts: the counts that predict hardware KVM), channel throughput
//! both ways, bash `echo hi`, and the SDK's 8 MB upload and download
//! through a running hostd.

use super::*;

/// Defines `_counts()` in the REPL: context switches and interrupts.
const COUNTERS: &str = include_str!("../../tests/guest/ring_counters.py");

fn default_spec() -> GuestSpec {
    GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None }
}

pub fn bench_ring(b: &mut Bench, f: &VmFactory) {
    // Create -> first byte of `print(1)`'s output, server side.
    let n = b.pick(10, 3);
    let mut first = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let g = f.create_running(&default_spec()).expect("create");
        let rx = g.exec(Language::Python, "print(1)").expect("exec");
        loop {
            match rx.recv_timeout(Duration::from_secs(600)).expect("first output") {
                ExecChunk::Stdout(_) => break,
                ExecChunk::Exit(c) => panic!("print(1) exited {c} with no output"),
                ExecChunk::Failed(m) => panic!("print(1): {m}"),
                _ => {}
            }
        }
        first.push(ms(t.elapsed()));
    }
    let what = "create -> first output of `print(1)` (server side)";
    b.samples(what, "latency", &first, Some(20.0));
    b.row(what, format!("{:.1} ms", median(&first)), "<= 20 ms", "restore, Hello (clock, entropy, reseed), wake the sleeping REPL, exec", n);

    let g = f.create_running(&default_spec()).expect("create");
    assert!(g.vm().channel().uses_ring(), "the REPL serves its ring");
    py_ok(&g, COUNTERS, "counters");
    // Back-to-back: each exec starts as soon as the last one ended.
    let n = b.pick(500, 100);
    py_ok(&g, "S = _counts()", "counters");
    let exits = g.vm().status().exits();
    let mut each = Vec::with_capacity(n);
    for _ in 0..n {
        each.push(ms(py_ok(&g, "pass", "back-to-back")));
    }
    let exits = g.vm().status().exits() - exits;
    let (_, counts) = py_out(&g, "E = _counts()\nprint(E[0] - S[0], E[1] - S[1])", "counters");
    let mut counts = counts.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    let (switches, irqs) = (counts.next().unwrap_or(f64::NAN), counts.next().unwrap_or(f64::NAN));
    let what = "back-to-back execs (`pass`, no HTTP)";
    b.samples(what, "latency", &each, Some(1.0));
    let (m, p95) = stats(each);
    b.row(what, format!("{m:.3} ms (p95 {p95:.3})"), "<= 1 ms", "request into the ring, the polling REPL runs it, Exit back", n);
    let span = n as f64;
    b.row(
        "per warm exec: exits to hostd / REPL context switches / guest interrupts",
        format!("{:.2} / {:.2} / {:.2}", exits as f64 / span, switches / span, irqs / span),
        "-",
        "over the back-to-back run; interrupts are the guest's timer tick while the REPL polls (each an exit on hardware KVM)",
        n,
    );

    // Throughput both ways, the bytes made in user space on either side.
    let mib = b.knob("PODFLARE_BENCH_RING_MIB", 64, 8);
    py_ok(&g, &format!("import random, sys\n_b = random.randbytes({mib} << 20)"), "prepare");
    let t = Instant::now();
    let (code, bytes) = wait_exit(g.exec(Language::Python, "sys.stdout.buffer.write(_b)").expect("exec")).expect("exec");
    let d = t.elapsed();
    assert_eq!((code, bytes), (0, mib << 20));
    b.row(
        &format!("ring throughput guest -> host, {mib} MiB of REPL stdout"),
        format!("{:.0} MiB/s", mib as f64 / d.as_secs_f64()),
        ">= 100 MiB/s",
        &format!("{:.3} s; binary output from memory the REPL holds", d.as_secs_f64()),
        1,
    );
    // Host -> guest: the exec request itself (the frame limit is 64 MiB
    // with its JSON, so a little less): a comment, which the REPL's JSON
    // parse and compile pass over at native speed.
    let inbound = (mib << 20) - (64 << 10);
    let code = format!("pass  # {}", "x".repeat(inbound));
    let t = Instant::now();
    py_ok(&g, &code, "inbound");
    let d = t.elapsed().as_secs_f64();
    // What the REPL spends on such a request once it has all of it.
    let (_, parse) = py_out(
        &g,
        &format!(
            "import json, time\ns = 'pass  # ' + 'x' * {inbound}\nj = json.dumps({{'language': 'python', 'code': s}}).encode()\n\
             t = time.perf_counter()\ncompile(json.loads(j)['code'], '<exec>', 'exec')\nprint(time.perf_counter() - t)"
        ),
        "parse",
    );
    let parse: f64 = parse.trim().parse().unwrap_or(f64::NAN);
    let in_mib = inbound as f64 / (1 << 20) as f64;
    b.row(
        &format!("ring throughput host -> guest, a {in_mib:.1} MiB exec request"),
        format!("{:.0} MiB/s", in_mib / (d - parse)),
        ">= 100 MiB/s",
        &format!("{:.3} s in all, less the REPL's JSON parse and compile of it ({parse:.3} s, native speed)", d),
        1,
    );

    // Bash: a fresh shell per exec on the agent's port.
    let n = b.pick(5, 2);
    let mut bash = Vec::new();
    for _ in 0..n {
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        let (code, _) = wait_exit(g.exec(Language::Bash, "echo hi").expect("bash")).expect("bash");
        assert_eq!(code, 0);
        bash.push(ms(t.elapsed()));
    }
    let what = "bash `echo hi` (no HTTP)";
    b.samples(what, "latency", &bash, Some(50.0));
    b.row(what, format!("{:.0} ms", median(&bash)), "<= 50 ms", "a fresh shell each, 2 s apart", n);
}

/// The SDK's `upload` and `download` of 8 MB through a running hostd, run
/// by the SDK's own Python (`PODFLARE_BENCH_SDK_PYTHON`); the same bytes
/// written to and read from the file inside the guest alone are timed too,
/// which shows what part is the guest kernel's file work.
pub fn bench_sdk_files(b: &mut Bench, base: &str) {
    let Ok(python) = std::env::var("PODFLARE_BENCH_SDK_PYTHON") else {
        b.row("SDK upload / download of 8 MB", "not measured".into(), "<= 2 s each", "no PODFLARE_BENCH_SDK_PYTHON", 0);
        return;
    };
    let n = b.pick(3, 1);
    let script = format!(
        r#"
import json, random, statistics, time
from podflare import Client, Sandbox
client = Client(host={base:?}, timeout=600)
sbx = Sandbox(client=client)
data = random.randbytes(8 << 20)
up, down, guest_w, guest_r = [], [], [], []
for _ in range({n}):
    t = time.perf_counter(); sbx.upload(data, "/tmp/bench.bin"); up.append(time.perf_counter() - t)
    t = time.perf_counter(); got = sbx.download("/tmp/bench.bin"); down.append(time.perf_counter() - t)
    assert got == data, "download differs"
    r = sbx.run_code("import time\nb = open('/tmp/bench.bin', 'rb').read()\nt = time.perf_counter()\nopen('/tmp/bench2.bin', 'wb').write(b)\nw = time.perf_counter() - t\nt = time.perf_counter()\nopen('/tmp/bench2.bin', 'rb').read()\nprint(w, time.perf_counter() - t)")
    w, r_ = map(float, r.stdout.split()); guest_w.append(w); guest_r.append(r_)
sbx.close()
client.close()
print(json.dumps([statistics.median(x) for x in (up, down, guest_w, guest_r)]))
"#
    );
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(&script)
        .output();
    let figures: Option<Vec<f64>> = out
        .as_ref()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().last().and_then(|l| serde_json::from_str(l).ok()));
    match figures.as_deref() {
        Some([up, down, w, r]) => {
            b.row("SDK `upload` of 8 MB", format!("{up:.2} s"), "<= 2 s", &format!("base64 in the exec code; of it the guest kernel writing the file: {w:.2} s"), n);
            b.row("SDK `download` of 8 MB", format!("{down:.2} s"), "<= 2 s", &format!("base64 in exec stdout; of it the guest kernel reading the file: {r:.2} s"), n);
        }
        _ => {
            let why = match &out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("no output").to_string(),
                Err(e) => e.to_string(),
            };
            b.row("SDK upload / download of 8 MB", format!("failed: {why}"), "<= 2 s each", "", 0);
        }
    }
}

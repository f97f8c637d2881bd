//! The `spaces` section: freeze a sandbox holding state into a space and
//! resume it, server side (no HTTP), with the page cache warm.

use std::time::Instant;

use podflare_hostd::guest::{Guest, GuestSpec};
use podflare_hostd::vmm::factory::VmFactory;
use serde_json::json;

use super::{median, ms, py_ok, py_out, Bench};

pub fn bench_spaces(b: &mut Bench, f: &VmFactory) {
    let n = b.pick(5, 2);
    let mib = b.knob("PODFLARE_BENCH_SPACE_MIB", 100, 100);
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: "sbx_bench".into(), ram_mib: None, rootfs_gb: None };
    let (mut freeze, mut resume, mut disk) = (Vec::new(), Vec::new(), Vec::new());
    let (mut idle_freeze, mut idle_resume) = (Vec::new(), Vec::new());
    // Filled a MiB at a time: `random.randbytes` of it all at once would
    // also dirty twice as much again in temporaries.
    let state = format!(
        "import random, hashlib\nstate = bytearray({mib} << 20)\nfor i in range({mib}):\n    state[i << 20:(i + 1) << 20] = random.randbytes(1 << 20)\nprint(hashlib.sha256(state).hexdigest())"
    );
    for i in 0..n {
        // An idle sandbox (one exec) first, then one holding `mib` MiB.
        let g = f.create_running(&spec).expect("create");
        py_ok(&g, "x = 1", "first exec");
        let t = Instant::now();
        let space = g.freeze("sbx_bench", json!({})).expect("freeze idle");
        idle_freeze.push(ms(t.elapsed()));
        drop(g);
        let t = Instant::now();
        let (g, _) = f.resume_running(&space.id, &spec).expect("resume idle");
        idle_resume.push(ms(t.elapsed()));
        drop(g);

        let g = f.create_running(&spec).expect("create");
        let (_, digest) = py_out(&g, &state, "state");
        let t = Instant::now();
        let space = g.freeze("sbx_bench", json!({})).expect("freeze");
        freeze.push(ms(t.elapsed()));
        disk.push(space.bytes_on_disk as f64 / f64::from(1 << 20));
        drop(g);
        let t = Instant::now();
        let (g, _) = f.resume_running(&space.id, &spec).expect("resume");
        resume.push(ms(t.elapsed()));
        if i == 0 {
            let (_, again) = py_out(&g, "print(hashlib.sha256(state).hexdigest())", "state after resume");
            assert_eq!(again.trim(), digest.trim(), "the state survives freeze and resume");
        }
    }
    let what = format!("freeze a sandbox holding {mib} MiB into a space");
    b.samples(&what, "latency", &freeze, Some(200.0));
    b.row(
        &what,
        format!("{:.0} ms", median(&freeze)),
        "<= 200 ms",
        &format!(
            "server side: pause, write its own pages (zero pages as holes), state, fsync both, rename; {:.0} MiB on disk per space; an idle sandbox: {:.1} ms",
            median(&disk),
            median(&idle_freeze)
        ),
        n,
    );
    let what = format!("resume that space ({mib} MiB, page cache warm)");
    b.samples(&what, "latency", &resume, Some(20.0));
    b.row(
        &what,
        format!("{:.1} ms", median(&resume)),
        "<= 20 ms",
        &format!(
            "server side, to a running VM with its Hello queued; includes reading back the {mib} MiB to check their CRC-32; an idle sandbox's space: {:.1} ms",
            median(&idle_resume)
        ),
        n,
    );
}

//! The `memory` section: allocation in fresh restored sandboxes and the
//! guest kernel's first-touch fault.

use super::*;

/// Anonymous memory mapped fresh and touched a page at a time: the guest
/// kernel's first-touch fault, as any new process takes it. Prints the
/// milliseconds per 4 KiB page.
fn fault_probe_py(mib: usize) -> String {
    format!(
        "import mmap, time
n = {mib} << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
t = time.perf_counter()
for off in range(0, n, 4096):
    m[off] = 1
print((time.perf_counter() - t) * 1e3 / (n // 4096))
m.close()
"
    )
}

/// Memory at native speed: allocation-heavy execs in fresh restored
/// sandboxes (each sample its own sandbox, so the host's first write to
/// each page is in the figure), the guest kernel's first-touch fault, and
/// the `python-datasci` rows (in quick mode only when that template's
/// snapshot is already cached: building it is a 4-minute cold boot here).
pub fn bench_memory(b: &mut Bench, f: &VmFactory, cfg: &VmmConfig) {
    let n = b.pick(5, 2);
    let spec = |t: &str| GuestSpec { template: t.into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None };
    let mut big = Vec::new();
    let mut big_again = Vec::new();
    let mut list = Vec::new();
    let mut fault = Vec::new();
    let mut prepared = 0.0;
    for i in 0..n {
        let g = f.create_running(&spec("default")).expect("create");
        py_ok(&g, "print(1)", "first exec");
        if i == 0 {
            let (_, out) = py_out(&g, "import sys\nprint(sys.modules['__main__'].PREPARED_HEAP_MIB)", "prepared heap");
            prepared = out.trim().parse().unwrap_or(f64::NAN);
        }
        list.push(ms(py_ok(&g, "x = [i for i in range(1_000_000)]\ndel x", "list")));
        big.push(ms(py_ok(&g, "b = bytearray(256 << 20)\ndel b", "bytearray")));
        big_again.push(ms(py_ok(&g, "b = bytearray(256 << 20)\ndel b", "bytearray again")));
        let (_, out) = py_out(&g, &fault_probe_py(b.pick(16, 8)), "fault probe");
        fault.push(out.trim().parse().unwrap_or(f64::NAN));
    }
    let what = "`bytearray(256 << 20)` in a restored sandbox";
    b.samples(what, "latency", &big, Some(1000.0));
    b.row(
        what,
        format!("{:.0} ms", median(&big)),
        "<= 1 s",
        &format!(
            "exec round trip, each sample a fresh sandbox; no guest page fault (prepared heap: {prepared:.0} MiB); the time is the host's first write to each 4 KiB page (shadow paging on PVM); again in the same sandbox {:.0} ms",
            median(&big_again)
        ),
        n,
    );
    let what = "a list of 1,000,000 ints in a restored sandbox";
    b.samples(what, "latency", &list, Some(300.0));
    b.row(what, format!("{:.0} ms", median(&list)), "<= 0.3 s", "`[i for i in range(1_000_000)]`, exec round trip", n);
    let what = "first-touch page fault of fresh memory, per 4 KiB";
    b.row(
        what,
        format!("{:.3} ms", median(&fault)),
        "<= 0.5 ms",
        &format!("a fresh private anonymous mapping of {} MiB touched a page at a time (the path every new process takes); transparent huge pages on", b.pick(16, 8)),
        n,
    );
    let cached = std::fs::read_dir(cfg.cache_dir.join("snapshots").join("python-datasci"))
        .map(|d| d.flatten().any(|e| e.path().join("state").exists()))
        .unwrap_or(false);
    let rows = [
        ("`np.ones((1000, 1000)).sum()` in `python-datasci`", "import numpy as np\nnp.ones((1000, 1000)).sum()"),
        ("`pd.DataFrame(np.random.rand(200_000, 10))` in `python-datasci`", "import numpy as np, pandas as pd\npd.DataFrame(np.random.rand(200_000, 10))"),
        ("`np.random.rand(512, 512)` then `a @ a` in `python-datasci`", "import numpy as np\na = np.random.rand(512, 512)\na @ a"),
    ];
    if b.quick && !cached {
        for (what, _) in rows {
            b.row(what, "not measured".into(), "<= 0.3 s", "quick mode: no cached `python-datasci` snapshot (a full run or `scripts/test` builds it)", 0);
        }
        return;
    }
    let mut c = cfg.clone();
    c.templates = vec!["python-datasci".into()];
    c.pool_size = 0;
    let ds = match VmFactory::open(c) {
        Ok(ds) => ds,
        Err(e) => {
            for (what, _) in rows {
                b.row(what, format!("failed: {e}"), "<= 0.3 s", "", 0);
            }
            return;
        }
    };
    let mut times = vec![Vec::new(); rows.len()];
    for _ in 0..n {
        let g = ds.create_running(&spec("python-datasci")).expect("create");
        py_ok(&g, "print(1)", "first exec");
        for (k, (_, code)) in rows.iter().enumerate() {
            times[k].push(ms(py_ok(&g, code, "datasci")));
        }
    }
    for ((what, _), t) in rows.iter().zip(times) {
        b.samples(what, "latency", &t, Some(300.0));
        b.row(what, format!("{:.0} ms", median(&t)), "<= 0.3 s", "exec round trip in a fresh restored sandbox, one after the other", n);
    }
}

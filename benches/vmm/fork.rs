//! The `fork` section: fork(n) of a sandbox holding state, server side.

use super::*;

/// fork(n) of a sandbox holding `PODFLARE_BENCH_FORK_MIB` (100; quick 2) MiB
/// of non-zero Python state made in user space, `PODFLARE_BENCH_FORK_RUNS`
/// (5; quick 2) runs per n; server-side figures from the factory.
pub fn bench_fork(b: &mut Bench, f: &VmFactory) {
    let mib = b.knob("PODFLARE_BENCH_FORK_MIB", 100, 2);
    let runs = b.knob("PODFLARE_BENCH_FORK_RUNS", 5, 2);
    let spec = |id: String| GuestSpec { template: "default".into(), egress: true, sandbox_id: id, ram_mib: None, rootfs_gb: None };
    let parent = f.create_running(&spec("sbx_bench_parent".into())).expect("create");
    // 1 MiB at a time: one randbytes of the whole would touch twice the
    // memory (an int, then the bytes), and every first touch is a slow
    // emulated page fault here.
    let code = format!("import random\nstate = [random.randbytes(1 << 20) for _ in range({mib})]\nNone");
    let took = py_ok(&parent, &code, "parent state");
    eprintln!("fork bench: parent holds {mib} MiB after {:.1} s", took.as_secs_f64());
    let specs = |n: usize| (0..n).map(|i| spec(format!("sbx_bench_child{i}"))).collect::<Vec<_>>();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    // The first fork copies every page the parent wrote since its template.
    let (kids, first) = parent.fork_running(&specs(5)).expect("fork");
    drop(kids);
    let what = format!("first fork(5) of a sandbox holding {mib} MiB (server side, one run)");
    b.samples(&what, "latency", &[ms(first.total)], Some(25.0));
    let mut note = format!(
        "copies its own pages into an image layer ({:.1} MiB non-zero, {} runs); parent paused {:.1} ms",
        mb(first.image_bytes),
        first.image_runs,
        ms(first.parent_paused)
    );
    if b.quick {
        note = join_note(&note, &format!("quick: a {mib} MiB parent"));
    }
    b.row(&what, format!("{:.1} ms", ms(first.total)), "<= 25 ms (goal 10)", &note, 0);
    // Later forks copy only what the parent wrote since its previous one
    // (a step of its own first, as in a tree search); every
    // MAX_FORK_LAYERS-th folds its layers into one, a full copy again.
    let step = "step = globals().get('step', 0) + 1\nNone";
    let (mut paused5, mut copied5, mut folds) = (Vec::new(), Vec::new(), Vec::new());
    for n in [1usize, 5, 32] {
        let mut total = Vec::new();
        for _ in 0..runs {
            py_ok(&parent, step, "step");
            let (kids, fig) = parent.fork_running(&specs(n)).expect("fork");
            drop(kids);
            if fig.folded {
                folds.push(fig);
                continue;
            }
            total.push(ms(fig.total));
            if n == 5 {
                paused5.push(ms(fig.parent_paused));
                copied5.push(mb(fig.image_bytes));
            }
        }
        let what = format!("fork({n}) of that sandbox after a step of its own (server side)");
        let target = if n == 5 { "<= 25 ms (goal 10)" } else { "-" };
        b.samples(&what, "latency", &total, (n == 5).then_some(25.0));
        b.row(
            &what,
            format!("{:.1} ms", median(&total)),
            target,
            "copies what it wrote since its last fork into a new layer, remaps it, restores n children, Hello",
            total.len(),
        );
    }
    // Few runs (quick mode) may not reach a fold: fork(1) until one folds.
    let layers = podflare_hostd::vmm::vm::MAX_FORK_LAYERS;
    for _ in 0..=layers {
        if !folds.is_empty() {
            break;
        }
        py_ok(&parent, step, "step");
        let (kids, fig) = parent.fork_running(&specs(1)).expect("fork");
        drop(kids);
        if fig.folded {
            folds.push(fig);
        }
    }
    let what = "parent paused during those fork(5)";
    b.samples(what, "latency", &paused5, Some(10.0));
    b.row(what, format!("{:.1} ms", median(&paused5)), "<= 10 ms", &format!("new layer {:.2} MiB of non-zero pages", median(&copied5)), paused5.len());
    let what = format!("a fork that folds {layers} layers into one");
    let fold_ms: Vec<f64> = folds.iter().map(|fig| ms(fig.total)).collect();
    b.samples(&what, "latency", &fold_ms, None);
    for fig in folds.iter().take(2) {
        let note = format!("full copy again ({:.1} MiB); parent paused {:.1} ms", mb(fig.image_bytes), ms(fig.parent_paused));
        b.row(&what, format!("{:.1} ms", ms(fig.total)), "-", &note, 0);
    }
    if folds.is_empty() {
        b.row(&what, "no fold happened".into(), "-", "", 0);
    }
    let mut after_fork = Vec::new();
    let mut after_write = Vec::new();
    let mut first_exec = Vec::new();
    for _ in 0..runs {
        let (kids, _) = parent.fork_running(&specs(1)).expect("fork");
        let child = &kids[0];
        after_fork.push(child.private_memory_bytes() as f64 / (1 << 20) as f64);
        first_exec.push(ms(py_ok(child, "print(1)", "first exec")));
        py_ok(child, "extra = random.randbytes(1 << 20)\nNone", "write");
        after_write.push(child.private_memory_bytes() as f64 / (1 << 20) as f64);
    }
    b.row("host memory of a child right after fork", format!("{:.2} MiB", median(&after_fork)), "<= 2 MiB", "its own (written) pages of guest RAM; image pages stay shared with the parent", runs);
    b.row("host memory of a child after it writes 1 MiB", format!("{:.2} MiB", median(&after_write)), "-", "`extra = random.randbytes(1 << 20)` (its pages plus what the REPL touched)", runs);
    let what = "first exec in a child: `print(1)`";
    b.samples(what, "latency", &first_exec, None);
    b.row(what, format!("{:.1} ms", median(&first_exec)), "-", "includes the child handling Hello (clock, entropy)", runs);
}

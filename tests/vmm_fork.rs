//! fork(n) on real VMs restored from the cached template snapshots: children
//! start from the parent's memory, processes and files and share nothing
//! written afterwards, to any depth; image layers stack and fold into one;
//! a guest writing during the capture gives consistent children; each draws its own random numbers; a
//! background process runs on in every child; an exec running at fork time
//! stays with the parent; fork(32) works; a fork past capacity leaves nothing
//! behind; fork/close cycles leave fds, threads, mappings and memory flat.
//! Needs `/dev/kvm`; fails where it exists and anything does not work.
//!
//! Env: `PODFLARE_FORK_CYCLES` (default 200), `PODFLARE_TEST_WAIT_S`
//! (seconds one exec may take, default 600).

mod common;

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use podflare_hostd::guest::{ExecChunk, Guest, GuestError, GuestSpec, Language, StreamRx};
use podflare_hostd::vmm::factory::{RunningGuest, VmFactory};
use podflare_hostd::vmm::VmmConfig;

/// At most this many sandboxes live at once in this binary's factory.
const MAX_SANDBOXES: usize = 48;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn factory() -> Option<&'static VmFactory> {
    static F: OnceLock<Option<VmFactory>> = OnceLock::new();
    F.get_or_init(|| {
        common::kvm_or_skip()?;
        let mut cfg = VmmConfig::from_env().expect("PODFLARE_* settings");
        cfg.templates = vec!["default".into(), "python-datasci".into()];
        cfg.pool_size = 0;
        cfg.max_sandboxes = MAX_SANDBOXES;
        Some(VmFactory::open(cfg).expect("template snapshots (run scripts/setup first)"))
    })
    .as_ref()
}

/// One test at a time: they count the factory's live VMs and the process's
/// threads, and each keeps both vCPU-heavy.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn spec(template: &str, id: &str) -> GuestSpec {
    GuestSpec { template: template.into(), egress: true, sandbox_id: id.into(), ram_mib: None, rootfs_gb: None }
}

fn create(f: &VmFactory, template: &str) -> RunningGuest {
    f.create_running(&spec(template, "sbx_parent")).expect("create")
}

fn fork(g: &RunningGuest, n: usize) -> Vec<RunningGuest> {
    let specs: Vec<GuestSpec> = (0..n).map(|i| spec("default", &format!("sbx_child{i}"))).collect();
    let (children, figures) = g.fork_running(&specs).expect("fork");
    eprintln!("fork({n}): {figures:?}");
    assert_eq!(children.len(), n);
    children
}

fn collect(rx: StreamRx<ExecChunk>) -> (String, i32) {
    common::exec::collect(rx, common::exec::wait(600))
}

/// Runs Python and returns its output, trimmed; fails on a non-zero exit.
fn py(g: &dyn Guest, code: &str) -> String {
    let (out, code_) = collect(g.exec(Language::Python, code).expect("exec starts"));
    assert_eq!(code_, 0, "{code:.200} failed: {out}");
    out.trim().to_string()
}

const STATE: &str = "print(x, open('/root/f').read())";

#[test]
fn children_start_from_the_parent_and_are_isolated_to_any_depth() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    py(&parent, "x = 1\nopen('/root/f', 'w').write('parent')");
    let kids = fork(&parent, 3);
    for k in &kids {
        assert_eq!(py(k, STATE), "1 parent", "a child sees the parent's variable and file");
    }
    py(&kids[0], "x = 2\nopen('/root/f', 'w').write('child0')");
    assert_eq!(py(&kids[0], STATE), "2 child0");
    assert_eq!(py(&parent, STATE), "1 parent", "a child's change is invisible in the parent");
    assert_eq!(py(&kids[1], STATE), "1 parent", "and in its siblings");
    py(&parent, "x = 3\nopen('/root/f', 'w').write('parent3')");
    assert_eq!(py(&kids[2], STATE), "1 parent", "the parent's later change is invisible in its children");

    // Three generations: child1 -> grandchild -> great-grandchild.
    py(&kids[1], "x = 10\nopen('/root/f', 'w').write('gen1')");
    let grand = fork(&kids[1], 2);
    assert_eq!(py(&grand[0], STATE), "10 gen1");
    py(&grand[0], "x = 20\nopen('/root/f', 'w').write('gen2')");
    let great = fork(&grand[0], 1);
    assert_eq!(py(&great[0], STATE), "20 gen2");
    py(&great[0], "x = 30");
    assert_eq!(py(&grand[0], STATE), "20 gen2");
    assert_eq!(py(&grand[1], STATE), "10 gen1");
    assert_eq!(py(&kids[1], STATE), "10 gen1");

    // The parent forks again: the new child starts from its state now.
    let again = fork(&parent, 1);
    assert_eq!(py(&again[0], STATE), "3 parent3");
    assert_eq!(py(&parent, STATE), "3 parent3");
    assert_eq!(py(&kids[0], STATE), "2 child0");
}

#[test]
fn layers_stack_over_generations_and_fold_into_one() {
    // Each fork of a VM that wrote since its last adds an image layer; a
    // child maps them all in order. Past MAX_FORK_LAYERS they fold into
    // one. Through it all a child sees exactly the parent's state: a value
    // rewritten in every step, and one written in the first step only.
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    py(&parent, "first = 'kept'\nopen('/root/f', 'w').write('step0')");
    let max = podflare_hostd::vmm::vm::MAX_FORK_LAYERS;
    let mut layers = Vec::new();
    let mut folded_at = None;
    for step in 1..=max + 2 {
        py(&parent, &format!("x = {step}\nopen('/root/f', 'w').write('step{step}')"));
        let specs = [spec("default", "sbx_child")];
        let (kids, fig) = parent.fork_running(&specs).expect("fork");
        layers.push(fig.layers);
        if fig.folded {
            folded_at.get_or_insert(step);
        }
        let seen = py(&kids[0], "print(first, x, open('/root/f').read())");
        assert_eq!(seen, format!("kept {step} step{step}"), "fork {step} ({fig:?})");
        if step == 3 {
            // A child of a child maps its parent's layers plus its own.
            py(&kids[0], "x = 'grand'");
            let (grand, gfig) = kids[0].fork_running(&specs).expect("fork of a child");
            assert_eq!(gfig.layers, fig.layers + 1, "{gfig:?}");
            assert_eq!(py(&grand[0], "print(first, x, open('/root/f').read())"), "kept grand step3");
        }
    }
    eprintln!("layers after each fork: {layers:?}; first fold at fork {folded_at:?}");
    // One new layer per fork after a write, until a fork folds them (at the
    // latest the one past `max` layers; sooner when their runs reach
    // MAX_LAYER_RUNS), and on from one again.
    let fold = folded_at.expect("a fold within max + 2 forks");
    assert!(fold >= 2 && fold <= max + 1, "{layers:?}");
    assert_eq!(layers[..fold - 1], (1..fold).collect::<Vec<_>>()[..], "one new layer per fork after a write");
    assert_eq!(layers[fold - 1], 1, "folded into one");
    assert_eq!(layers[fold], 2, "and stacking again");
    assert_eq!(py(&parent, "print(first, x)"), format!("kept {}", max + 2));
}

#[test]
fn a_guest_writing_while_it_forks_gives_consistent_children() {
    // A REPL thread appends 1, 2, 3, ... to a fresh 4 MiB buffer (a slow
    // page fault per new page here, so it writes for seconds) while the
    // parent forks. A consistent copy holds 1..=k, then only zeros; a copy
    // that missed writes the running guest made during the capture would
    // have a hole (the child's thread goes on after the hole, never back).
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    py(
        &parent,
        "import threading, time\n\
         log = memoryview(bytearray(4 << 20)).cast('Q')\n\
         def append():\n\
         \x20   for i in range(len(log)):\n\
         \x20       log[i] = i + 1\n\
         threading.Thread(target=append, daemon=True).start()\n\
         while log[1024] == 0: time.sleep(0.01)\n\
         None",
    );
    let check = "import sys\nsys.setswitchinterval(100)\n\
                 k = next((i for i, x in enumerate(log) if x == 0), len(log))\n\
                 ok = all(x == i + 1 for i, x in enumerate(log[:k])) and not any(log[k:])\n\
                 sys.setswitchinterval(0.005)\nprint(ok, k)";
    let mut ks = Vec::new();
    for round in 0..3 {
        for k in fork(&parent, 1) {
            let out = py(&k, check);
            assert!(out.starts_with("True "), "round {round}: the child's log has a hole: {out}");
            ks.push(out);
        }
    }
    eprintln!("log lengths seen by the children: {ks:?}");
}

#[test]
fn every_child_draws_its_own_random_numbers() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "python-datasci");
    let draw = "import os, random, uuid, numpy\n\
                print(os.urandom(8).hex(), random.random(), uuid.uuid4(), numpy.random.random())";
    py(&parent, "import numpy\nNone");
    let specs: Vec<GuestSpec> = (0..4).map(|i| spec("python-datasci", &format!("sbx_r{i}"))).collect();
    let (kids, _) = parent.fork_running(&specs).expect("fork");
    let mut seen: Vec<Vec<String>> = vec![py(&parent, draw).split(' ').map(String::from).collect()];
    for k in &kids {
        seen.push(py(k, draw).split(' ').map(String::from).collect());
    }
    for (i, what) in ["os.urandom", "random.random", "uuid.uuid4", "numpy.random"].iter().enumerate() {
        let values: HashSet<&String> = seen.iter().map(|v| &v[i]).collect();
        assert_eq!(values.len(), seen.len(), "{what} repeats between parent and children: {seen:?}");
    }
}

#[test]
fn a_background_process_runs_on_in_the_children() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    py(
        &parent,
        "import subprocess, sys\n\
         ticker = subprocess.Popen([sys.executable, '-c', \
         'import os, time\\nn = 0\\nwhile True:\\n    n += 1\\n    open(\"/tmp/tick.new\", \"w\").write(str(n))\\n    os.replace(\"/tmp/tick.new\", \"/tmp/tick\")\\n    time.sleep(0.1)'])\n\
         import time\n\
         while not __import__('os').path.exists('/tmp/tick'): time.sleep(0.1)\n\
         None",
    );
    let kids = fork(&parent, 2);
    let ticks = "import time\na = int(open('/tmp/tick').read())\ntime.sleep(1.5)\nb = int(open('/tmp/tick').read())\n\
                 print(ticker.poll() is None, b > a)";
    for k in &kids {
        assert_eq!(py(k, ticks), "True True", "the background process runs on in the child");
    }
    assert_eq!(py(&parent, ticks), "True True", "and in the parent");
}

#[test]
fn an_exec_running_at_fork_time_stays_with_the_parent() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    let rx = parent
        .exec(Language::Python, "import time\nprint('before', flush=True)\ntime.sleep(2)\nprint('after')")
        .expect("exec starts");
    let wait = Duration::from_secs(env("PODFLARE_TEST_WAIT_S", 600));
    match rx.recv_timeout(wait).expect("first output") {
        ExecChunk::Stdout(b) => assert_eq!(String::from_utf8_lossy(&b).trim(), "before"),
        other => panic!("unexpected {other:?}"),
    }
    let kids = fork(&parent, 1);
    let (rest, code) = collect(rx);
    assert_eq!((rest.trim(), code), ("after", 0), "the parent's exec finishes in the parent");
    let out = py(&kids[0], "print('child runs its own')");
    assert_eq!(out, "child runs its own", "the child's output holds nothing of the parent's exec");
}

#[test]
fn fork_32_children_all_run() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    py(&parent, "marker = 'm'");
    let kids = fork(&parent, 32);
    for (i, k) in kids.iter().enumerate() {
        assert_eq!(py(k, &format!("print(marker, {i})")), format!("m {i}"));
    }
}

fn threads() -> usize {
    common::count_dir("/proc/self/task")
}

fn live_vms(f: &VmFactory) -> u64 {
    use podflare_hostd::guest::GuestFactory;
    f.capacity()["live_vms"].as_u64().expect("live_vms")
}

#[test]
fn a_fork_past_capacity_is_refused_whole() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let parent = create(f, "default");
    py(&parent, "y = 5");
    let (live, thr) = (live_vms(f), threads());
    let specs: Vec<GuestSpec> = (0..MAX_SANDBOXES).map(|i| spec("default", &format!("sbx_over{i}"))).collect();
    match parent.fork_running(&specs) {
        Err(GuestError::Capacity(_, why)) => eprintln!("refused: {why}"),
        Err(e) => panic!("wrong error for a fork past capacity: {e}"),
        Ok(_) => panic!("a fork of {MAX_SANDBOXES} children next to a live parent was admitted"),
    }
    assert_eq!(live_vms(f), live, "a refused fork holds no places");
    assert_eq!(threads(), thr, "a refused fork starts no threads");
    assert_eq!(py(&parent, "print(y)"), "5", "the parent runs on untouched");
}

fn fds() -> usize {
    common::count_dir("/proc/self/fd")
}

/// Mappings of the process, and those of fork images among them.
fn mappings() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    (maps.lines().count(), maps.lines().filter(|l| l.contains("podflare-fork")).count())
}

#[test]
fn fork_close_cycles_leave_images_fds_threads_and_memory_flat() {
    let Some(f) = factory() else { return };
    let _one = serial();
    let cycles = env("PODFLARE_FORK_CYCLES", 200);
    let parent = create(f, "default");
    py(&parent, "data = bytearray(b'p' * 65536)");
    let round = |i: u64| {
        let specs = [spec("default", "sbx_child")];
        let (kids, fig) = parent.fork_running(&specs).expect("fork");
        if i.is_multiple_of(25) {
            assert_eq!(py(&kids[0], "print(len(data))"), "65536");
        }
        fig.folded
    };
    // The parent holds between one and MAX_FORK_LAYERS image layers (an fd
    // and some mappings each) depending on where it is in the fold cycle:
    // both measurements are taken right after a fold, with one layer. A
    // parent that wrote nothing since its last fork adds no layer, so a few
    // bytes are written to make each fork add one.
    let max = podflare_hostd::vmm::vm::MAX_FORK_LAYERS as u64;
    let until_fold = |from: u64| {
        for i in from..from + max + 2 {
            py(&parent, "data[0] ^= 1");
            if round(i) {
                return;
            }
        }
        panic!("no fold within {} forks", max + 2);
    };
    // Warm-up: thread stacks, allocator pools, the parent's image in place.
    for i in 0..5 {
        round(i);
    }
    until_fold(0);
    std::thread::sleep(Duration::from_millis(500));
    let base = (fds(), threads(), mappings(), common::rss_kib(), live_vms(f));
    let t = Instant::now();
    for i in 0..cycles {
        round(i);
    }
    until_fold(cycles);
    std::thread::sleep(Duration::from_millis(500));
    podflare_hostd::vmm::memory::release_free_heap();
    let end = (fds(), threads(), mappings(), common::rss_kib(), live_vms(f));
    eprintln!(
        "{cycles} fork/close cycles in {:.1} s: fds {} -> {}, threads {} -> {}, mappings {:?} -> {:?}, rss KiB {} -> {}, live VMs {} -> {}",
        t.elapsed().as_secs_f64(),
        base.0,
        end.0,
        base.1,
        end.1,
        base.2,
        end.2,
        base.3,
        end.3,
        base.4,
        end.4
    );
    assert!(end.0 <= base.0, "fds leaked: {} -> {}", base.0, end.0);
    assert!(end.1 <= base.1, "threads leaked: {} -> {}", base.1, end.1);
    // The folded layer's runs may differ by a few (what the parent wrote
    // meanwhile); a leak per cycle would add hundreds.
    assert!(end.2 .0 <= base.2 .0 + 16, "mappings grew: {:?} -> {:?}", base.2, end.2);
    assert!(end.2 .1 <= base.2 .1 + 16, "fork images stay mapped after their VMs went: {:?} -> {:?}", base.2, end.2);
    assert_eq!(end.4, base.4, "places not released");
    // Each cycle maps a child's RAM; a leak of one child's pages per cycle
    // (at least 64 KiB of parent state) would add > 12 MiB over 200.
    assert!(end.3 <= base.3 + 8 * 1024, "RSS grew: {} -> {} KiB", base.3, end.3);
    assert_eq!(py(&parent, "print(len(data))"), "65536");
}

//! Benchmarks of the VMM, snapshot restore, the channel and the HTTP exec
//! path. Run through `scripts/bench` (which builds the images, installs the
//! reference QEMU and starts a hostd for the HTTP part). Prints one markdown
//! table; figures are medians of several runs within this one run.
//!
//! Env: `PODFLARE_BENCH_HTTP` (base URL of a running hostd; HTTP rows are
//! skipped without it), `PODFLARE_BENCH_COLD_BOOTS` (3), `PODFLARE_BENCH_DENSITY_MINUTES` (60: the density run's time bound), `PODFLARE_BENCH_IDLE_MAX`
//! (1100: cap on the idle-density run), `PODFLARE_BENCH_QEMU` (path of
//! scripts/qemu-boot; the QEMU figure is skipped without it), `PODFLARE_BENCH_ONLY`
//! (comma list of setup,restore,memory,throughput,ring,fork,spaces,net,http,sdk,pty,pool,idle,density,cold);
//! `PODFLARE_BENCH_NET_MIB` (16: bytes each way in the net throughput row);
//! `PODFLARE_BENCH_RING_MIB` (64: bytes each way in the ring throughput rows);
//! `PODFLARE_BENCH_SDK_PYTHON` (a Python with the `podflare` SDK: the sdk
//! rows are not measured without it);
//! `PODFLARE_BENCH_SPACE_MIB` (100: state of the sandbox in the spaces rows);
//! `PODFLARE_BENCH_FORK_MIB` (100: parent state in the fork rows),
//! `PODFLARE_BENCH_FORK_RUNS` (5: runs per fork row);
//! `PODFLARE_BENCH_IDLE_NEIGHBOURS` (200: idle sandboxes in the idle rows);
//! `PODFLARE_BENCH_THROUGHPUT_KIB` (65536: REPL stdout in the throughput row);
//! `PODFLARE_BENCH_COLD_READY_BOOTS` (as many as the cold boots; quick 0:
//! then the row comes from `PODFLARE_BENCH_LAST_FULL`, a full run's
//! samples.json, if there is one).
//!
//! `PODFLARE_BENCH_QUICK=1`: every row, with fewer samples and smaller
//! sizes (each knob's quick default is next to its full one where it is
//! read; a knob set in the environment wins in both modes). Each row's notes
//! then say how many samples it had, and the table's header says "quick".
//!
//! `PODFLARE_BENCH_OUT=DIR`: also write `DIR/samples.json`, rewritten after
//! every section: the table as printed, and every latency row's raw samples
//! in seconds with its target, for `scripts/bench-plot`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use podflare_hostd::guest::StreamRx;
use podflare_hostd::guest::{ExecChunk, Guest, GuestFactory, GuestSpec, Language};
use podflare_hostd::vmm::factory::VmFactory;
use podflare_hostd::vmm::vm::{Vm, VmSpec};
use podflare_hostd::vmm::{memory, Backend, VmmConfig};
use serde_json::{json, Value};

#[path = "vmm/fork.rs"]
mod fork;
#[path = "vmm/http.rs"]
mod http;
#[path = "vmm/memory.rs"]
mod memory_rows;
#[path = "vmm/net.rs"]
mod net;
#[path = "vmm/ring.rs"]
mod ring;
#[path = "vmm/spaces.rs"]
mod spaces;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let med = v[v.len() / 2];
    let p95 = v[((v.len() as f64 * 0.95) as usize).min(v.len() - 1)];
    (med, p95)
}

fn median(v: &[f64]) -> f64 {
    stats(v.to_vec()).0
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One run of the bench: quick or full, the table as printed so far, and the
/// raw samples of its latency rows (written for `scripts/bench-plot`).
struct Bench {
    quick: bool,
    out: Option<PathBuf>,
    /// The section running now (a `PODFLARE_BENCH_ONLY` name).
    section: &'static str,
    meta: Value,
    table: Vec<Value>,
    series: Vec<Value>,
}

impl Bench {
    fn from_env() -> Self {
        let quick = std::env::var("PODFLARE_BENCH_QUICK").is_ok_and(|v| v == "1");
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Bench {
            quick,
            out: std::env::var_os("PODFLARE_BENCH_OUT").map(PathBuf::from),
            section: "",
            meta: json!({
                "mode": if quick { "quick" } else { "full" },
                "backend": Backend::detect().name(),
                "host": podflare_hostd::vmm::snapshot::host_cpu_model(),
                "started_unix_s": started,
                "only": std::env::var("PODFLARE_BENCH_ONLY").unwrap_or_default(),
            }),
            table: Vec::new(),
            series: Vec::new(),
        }
    }

    /// A sample count: the full or the quick one.
    fn pick(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// A size or count the environment may set (`name`), else the full or
    /// quick default.
    fn knob(&self, name: &str, full: usize, quick: usize) -> usize {
        env_usize(name).unwrap_or(self.pick(full, quick))
    }

    fn print_header(&self) {
        let measured = if self.quick { "measured (median; quick: fewer samples, smaller sizes)" } else { "measured (median)" };
        println!("| what | {measured} | target | notes |");
        println!("|---|---|---|---|");
        let _ = std::io::stdout().flush();
    }

    /// Prints one table row. In quick mode the notes also say how many
    /// samples the row had (`n`; 0: not a sampled row).
    fn row(&mut self, what: &str, value: String, target: &str, note: &str, n: usize) {
        let note = match (self.quick, n) {
            (true, 1) => join_note(note, "quick: one run"),
            (true, 2..) => join_note(note, &format!("quick: {n} samples")),
            _ => note.to_string(),
        };
        println!("| {what} | {value} | {target} | {note} |");
        let _ = std::io::stdout().flush();
        self.table.push(json!({
            "section": self.section, "what": what, "measured": value, "target": target, "notes": note,
        }));
    }

    /// Keeps a latency row's samples (ms) and its target (ms), if it has one,
    /// for the plot. `panel`: "latency" (milliseconds) or "cold" (boots).
    fn samples(&mut self, row: &str, panel: &str, samples_ms: &[f64], target_ms: Option<f64>) {
        if samples_ms.is_empty() {
            return;
        }
        let secs: Vec<f64> = samples_ms.iter().map(|m| m / 1e3).collect();
        self.series.push(json!({
            "section": self.section, "row": row, "panel": panel,
            "samples_s": secs, "target_s": target_ms.filter(|t| t.is_finite()).map(|t| t / 1e3),
        }));
    }

    /// Rewrites `samples.json` (after every section, so an aborted run
    /// leaves what it measured).
    fn save(&self) {
        let Some(dir) = &self.out else { return };
        let doc = json!({ "run": self.meta, "table": self.table, "series": self.series });
        let path = dir.join("samples.json");
        let tmp = dir.join("samples.json.tmp");
        let res = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default()))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            eprintln!("bench: cannot write {}: {e}", path.display());
        }
    }
}

fn join_note(note: &str, more: &str) -> String {
    if note.is_empty() {
        more.to_string()
    } else {
        format!("{note}; {more}")
    }
}

fn wait_exit(rx: StreamRx<ExecChunk>) -> Result<(i32, usize), String> {
    let mut bytes = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(600)).map_err(|e| e.to_string())? {
            ExecChunk::Stdout(b) | ExecChunk::Stderr(b) => bytes += b.len(),
            ExecChunk::Exit(c) => return Ok((c, bytes)),
            ExecChunk::Failed(m) => return Err(m),
            ExecChunk::Started => {}
        }
    }
}

/// Runs `code` to a zero exit and returns how long it took.
fn py_ok(g: &dyn Guest, code: &str, what: &str) -> Duration {
    let t = Instant::now();
    let (status, _) = wait_exit(g.exec(Language::Python, code).expect("exec")).expect(what);
    assert_eq!(status, 0, "{what}");
    t.elapsed()
}

/// Raw KVM floor: VM, one memory slot, irqchip, one vCPU; nothing else.
fn raw_kvm_setup(kvm: &kvm_ioctls::Kvm, mem: &podflare_hostd::devices::GuestMemory) -> Duration {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let t = Instant::now();
    let vm = kvm.create_vm().expect("create_vm");
    vm.set_tss_address(0xfffb_d000).expect("tss");
    let region = mem.iter().next().expect("region");
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: `mem` outlives `vm` (dropped at the end of this function) and
    // the one slot covers exactly its single mapping.
    unsafe { vm.set_user_memory_region(slot) }.expect("slot");
    vm.create_irq_chip().expect("irqchip");
    let _vcpu = vm.create_vcpu(0).expect("vcpu");
    t.elapsed()
}

fn bench_kvm_setup(b: &mut Bench, kvm: &kvm_ioctls::Kvm, rootfs: &std::path::Path) {
    const TINY: &[u8] = &[0xf4, 0xeb, 0xfd];
    let spec = VmSpec {
        kernel: "/nonexistent".into(),
        rootfs: rootfs.to_path_buf(),
        ram_bytes: 512 << 20,
        vcpus: 1,
        backend: Backend::detect(),
        extra_cmdline: String::new(),
        disk: None,
    };
    let n = b.pick(20, 8);
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    let mem = memory::anonymous(512 << 20).expect("memory");
    for i in 0..n {
        floor.push(ms(raw_kvm_setup(kvm, &mem)));
        let t = Instant::now();
        let vm = Vm::boot_code(kvm, &format!("setup{i}"), &spec, TINY).expect("boot_code");
        ours.push(ms(t.elapsed()));
        drop(vm);
    }
    let what = "KVM setup: VM + 512 MiB memory + devices + vCPU thread running";
    b.samples(what, "latency", &ours, None);
    b.samples("raw KVM ioctl floor (VM, slot, irqchip, vCPU)", "latency", &floor, None);
    let (o, f) = (median(&ours), median(&floor));
    b.row(what, format!("{o:.2} ms"), "-", &format!("raw ioctl floor (VM, slot, irqchip, vCPU) {f:.2} ms"), n);
}

/// The console line of a guest booted with `podflare.selftest=1` once it has
/// run python, bash and the REPL (it powers off next).
const SELFTEST_DONE: &str = "podflare-selftest: done";

/// Cold boots. hostd's own figure is boot to agent ready on its channel
/// (what a template build waits for). A QEMU boot never gets there:
/// scripts/qemu-boot gives the guest no channel device, and the agent waits
/// for its port 0 before it says ready. The two VMMs are therefore compared
/// on a boot both finish: `podflare.selftest=1` (kernel boot, the agent, a
/// python and a bash run, the REPL started and driven over a socket pair,
/// then "podflare-selftest: done"), alternating hostd and QEMU.
fn bench_cold_boot(b: &mut Bench, kvm: &kvm_ioctls::Kvm, cfg: &VmmConfig) {
    let n = b.knob("PODFLARE_BENCH_COLD_BOOTS", 3, 1);
    let backend = Backend::detect();
    let spec = |extra: &str| VmSpec {
        kernel: cfg.kernel.clone(),
        rootfs: cfg.rootfs("default"),
        ram_bytes: cfg.guest_ram_mib << 20,
        vcpus: 1,
        backend,
        extra_cmdline: extra.to_string(),
        disk: None,
    };
    let what = "cold boot: VM creation to agent ready (hostd)";
    let ready_note = "agent and REPL ready on hostd's channel, what a template build waits for; a QEMU boot has no such channel, so the next row compares the two VMMs";
    // Quick mode boots once per VMM, for the comparison below; this row then
    // comes from the last full run (a third boot of over a minute here would
    // not fit a quick run's few minutes).
    let ready_boots = b.knob("PODFLARE_BENCH_COLD_READY_BOOTS", n, 0);
    let mut ready = Vec::new();
    for i in 0..ready_boots {
        match hostd_boot_to_ready(kvm, &format!("cold{i}"), &spec(""), cfg.boot_timeout) {
            Ok(d) => ready.push(ms(d)),
            Err(e) => {
                b.row(what, format!("failed: {e}"), "-", "", 0);
                break;
            }
        }
    }
    if ready_boots == 0 {
        from_last_full(b, what, "hostd: cold boot to agent ready", ready_note);
    } else if ready.len() == ready_boots {
        b.samples("hostd: cold boot to agent ready", "cold", &ready, None);
        b.row(what, format!("{:.1} s", median(&ready) / 1e3), "-", ready_note, ready_boots);
    }

    let qemu = std::env::var("PODFLARE_BENCH_QEMU").ok();
    // hostd adds podflare.pvm=1 on PVM itself; qemu-boot needs it given.
    let pvm = format!("podflare.pvm={}", u8::from(backend == Backend::Pvm));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut failed = None;
    for i in 0..n {
        match hostd_boot_to_line(kvm, &format!("selftest{i}"), &spec("podflare.selftest=1"), SELFTEST_DONE, cfg.boot_timeout) {
            Ok(d) => ours.push(ms(d)),
            Err(e) => failed = Some(format!("hostd: {e}")),
        }
        if let Some(script) = &qemu {
            match qemu_boot_to_line(script, cfg, &["podflare.selftest=1", &pvm], SELFTEST_DONE, cfg.boot_timeout) {
                Ok(d) => theirs.push(ms(d)),
                Err(e) => failed = Some(format!("QEMU: {e}")),
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let what = "cold boot, same kernel+image in hostd and QEMU: VM creation to selftest done";
    let target = "ratio <= 1.0 vs QEMU";
    if let Some(e) = failed {
        return b.row(what, format!("failed: {e}"), target, "", 0);
    }
    let (h, q) = (median(&ours), median(&theirs));
    b.samples("hostd: cold boot to selftest done", "cold", &ours, Some(q));
    b.samples("QEMU: cold boot to selftest done (same kernel+image)", "cold", &theirs, None);
    let mut guest = format!(
        "`podflare.selftest=1`: kernel boot, the agent, a python and a bash run, the REPL started and 3 execs over a socket pair; 1 vCPU, {} MiB in both; QEMU 10 -M microvm with qboot and virtio-blk (scripts/qemu-boot)",
        cfg.guest_ram_mib
    );
    if backend == Backend::Pvm {
        guest.push_str("; almost all of it is emulated guest-kernel time");
    }
    if qemu.is_none() {
        return b.row(what, format!("hostd {:.1} s, QEMU not measured", h / 1e3), target, &join_note(&guest, "PODFLARE_BENCH_QEMU unset"), n);
    }
    b.row(what, format!("hostd {:.1} s, QEMU {:.1} s: ratio {:.2}", h / 1e3, q / 1e3, h / q), target, &guest, n);
}

/// Prints the row `what` (and keeps the samples of `series`) as the last
/// full run measured them: `PODFLARE_BENCH_LAST_FULL`, that run's
/// samples.json.
fn from_last_full(b: &mut Bench, what: &str, series: &str, note: &str) {
    let path = std::env::var("PODFLARE_BENCH_LAST_FULL").ok().and_then(|p| std::fs::canonicalize(p).ok());
    let doc: Option<Value> = path.as_ref().and_then(|p| std::fs::read(p).ok()).and_then(|d| serde_json::from_slice(&d).ok());
    let find = |key: &str, name: &str, list: &str| -> Option<Value> {
        doc.as_ref()?[list].as_array()?.iter().find(|r| r[key] == name).cloned()
    };
    let Some(row) = find("what", what, "table") else {
        return b.row(what, "not measured".into(), "-", &join_note(note, "quick mode does not boot for this row, and there is no full run to show"), 0);
    };
    let run = path.as_ref().and_then(|p| p.parent()?.file_name()).map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(s) = find("row", series, "series") {
        b.series.push(json!({ "section": b.section, "row": format!("{series} (run {run})"), "panel": s["panel"], "samples_s": s["samples_s"], "target_s": s["target_s"] }));
    }
    let value = row["measured"].as_str().unwrap_or("?").to_string();
    let note = format!("{note}; from the full run {run}: quick mode does not boot for this row");
    b.row(what, value, row["target"].as_str().unwrap_or("-"), &note, 0);
}

fn console_tail(vm: &Vm) -> String {
    let text = String::from_utf8_lossy(&vm.console_log().contents()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join(" / ")
}

/// A hostd cold boot until the agent announces itself on port 0 (it does so
/// once the REPL serves port 1 too).
fn hostd_boot_to_ready(kvm: &kvm_ioctls::Kvm, name: &str, spec: &VmSpec, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let vm = Vm::boot(kvm, name, spec).map_err(|e| e.to_string())?;
    vm.channel().wait_ready(0, 0, timeout).map_err(|e| format!("{e}; console: {}", console_tail(&vm)))?;
    Ok(t.elapsed())
}

/// A hostd cold boot until `line` is on the guest's serial console. The
/// console log has no waiter to block on, so it is read every 10 ms.
fn hostd_boot_to_line(kvm: &kvm_ioctls::Kvm, name: &str, spec: &VmSpec, line: &str, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let vm = Vm::boot(kvm, name, spec).map_err(|e| e.to_string())?;
    let log = vm.console_log();
    let has_line = || String::from_utf8_lossy(&log.contents()).contains(line);
    let mut seen = None;
    loop {
        let total = log.total_written();
        if seen != Some(total) {
            seen = Some(total);
            if has_line() {
                return Ok(t.elapsed());
            }
        }
        if let Some(why) = vm.status().stopped() {
            // It may have printed the line just before it stopped.
            if has_line() {
                return Ok(t.elapsed());
            }
            return Err(format!("guest stopped ({why}) before {line:?}; console: {}", console_tail(&vm)));
        }
        if t.elapsed() > timeout {
            return Err(format!("no {line:?} within {timeout:?}; console: {}", console_tail(&vm)));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots the reference QEMU (scripts/qemu-boot) with `extra` on the guest
/// command line and returns the time until `line` is on its console. The
/// guest powers off after the line (qemu-boot then stops QEMU); on a
/// timeout the script gets SIGTERM, which it answers by stopping QEMU.
fn qemu_boot_to_line(script: &str, cfg: &VmmConfig, extra: &[&str], line: &str, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = std::process::Command::new(script)
        .arg(&cfg.kernel)
        .arg(cfg.rootfs("default"))
        .args(extra)
        .env("QEMU_MEM", cfg.guest_ram_mib.to_string())
        .env("QEMU_SMP", "1")
        .env("QEMU_TIMEOUT", (timeout.as_secs() + 60).to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{script}: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((t.elapsed(), l)).is_err() {
                break;
            }
        }
    });
    let mut deadline = t + timeout;
    let mut found = None;
    let mut tail = std::collections::VecDeque::new();
    let stopped_itself = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((at, l)) => {
                if found.is_none() && l.contains(line) {
                    found = Some(at);
                    // The guest powers off next; give QEMU a moment to go.
                    deadline = Instant::now() + Duration::from_secs(30);
                }
                tail.push_back(l);
                if tail.len() > 15 {
                    tail.pop_front();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break false,
            Err(mpsc::RecvTimeoutError::Disconnected) => break true,
        }
    };
    if !stopped_itself {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    let _ = child.wait();
    let _ = reader.join();
    found.ok_or_else(|| {
        let tail: Vec<String> = tail.into();
        format!("no {line:?} within {timeout:?}; console: {}", tail.join(" / "))
    })
}

fn bench_restore(b: &mut Bench, f: &VmFactory) {
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None };
    let n = b.pick(20, 5);
    let mut restore = Vec::new();
    let mut first = Vec::new();
    let mut private = Vec::new();
    let mut ping = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let g = f.create_running(&spec).expect("create");
        restore.push(ms(t.elapsed()));
        first.push(ms(py_ok(&g, "print(1)", "first exec")));
        for _ in 0..5 {
            let t = Instant::now();
            g.vm().channel().ping(b"x", Duration::from_secs(60)).expect("ping");
            ping.push(ms(t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
        private.push(g.private_memory_bytes() as f64 / (1 << 20) as f64);
    }
    let what = "create = snapshot restore, pool off (server side)";
    b.samples(what, "latency", &restore, Some(5.0));
    let (r, r95) = stats(restore);
    b.row(what, format!("{r:.2} ms (p95 {r95:.2})"), "<= 5 ms", "map memory file MAP_PRIVATE, restore KVM+device state, resume, queue Hello", n);
    let what = "first command after restore: `print(1)`";
    b.samples(what, "latency", &first, None);
    b.row(what, format!("{:.1} ms", median(&first)), "-", "includes the guest handling Hello (clock, entropy) first", n);
    let what = "channel round trip, tiny message (ping through the agent)";
    b.samples(what, "latency", &ping, None);
    b.row(what, format!("{:.2} ms", median(&ping)), "-", "guest kernel: interrupt, wake, read, write (emulated on PVM)", ping.len());
    let g = f.create_running(&spec).expect("create");
    let warm = warm_exec_samples(&g, b.pick(50, 15));
    let what = "warm `print(1)` through the channel, no HTTP";
    b.samples(what, "latency", &warm, None);
    let (w, w95) = stats(warm);
    b.row(what, format!("{w:.2} ms (p95 {w95:.2})"), "-", "hostd channel + guest kernel + REPL; HTTP row minus this = hostd HTTP share", b.pick(50, 15));
    b.row("host private memory per idle restored sandbox", format!("{:.1} MiB", median(&private)), "<= 10 MiB", "its own (written) pages of guest RAM after one exec, from /proc/self/pagemap", n);
}

/// Runs `code` to a zero exit; its stdout and how long the exec took.
fn py_out(g: &dyn Guest, code: &str, what: &str) -> (Duration, String) {
    let rx = g.exec(Language::Python, code).expect("exec");
    let t = Instant::now();
    let mut out = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(ExecChunk::Stdout(b)) => out.extend_from_slice(&b),
            Ok(ExecChunk::Stderr(_) | ExecChunk::Started) => {}
            Ok(ExecChunk::Exit(0)) => return (t.elapsed(), String::from_utf8_lossy(&out).into_owned()),
            Ok(ExecChunk::Exit(c)) => panic!("{what}: exit {c}"),
            Ok(ExecChunk::Failed(m)) => panic!("{what}: {m}"),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn bench_throughput(b: &mut Bench, f: &VmFactory) {
    let kib = b.knob("PODFLARE_BENCH_THROUGHPUT_KIB", 64 << 10, 256);
    let size = if kib.is_multiple_of(1024) { format!("{} MiB", kib >> 10) } else { format!("{kib} KiB") };
    let g = f.create_running(&GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None }).expect("create");
    py_ok(&g, &format!("import sys\n_b = 'x' * ({kib} << 10)\n"), "prepare");
    let t = Instant::now();
    let (code, bytes) = wait_exit(g.exec(Language::Python, "sys.stdout.write(_b)").expect("exec")).expect("exec");
    let d = t.elapsed();
    assert_eq!(code, 0);
    b.row(
        &format!("channel throughput guest -> host, {size} of REPL stdout"),
        format!("{:.1} MiB/s", bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()),
        "-",
        &format!("{:.2} MiB in {:.2} s", bytes as f64 / (1 << 20) as f64, d.as_secs_f64()),
        1,
    );
}

fn bench_pool(b: &mut Bench, cfg: &VmmConfig) {
    let what = "create from warm pool (server side)";
    let mut c = cfg.clone();
    c.pool_size = 4;
    c.templates = vec!["default".into()];
    let f = match VmFactory::open(c) {
        Ok(f) => f,
        Err(e) => return b.row(what, format!("failed: {e}"), "<= 1 ms", "", 0),
    };
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None };
    let n = b.pick(12, 5);
    let mut times = Vec::new();
    let mut first = Vec::new();
    for _ in 0..n {
        // Let the filler top the pool up (a restore and its warm-up: a
        // Hello and one exec) between creates.
        std::thread::sleep(Duration::from_millis(800));
        let t = Instant::now();
        let g = f.create(&spec).expect("create");
        times.push(ms(t.elapsed()));
        let rx = g.exec(Language::Python, "print(1)").expect("exec");
        while !matches!(rx.recv_timeout(Duration::from_secs(600)), Ok(ExecChunk::Stdout(_)) | Err(_)) {}
        first.push(ms(t.elapsed()));
        drop(g);
    }
    b.samples(what, "latency", &times, Some(1.0));
    let cap = f.capacity();
    let note = format!("pool hits {} misses {}", cap["pool_hits"], cap["pool_misses"]);
    b.row(what, format!("{:.3} ms", median(&times)), "<= 1 ms", &note, n);
    let what = "create from warm pool -> first output of `print(1)` (server side)";
    b.samples(what, "latency", &first, Some(20.0));
    b.row(what, format!("{:.2} ms", median(&first)), "<= 20 ms", "pooled VMs had their own Hello and one exec while pooled", n);
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = 100.0;
    let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (utime + stime) / tick
}

fn bench_density(b: &mut Bench, f: &VmFactory) {
    let max = b.knob("PODFLARE_BENCH_IDLE_MAX", 1100, 10);
    // Creates slow down as the count grows: the run stops at this bound
    // too, and says so, rather than run on for hours.
    let bound = Duration::from_secs(60 * b.knob("PODFLARE_BENCH_DENSITY_MINUTES", 60, 5) as u64);
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None };
    let mut live = Vec::new();
    let started = Instant::now();
    let mut refused = None;
    // Progress: the count at each whole tenth of the bound.
    let mut marks = Vec::new();
    while live.len() < max && started.elapsed() < bound {
        let tenth = (started.elapsed().as_secs_f64() / bound.as_secs_f64() * 10.0) as usize;
        if tenth >= marks.len() {
            marks.push(format!("{}@{:.0}s", live.len(), started.elapsed().as_secs_f64()));
        }
        match f.create(&spec) {
            Ok(g) => live.push(g),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(b.pick(5, 3) as u64));
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(b.pick(10, 5) as u64));
    let cpu = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    let private: u64 = live.iter().take(20).map(|g| g.private_memory_bytes()).sum();
    let per = private as f64 / live.len().clamp(1, 20) as f64 / (1 << 20) as f64;
    let stop = match refused {
        Some(r) => format!("admission refused: {r}"),
        None if live.len() >= max => format!("stopped at the bench cap {max}"),
        None => format!("stopped at the time bound ({} min, PODFLARE_BENCH_DENSITY_MINUTES)", bound.as_secs() / 60),
    };
    let note = format!(
        "{} in {:.1} s; {stop}; count over time {}; host CPU while idle {:.2} cores; {:.1} MiB private each",
        live.len(),
        took.as_secs_f64(),
        marks.join(" "),
        cpu,
        per
    );
    let note = if b.quick { join_note(&note, &format!("quick: a cap of {max}, so it says nothing of the target")) } else { note };
    b.row("idle sandboxes held at once", format!("{}", live.len()), ">= 1000", &note, 0);
}

/// `print(1)` through the channel on `g`: `n` warm runs, ms (3 more first,
/// not counted).
fn warm_exec_samples(g: &dyn Guest, n: usize) -> Vec<f64> {
    let mut v = Vec::new();
    for i in 0..n + 3 {
        let d = py_ok(g, "print(1)", "exec result");
        if i >= 3 {
            v.push(ms(d));
        }
    }
    v
}

/// The host's MemAvailable, MiB: what guests and KVM's own structures
/// (shadow page tables on PVM) take from the host together.
fn host_available_mib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Idle cost: sandboxes that ran one exec each and then nothing. Host CPU
/// per idle sandbox, a busy sandbox's `print(1)` with and without
/// `PODFLARE_BENCH_IDLE_NEIGHBOURS` (200; quick 10) idle neighbours, and host
/// memory per idle sandbox including KVM's own.
fn bench_idle(b: &mut Bench, f: &VmFactory) {
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new(), ram_mib: None, rootfs_gb: None };
    let busy = f.create_running(&spec).expect("create");
    let warm = b.pick(20, 8);
    let alone = warm_exec_samples(&busy, warm);
    let avail0 = host_available_mib();
    let mut idle = Vec::new();
    let n = b.knob("PODFLARE_BENCH_IDLE_NEIGHBOURS", 200, 10);
    for _ in 0..n {
        let g = f.create_running(&spec).expect("create");
        py_ok(&g, "print(1)", "exec result");
        idle.push(g);
    }
    // Each guest's last burst of kernel work after an exec ends within ~5 s.
    std::thread::sleep(Duration::from_secs(b.pick(10, 5) as u64));
    let per_sandbox_mib = (avail0 - host_available_mib()) / n as f64;
    let window = b.pick(20, 5);
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(window as u64));
    let cpu_ms_per_s = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64() * 1000.0;
    let crowded = warm_exec_samples(&busy, warm);
    b.row(
        "host CPU per idle sandbox",
        format!("{:.3} ms/s", cpu_ms_per_s / n as f64),
        "<= 1 ms/s",
        &format!("hostd-side CPU of {n} idle sandboxes (one exec each, then {window} s idle): {cpu_ms_per_s:.1} ms/s in all"),
        0,
    );
    let (a, c) = (median(&alone), median(&crowded));
    b.samples("`print(1)` on one sandbox alone", "latency", &alone, None);
    let what = format!("`print(1)` on one sandbox while {n} others idle");
    b.samples(&what, "latency", &crowded, Some(a * 1.2));
    b.row(&what, format!("{c:.2} ms"), "within 20% of alone", &format!("alone: {a:.2} ms; ratio {:.2}", c / a), warm);
    b.row(
        "host memory per idle sandbox, KVM's own included",
        format!("{per_sandbox_mib:.1} MiB"),
        "-",
        &format!("drop of the host's MemAvailable over {n} sandboxes"),
        0,
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // The same seccomp setting as hostd (PODFLARE_SECCOMP=0 turns filters off).
    podflare_hostd::seccomp::set_enabled(std::env::var("PODFLARE_SECCOMP").as_deref() != Ok("0"));
    // As hostd: every sandbox holds ~30 fds, the density run holds many.
    let _ = podflare_hostd::api::raise_nofile_limit();
    let cfg = VmmConfig::from_env().expect("settings");
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let mut b = Bench::from_env();
    b.print_header();
    let host = podflare_hostd::vmm::snapshot::host_cpu_model();
    b.row("backend", Backend::detect().name().to_string(), "", &format!("host: {host}"), 0);
    // PODFLARE_BENCH_ONLY=restore,http,... runs a subset (names below).
    let only = std::env::var("PODFLARE_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    let t0 = Instant::now();
    let section = |b: &mut Bench, name: &'static str, run: &mut dyn FnMut(&mut Bench)| {
        if want(name) {
            let t = Instant::now();
            b.section = name;
            run(b);
            b.save();
            eprintln!("bench: {name} took {:.1} s ({:.1} s so far)", t.elapsed().as_secs_f64(), t0.elapsed().as_secs_f64());
        }
    };
    let rootfs = cfg.rootfs("default");
    section(&mut b, "setup", &mut |b| bench_kvm_setup(b, &kvm, &rootfs));
    let mut c = cfg.clone();
    c.templates = vec!["default".into()];
    c.pool_size = 0;
    // The bench's spaces are its own (every one is resumed, so none stays).
    c.spaces_dir = std::env::temp_dir().join(format!("podflare-bench-spaces-{}", std::process::id()));
    let f = VmFactory::open(c).expect("template snapshot");
    section(&mut b, "restore", &mut |b| bench_restore(b, &f));
    section(&mut b, "memory", &mut |b| memory_rows::bench_memory(b, &f, &cfg));
    section(&mut b, "throughput", &mut |b| bench_throughput(b, &f));
    section(&mut b, "ring", &mut |b| ring::bench_ring(b, &f));
    section(&mut b, "fork", &mut |b| fork::bench_fork(b, &f));
    section(&mut b, "spaces", &mut |b| spaces::bench_spaces(b, &f));
    section(&mut b, "net", &mut |b| net::bench_net(b, &f));
    if let Ok(base) = std::env::var("PODFLARE_BENCH_HTTP") {
        section(&mut b, "http", &mut |b| http::bench_http(b, &base));
        section(&mut b, "sdk", &mut |b| ring::bench_sdk_files(b, &base));
        section(&mut b, "pty", &mut |b| http::bench_pty(b, &base));
    }
    section(&mut b, "pool", &mut |b| bench_pool(b, &cfg));
    section(&mut b, "idle", &mut |b| bench_idle(b, &f));
    section(&mut b, "density", &mut |b| bench_density(b, &f));
    section(&mut b, "cold", &mut |b| bench_cold_boot(b, &kvm, &cfg));
    b.save();
}

//! Benchmarks of the VMM, snapshot restore, the channel and the HTTP exec
//! path. Run through `scripts/bench` (which builds the images, installs the
//! reference QEMU and starts a hostd for the HTTP part). Prints one markdown
//! table; figures are medians of several runs within this one run.
//!
//! Env: `PODFLARE_BENCH_HTTP` (base URL of a running hostd; HTTP rows are
//! skipped without it), `PODFLARE_BENCH_COLD_BOOTS` (3), `PODFLARE_BENCH_IDLE_MAX`
//! (600: cap on the idle-density run), `PODFLARE_BENCH_QEMU` (path of
//! scripts/qemu-boot; the QEMU row is skipped without it), `PODFLARE_BENCH_ONLY`
//! (comma list of setup,restore,throughput,fork,http,pool,idle,density,cold);
//! `PODFLARE_BENCH_FORK_MIB` (100: parent state in the fork rows),
//! `PODFLARE_BENCH_FORK_RUNS` (5: runs per fork row);
//! `PODFLARE_BENCH_IDLE_NEIGHBOURS` (200: idle sandboxes in the idle rows).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use podflare_hostd::guest::StreamRx;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use podflare_hostd::guest::{ExecChunk, Guest, GuestFactory, GuestSpec, Language};
use podflare_hostd::vmm::factory::VmFactory;
use podflare_hostd::vmm::vm::{Vm, VmSpec};
use podflare_hostd::vmm::{memory, Backend, VmmConfig};

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

fn row(what: &str, value: String, target: &str, note: &str) {
    println!("| {what} | {value} | {target} | {note} |");
    let _ = std::io::stdout().flush();
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn wait_exit(rx: StreamRx<ExecChunk>) -> Result<(i32, usize), String> {
    let mut bytes = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(600)).map_err(|e| e.to_string())? {
            ExecChunk::Stdout(b) | ExecChunk::Stderr(b) => bytes += b.len(),
            ExecChunk::Exit(c) => return Ok((c, bytes)),
            ExecChunk::Failed(m) => return Err(m),
        }
    }
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

fn bench_kvm_setup(kvm: &kvm_ioctls::Kvm, rootfs: &std::path::Path) {
    const TINY: &[u8] = &[0xf4, 0xeb, 0xfd];
    let spec = VmSpec {
        kernel: "/nonexistent".into(),
        rootfs: rootfs.to_path_buf(),
        ram_bytes: 512 << 20,
        vcpus: 1,
        backend: Backend::detect(),
        extra_cmdline: String::new(),
    };
    let mut ours = Vec::new();
    let mut floor = Vec::new();
    let mem = memory::anonymous(512 << 20).expect("memory");
    for i in 0..20 {
        floor.push(ms(raw_kvm_setup(kvm, &mem)));
        let t = Instant::now();
        let vm = Vm::boot_code(kvm, &format!("setup{i}"), &spec, TINY).expect("boot_code");
        ours.push(ms(t.elapsed()));
        drop(vm);
    }
    let (o, _) = stats(ours);
    let (f, _) = stats(floor);
    row("KVM setup: VM + 512 MiB memory + devices + vCPU thread running", format!("{o:.2} ms"), "-", &format!("raw ioctl floor (VM, slot, irqchip, vCPU) {f:.2} ms"));
}

fn bench_cold_boot(kvm: &kvm_ioctls::Kvm, cfg: &VmmConfig) {
    let n = env_usize("PODFLARE_BENCH_COLD_BOOTS", 3);
    let spec = VmSpec {
        kernel: cfg.kernel.clone(),
        rootfs: cfg.rootfs("default"),
        ram_bytes: cfg.guest_ram_mib << 20,
        vcpus: 1,
        backend: Backend::detect(),
        extra_cmdline: String::new(),
    };
    let mut ours = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        let vm = match Vm::boot(kvm, &format!("cold{i}"), &spec) {
            Ok(vm) => vm,
            Err(e) => return row("cold boot to agent ready (hostd)", format!("failed: {e}"), "", ""),
        };
        if let Err(e) = vm.channel().wait_ready(0, 0, cfg.boot_timeout) {
            return row("cold boot to agent ready (hostd)", format!("failed: {e}"), "", "");
        }
        ours.push(ms(t.elapsed()));
    }
    let (o, _) = stats(ours);
    let qemu = std::env::var("PODFLARE_BENCH_QEMU").ok().map(|script| {
        let mut runs = Vec::new();
        for _ in 0..n {
            if let Some(d) = qemu_boot_to_ready(&script, cfg) {
                runs.push(ms(d));
            }
        }
        stats(runs).0
    });
    match qemu {
        Some(q) if q.is_finite() => row(
            "cold boot: VM creation to agent ready",
            format!("{:.1} s", o / 1e3),
            "ratio <= 1.0 vs QEMU",
            &format!("QEMU 10 microvm same kernel+image {:.1} s; ratio {:.2}; almost all of it is emulated guest-kernel time", q / 1e3, o / q),
        ),
        _ => row("cold boot: VM creation to agent ready", format!("{:.1} s", o / 1e3), "ratio <= 1.0 vs QEMU", "QEMU not measured"),
    }
}

/// Starts the reference QEMU and returns the time until the agent's
/// readiness line appears on its console.
fn qemu_boot_to_ready(script: &str, cfg: &VmmConfig) -> Option<Duration> {
    let t = Instant::now();
    let mut child = std::process::Command::new(script)
        .arg(&cfg.kernel)
        .arg(cfg.rootfs("default"))
        .env("QEMU_MEM", cfg.guest_ram_mib.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut found = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line.contains("podflare-agent: ready") {
            found = Some(t.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

fn bench_restore(f: &VmFactory) {
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new() };
    let mut restore = Vec::new();
    let mut first = Vec::new();
    let mut private = Vec::new();
    let mut ping = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let g = f.create_running(&spec).expect("create");
        restore.push(ms(t.elapsed()));
        let t = Instant::now();
        let (code, _) = wait_exit(g.exec(Language::Python, "print(1)").expect("exec")).expect("exec result");
        assert_eq!(code, 0);
        first.push(ms(t.elapsed()));
        for _ in 0..5 {
            let t = Instant::now();
            g.vm().channel().ping(b"x", Duration::from_secs(60)).expect("ping");
            ping.push(ms(t.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
        private.push(g.private_memory_bytes() as f64 / (1 << 20) as f64);
    }
    let (r, r95) = stats(restore);
    row("create = snapshot restore, pool off (server side)", format!("{r:.2} ms (p95 {r95:.2})"), "<= 5 ms", "map memory file MAP_PRIVATE, restore KVM+device state, resume, queue Hello");
    let (fm, _) = stats(first);
    row("first command after restore: `print(1)`", format!("{fm:.1} ms"), "-", "includes the guest handling Hello (clock, entropy) first");
    let (p, _) = stats(ping);
    row("channel round trip, tiny message (ping through the agent)", format!("{p:.2} ms"), "-", "guest kernel: interrupt, wake, read, write (emulated on PVM)");
    let g = f.create_running(&spec).expect("create");
    let mut warm = Vec::new();
    for i in 0..53 {
        let t = Instant::now();
        let (code, _) = wait_exit(g.exec(Language::Python, "print(1)").expect("exec")).expect("exec result");
        assert_eq!(code, 0);
        if i >= 3 {
            warm.push(ms(t.elapsed()));
        }
    }
    let (w, w95) = stats(warm);
    row("warm `print(1)` through the channel, no HTTP", format!("{w:.2} ms (p95 {w95:.2})"), "-", "hostd channel + guest kernel + REPL; HTTP row minus this = hostd HTTP share");
    let (m, _) = stats(private);
    row("host private memory per idle restored sandbox", format!("{m:.1} MiB"), "<= 10 MiB", "Private_Dirty of its guest-memory mapping after one exec");
}

/// fork(n) of a sandbox holding `PODFLARE_BENCH_FORK_MIB` (100) MiB of
/// non-zero Python state made in user space, `PODFLARE_BENCH_FORK_RUNS` (5)
/// runs per n; server-side figures from the factory.
fn bench_fork(f: &VmFactory) {
    let mib = env_usize("PODFLARE_BENCH_FORK_MIB", 100);
    let runs = env_usize("PODFLARE_BENCH_FORK_RUNS", 5);
    let spec = |id: String| GuestSpec { template: "default".into(), egress: true, sandbox_id: id };
    let parent = f.create_running(&spec("sbx_bench_parent".into())).expect("create");
    let t = Instant::now();
    // 1 MiB at a time: one randbytes of the whole would touch twice the
    // memory (an int, then the bytes), and every first touch is a slow
    // emulated page fault here.
    let code = format!("import random\nstate = [random.randbytes(1 << 20) for _ in range({mib})]\nNone");
    let (code, _) = wait_exit(parent.exec(Language::Python, &code).expect("exec")).expect("parent state");
    assert_eq!(code, 0);
    eprintln!("fork bench: parent holds {mib} MiB after {:.1} s", t.elapsed().as_secs_f64());
    let specs = |n: usize| (0..n).map(|i| spec(format!("sbx_bench_child{i}"))).collect::<Vec<_>>();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    // The first fork copies every page the parent wrote since its template.
    let (kids, first) = parent.fork_running(&specs(5)).expect("fork");
    drop(kids);
    row(
        &format!("first fork(5) of a sandbox holding {mib} MiB (server side, one run)"),
        format!("{:.1} ms", ms(first.total)),
        "<= 25 ms (goal 10)",
        &format!(
            "copies its own pages into an image layer ({:.1} MiB non-zero, {} runs); parent paused {:.1} ms",
            mb(first.image_bytes),
            first.image_runs,
            ms(first.parent_paused)
        ),
    );
    // Later forks copy only what the parent wrote since its previous one
    // (a step of its own first, as in a tree search); every
    // MAX_FORK_LAYERS-th folds its layers into one, a full copy again.
    let step = "step = globals().get('step', 0) + 1\nNone";
    let (mut paused5, mut copied5, mut folds) = (Vec::new(), Vec::new(), Vec::new());
    for n in [1usize, 5, 32] {
        let mut total = Vec::new();
        for _ in 0..runs {
            let (code, _) = wait_exit(parent.exec(Language::Python, step).expect("exec")).expect("step");
            assert_eq!(code, 0);
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
        let (med, _) = stats(total);
        let target = if n == 5 { "<= 25 ms (goal 10)" } else { "-" };
        row(
            &format!("fork({n}) of that sandbox after a step of its own (server side)"),
            format!("{med:.1} ms"),
            target,
            "copies what it wrote since its last fork into a new layer, remaps it, restores n children, Hello",
        );
    }
    let (p, _) = stats(paused5);
    let (c, _) = stats(copied5);
    row("parent paused during those fork(5)", format!("{p:.1} ms"), "<= 10 ms", &format!("new layer {c:.2} MiB of non-zero pages"));
    for fig in folds.iter().take(2) {
        row(
            &format!("a fork that folds {} layers into one", podflare_hostd::vmm::vm::MAX_FORK_LAYERS),
            format!("{:.1} ms", ms(fig.total)),
            "-",
            &format!("full copy again ({:.1} MiB); parent paused {:.1} ms", mb(fig.image_bytes), ms(fig.parent_paused)),
        );
    }
    let mut after_fork = Vec::new();
    let mut after_write = Vec::new();
    let mut first_exec = Vec::new();
    for _ in 0..runs {
        let (kids, _) = parent.fork_running(&specs(1)).expect("fork");
        let child = &kids[0];
        after_fork.push(child.private_memory_bytes() as f64 / (1 << 20) as f64);
        let t = Instant::now();
        let (code, _) = wait_exit(child.exec(Language::Python, "print(1)").expect("exec")).expect("first exec");
        assert_eq!(code, 0);
        first_exec.push(ms(t.elapsed()));
        let (code, _) = wait_exit(child.exec(Language::Python, "extra = random.randbytes(1 << 20)\nNone").expect("exec"))
            .expect("write");
        assert_eq!(code, 0);
        after_write.push(child.private_memory_bytes() as f64 / (1 << 20) as f64);
    }
    let (a, _) = stats(after_fork);
    row("host memory of a child right after fork", format!("{a:.2} MiB"), "<= 2 MiB", "Private_Dirty of its guest RAM; image pages stay shared with the parent");
    let (w, _) = stats(after_write);
    row("host memory of a child after it writes 1 MiB", format!("{w:.2} MiB"), "-", "`extra = random.randbytes(1 << 20)` (its pages plus what the REPL touched)");
    let (e, _) = stats(first_exec);
    row("first exec in a child: `print(1)`", format!("{e:.1} ms"), "-", "includes the child handling Hello (clock, entropy)");
}

fn bench_throughput(f: &VmFactory) {
    let g = f.create_running(&GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new() }).expect("create");
    let code = "import sys\n_b = 'x' * (64 << 20)\n";
    wait_exit(g.exec(Language::Python, code).expect("exec")).expect("prepare");
    let t = Instant::now();
    let (code, bytes) = wait_exit(g.exec(Language::Python, "sys.stdout.write(_b)").expect("exec")).expect("exec");
    let d = t.elapsed();
    assert_eq!(code, 0);
    row(
        "channel throughput guest -> host, 64 MiB of REPL stdout",
        format!("{:.1} MiB/s", bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()),
        "-",
        &format!("{} MiB in {:.2} s", bytes >> 20, d.as_secs_f64()),
    );
}

fn bench_pool(cfg: &VmmConfig) {
    let mut c = cfg.clone();
    c.pool_size = 4;
    c.templates = vec!["default".into()];
    let f = match VmFactory::open(c) {
        Ok(f) => f,
        Err(e) => return row("create from warm pool", format!("failed: {e}"), "", ""),
    };
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new() };
    let mut times = Vec::new();
    for _ in 0..12 {
        // Let the filler top the pool up between creates.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let g = f.create(&spec).expect("create");
        times.push(ms(t.elapsed()));
        drop(g);
    }
    let (m, _) = stats(times);
    let cap = f.capacity();
    row("create from warm pool (server side)", format!("{m:.3} ms"), "<= 1 ms", &format!("pool hits {} misses {}", cap["pool_hits"], cap["pool_misses"]));
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

fn bench_density(f: &VmFactory) {
    let max = env_usize("PODFLARE_BENCH_IDLE_MAX", 600);
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new() };
    let mut live = Vec::new();
    let started = Instant::now();
    let mut refused = None;
    while live.len() < max {
        match f.create(&spec) {
            Ok(g) => live.push(g),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let cpu = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    let private: u64 = live.iter().take(20).map(|g| g.private_memory_bytes()).sum();
    let per = private as f64 / live.len().clamp(1, 20) as f64 / (1 << 20) as f64;
    row(
        "idle sandboxes held at once",
        format!("{}", live.len()),
        ">= 500",
        &format!(
            "{} in {:.1} s; {}; host CPU while idle {:.2} cores; {:.1} MiB private each",
            live.len(),
            took.as_secs_f64(),
            refused.map(|r| format!("admission refused: {r}")).unwrap_or_else(|| format!("stopped at the bench cap {max}")),
            cpu,
            per
        ),
    );
}

/// Median `print(1)` through the channel on `g`, over `n` warm runs.
fn warm_exec_ms(g: &dyn Guest, n: usize) -> f64 {
    let mut v = Vec::new();
    for i in 0..n + 3 {
        let t = Instant::now();
        let (code, _) = wait_exit(g.exec(Language::Python, "print(1)").expect("exec")).expect("exec result");
        assert_eq!(code, 0);
        if i >= 3 {
            v.push(ms(t.elapsed()));
        }
    }
    stats(v).0
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
/// per idle sandbox, a busy sandbox's `print(1)` with and without 200 idle
/// neighbours, and host memory per idle sandbox including KVM's own.
fn bench_idle(f: &VmFactory) {
    let spec = GuestSpec { template: "default".into(), egress: true, sandbox_id: String::new() };
    let busy = f.create_running(&spec).expect("create");
    let alone = warm_exec_ms(&busy, 20);
    let avail0 = host_available_mib();
    let mut idle = Vec::new();
    let n = env_usize("PODFLARE_BENCH_IDLE_NEIGHBOURS", 200);
    for _ in 0..n {
        let g = f.create_running(&spec).expect("create");
        let (code, _) = wait_exit(g.exec(Language::Python, "print(1)").expect("exec")).expect("exec result");
        assert_eq!(code, 0);
        idle.push(g);
    }
    // Each guest's last burst of kernel work after an exec ends within ~5 s.
    std::thread::sleep(Duration::from_secs(10));
    let per_sandbox_mib = (avail0 - host_available_mib()) / n as f64;
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let cpu_ms_per_s = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64() * 1000.0;
    let crowded = warm_exec_ms(&busy, 20);
    row(
        "host CPU per idle sandbox",
        format!("{:.3} ms/s", cpu_ms_per_s / n as f64),
        "<= 1 ms/s",
        &format!("hostd-side CPU of {n} idle sandboxes (one exec each, then 20 s idle): {cpu_ms_per_s:.1} ms/s in all"),
    );
    row(
        &format!("`print(1)` on one sandbox while {n} others idle"),
        format!("{crowded:.2} ms"),
        "within 20% of alone",
        &format!("alone: {alone:.2} ms; ratio {:.2}", crowded / alone),
    );
    row(
        "host memory per idle sandbox, KVM's own included",
        format!("{per_sandbox_mib:.1} MiB"),
        "-",
        &format!("drop of the host's MemAvailable over {n} sandboxes"),
    );
}

/// One `print(1)` through HTTP on a kept-alive connection.
struct HttpClient {
    stream: BufReader<TcpStream>,
    host: String,
}

impl HttpClient {
    fn connect(base: &str) -> std::io::Result<Self> {
        let host = base.trim_start_matches("http://").trim_end_matches('/').to_string();
        let s = TcpStream::connect(&host)?;
        s.set_nodelay(true)?;
        Ok(HttpClient { stream: BufReader::new(s), host })
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes())?;
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line)?;
        let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut chunked = false;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                self.stream.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(len, 0);
            self.stream.read_exact(&mut body)?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn http_exec_series(base: &str, n: usize) -> Result<Vec<f64>, String> {
    let mut c = HttpClient::connect(base).map_err(|e| e.to_string())?;
    let (st, body) = c.request("POST", "/v1/sandboxes", "{}").map_err(|e| e.to_string())?;
    if st != 200 {
        return Err(format!("create: {st} {body}"));
    }
    let id = body.split('"').nth(3).unwrap_or("").to_string();
    let mut times = Vec::new();
    for i in 0..n + 3 {
        let t = Instant::now();
        let (st, body) = c
            .request("POST", &format!("/v1/sandboxes/{id}/exec"), r#"{"code":"print(1)"}"#)
            .map_err(|e| e.to_string())?;
        if st != 200 || !body.contains(r#""type":"exit","data":0"#) {
            return Err(format!("exec: {st} {body}"));
        }
        if i >= 3 {
            times.push(ms(t.elapsed()));
        }
    }
    let _ = c.request("DELETE", &format!("/v1/sandboxes/{id}"), "");
    Ok(times)
}

fn bench_http(base: &str) {
    match http_exec_series(base, 100) {
        Ok(t) => {
            let (m, p) = stats(t);
            row("`print(1)` exec round trip over HTTP, 1 client", format!("{m:.2} ms (p95 {p:.2})"), "<= 2 ms", "loopback, kept-alive connection, warm sandbox");
        }
        Err(e) => row("`print(1)` exec round trip over HTTP, 1 client", format!("failed: {e}"), "<= 2 ms", ""),
    }
    let handles: Vec<_> = (0..8).map(|_| {
        let b = base.to_string();
        std::thread::spawn(move || http_exec_series(&b, 40))
    }).collect();
    let mut all = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => all.extend(t),
            Ok(Err(e)) => return row("`print(1)` over HTTP, 8 clients on 8 sandboxes", format!("failed: {e}"), "", ""),
            Err(_) => return,
        }
    }
    let (m, p) = stats(all);
    row("`print(1)` over HTTP, 8 clients on 8 sandboxes", format!("{m:.2} ms (p95 {p:.2})"), "-", "2 host cores shared by 8 guests");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // The same seccomp setting as hostd (PODFLARE_SECCOMP=0 turns filters off).
    podflare_hostd::seccomp::set_enabled(std::env::var("PODFLARE_SECCOMP").as_deref() != Ok("0"));
    let cfg = VmmConfig::from_env().expect("settings");
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    println!("| what | measured (median) | target | notes |");
    println!("|---|---|---|---|");
    println!("| backend | {} | | host: {} |", Backend::detect().name(), podflare_hostd::vmm::snapshot::host_cpu_model());
    // PODFLARE_BENCH_ONLY=restore,http,... runs a subset (names below).
    let only = std::env::var("PODFLARE_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    let rootfs = cfg.rootfs("default");
    if want("setup") {
        bench_kvm_setup(&kvm, &rootfs);
    }
    let mut c = cfg.clone();
    c.templates = vec!["default".into()];
    c.pool_size = 0;
    let f = VmFactory::open(c).expect("template snapshot");
    if want("restore") {
        bench_restore(&f);
    }
    if want("throughput") {
        bench_throughput(&f);
    }
    if want("fork") {
        bench_fork(&f);
    }
    if let (true, Ok(base)) = (want("http"), std::env::var("PODFLARE_BENCH_HTTP")) {
        bench_http(&base);
    }
    if want("pool") {
        bench_pool(&cfg);
    }
    if want("idle") {
        bench_idle(&f);
    }
    if want("density") {
        bench_density(&f);
    }
    if want("cold") {
        bench_cold_boot(&kvm, &cfg);
    }
}

//! Templates: one snapshot per template (built by booting once), restored for
//! every create; the optional warm pool; admission control. This is the
//! [`GuestFactory`] the sandbox manager uses.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use sha2::{Digest, Sha256};

use super::snapshot::{self, SnapshotFile, SnapshotMeta};
use super::vm::{self, Vm, VmSpec};
use super::{memory, Backend, VmmConfig, VmmError};
use crate::guest::{ExecChunk, Guest, GuestError, GuestFactory, GuestSpec, Language, StreamRx};

/// Host memory set aside per new sandbox when deciding admission.
const ADMISSION_RESERVE_MIB: u64 = 64;

/// Python run in a template before its snapshot, so every sandbox starts with
/// these modules imported.
fn warmup_code(template: &str) -> &'static str {
    match template {
        "python-datasci" => "import numpy, pandas, scipy, matplotlib\n",
        _ => "import json, base64, hashlib, random, os, sys\n",
    }
}

fn log(msg: &str) {
    eprintln!("podflare-hostd: {msg}");
}

struct Template {
    name: String,
    rootfs: PathBuf,
    /// The image the snapshot was taken with, held open: a rebuild of the
    /// image (a new file behind the same `current` link) must not change
    /// what running and future sandboxes of this snapshot read.
    rootfs_file: File,
    /// The snapshot's memory file, held open for the same reason: restores
    /// keep working if a newer snapshot replaces this one on disk.
    memory_file: File,
    snap: SnapshotFile,
}

#[derive(Default)]
struct Counters {
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
    created: AtomicU64,
    live: AtomicUsize,
    restore_ns_total: AtomicU64,
}

struct Pool {
    ready: Mutex<HashMap<String, Vec<Vm>>>,
    wake: Condvar,
}

struct Inner {
    kvm: Kvm,
    cfg: VmmConfig,
    backend: Backend,
    templates: HashMap<String, Template>,
    counters: Counters,
    pool: Pool,
    next_vm: AtomicU64,
}

/// Restores guests from template snapshots.
pub struct VmFactory {
    inner: Arc<Inner>,
}

fn file_identity(path: &Path) -> Result<String, VmmError> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| VmmError::File { path: path.display().to_string(), source: e })?;
    let meta = std::fs::metadata(&real)
        .map_err(|e| VmmError::File { path: real.display().to_string(), source: e })?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok(format!("{}:{}:{}", real.display(), meta.len(), mtime.map(|d| d.as_secs()).unwrap_or(0)))
}

impl VmFactory {
    /// Opens KVM, and loads or builds every configured template's snapshot.
    pub fn open(cfg: VmmConfig) -> Result<VmFactory, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let backend = Backend::detect();
        log(&format!("KVM backend: {} ({})", backend.name(), match backend {
            Backend::Pvm => "kvm_pvm loaded: guest kernel is emulated, PVM guest settings applied",
            Backend::Hardware => "hardware virtualization",
        }));
        if !cfg.kernel.is_file() {
            return Err(VmmError::File {
                path: cfg.kernel.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "guest kernel not found; run scripts/setup or set PODFLARE_KERNEL"),
            });
        }
        // Templates build in parallel: each cold boot keeps one vCPU busy.
        let built: Vec<Result<Template, VmmError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = cfg
                .templates
                .iter()
                .map(|name| {
                    let (kvm, cfg) = (&kvm, &cfg);
                    scope.spawn(move || prepare_template(kvm, cfg, backend, name))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(VmmError::Guest("template preparation panicked".into()))))
                .collect()
        });
        let mut templates = HashMap::new();
        for t in built {
            let t = t?;
            templates.insert(t.name.clone(), t);
        }
        let inner = Arc::new(Inner {
            kvm,
            cfg,
            backend,
            templates,
            counters: Counters::default(),
            pool: Pool { ready: Mutex::new(HashMap::new()), wake: Condvar::new() },
            next_vm: AtomicU64::new(1),
        });
        if inner.cfg.pool_size > 0 {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("pool-filler".into())
                .spawn(move || pool_filler(weak))
                .map_err(VmmError::Io)?;
        }
        Ok(VmFactory { inner })
    }

    /// Restores one VM of `template` and hands it a fresh clock and entropy.
    pub fn restore_vm(&self, template: &str) -> Result<Vm, VmmError> {
        self.inner.restore(template)
    }

    /// The backend found at start.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// The KVM handle VMs are created with.
    pub fn kvm(&self) -> &Kvm {
        &self.inner.kvm
    }

    /// A template's base image and the metadata its snapshots carry.
    pub fn template_meta(&self, name: &str) -> Option<(PathBuf, SnapshotMeta)> {
        self.inner.templates.get(name).map(|t| (t.rootfs.clone(), t.snap.meta.clone()))
    }

    /// Creates a guest and returns it with its concrete type, so tests and
    /// benchmarks can reach the VM underneath.
    pub fn create_running(&self, spec: &GuestSpec) -> Result<RunningGuest, GuestError> {
        self.create_inner(spec)
    }
}

impl Inner {
    fn restore(&self, template: &str) -> Result<Vm, VmmError> {
        let t = self
            .templates
            .get(template)
            .ok_or_else(|| VmmError::Config(format!("unknown template {template:?}")))?;
        let started = Instant::now();
        let file = t.memory_file.try_clone().map_err(VmmError::Io)?;
        let mem = memory::private_file_mapping(file, t.snap.meta.ram_bytes)?;
        let n = self.next_vm.fetch_add(1, Ordering::Relaxed);
        let rootfs = t.rootfs_file.try_clone().map_err(VmmError::Io)?;
        let vm = Vm::restore(&self.kvm, &format!("vm{n}"), rootfs, mem, &t.snap.machine)?;
        vm.resume()?;
        self.counters.restore_ns_total.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(vm)
    }

    fn admit(&self) -> Result<(), GuestError> {
        let live = self.counters.live.load(Ordering::Relaxed);
        if live >= self.cfg.max_sandboxes {
            return Err(GuestError::Capacity(format!(
                "{live} sandboxes running, the limit is {} (PODFLARE_MAX_SANDBOXES)",
                self.cfg.max_sandboxes
            )));
        }
        let (total, avail) = host_meminfo_mib();
        let used = total.saturating_sub(avail);
        if used + ADMISSION_RESERVE_MIB > self.cfg.max_guest_memory_mib {
            return Err(GuestError::Capacity(format!(
                "host memory in use is {used} MiB; admitting another sandbox would pass the {} MiB limit (PODFLARE_MAX_GUEST_MEMORY_MIB)",
                self.cfg.max_guest_memory_mib
            )));
        }
        Ok(())
    }
}

fn host_meminfo_mib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn pool_filler(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(me) = inner.upgrade() else { return };
        let mut need = None;
        {
            let ready = me.pool.ready.lock().unwrap_or_else(|p| p.into_inner());
            for name in me.templates.keys() {
                if ready.get(name).map(|v| v.len()).unwrap_or(0) < me.cfg.pool_size {
                    need = Some(name.clone());
                    break;
                }
            }
            if need.is_none() {
                let _ = me.pool.wake.wait_timeout(ready, Duration::from_millis(500));
            }
        }
        if let Some(name) = need {
            if me.admit().is_err() {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            match me.restore(&name) {
                Ok(vm) => me
                    .pool
                    .ready
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(name)
                    .or_default()
                    .push(vm),
                Err(e) => {
                    log(&format!("warm pool: restoring {name} failed: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

fn snapshot_key(cfg: &VmmConfig, backend: Backend, name: &str, kernel_id: &str, rootfs_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        &snapshot::FORMAT_VERSION.to_string(),
        backend.name(),
        name,
        kernel_id,
        rootfs_id,
        &cfg.guest_ram_mib.to_string(),
        &cfg.guest_vcpus.to_string(),
        warmup_code(name),
        &vm::kernel_cmdline(backend, ""),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn prepare_template(kvm: &Kvm, cfg: &VmmConfig, backend: Backend, name: &str) -> Result<Template, VmmError> {
    let link = cfg.rootfs(name);
    let rootfs = std::fs::canonicalize(&link).map_err(|_| VmmError::File {
        path: link.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("base image of template {name:?} not found; run scripts/setup")),
    })?;
    let rootfs_file = vm::open_rootfs(&rootfs)?;
    let kernel_id = file_identity(&cfg.kernel)?;
    let rootfs_id = file_identity(&rootfs)?;
    let key = snapshot_key(cfg, backend, name, &kernel_id, &rootfs_id);
    let dir = cfg.cache_dir.join("snapshots").join(name).join(&key);
    let expect = SnapshotMeta {
        backend,
        cpu_model: snapshot::host_cpu_model(),
        kernel_id,
        rootfs_id,
        ram_bytes: cfg.guest_ram_mib << 20,
        taken_unix: 0,
    };
    let state_path = dir.join("state");
    let memory_path = dir.join("memory");
    // Several processes (hostd, test binaries) may start at once: one builds,
    // the others wait here and then find the snapshot ready.
    let _lock = lock_dir(dir.parent().unwrap_or(&cfg.cache_dir))?;
    if state_path.exists() {
        match snapshot::read_state(&state_path, &expect) {
            Ok(snap) if memory_path.metadata().map(|m| m.len()).ok() == Some(expect.ram_bytes) => {
                log(&format!("template {name}: using snapshot {}", dir.display()));
                let memory_file = open_file(&memory_path)?;
                return Ok(Template { name: name.into(), rootfs, rootfs_file, memory_file, snap });
            }
            Ok(_) => log(&format!("template {name}: snapshot memory file is missing or the wrong size; rebuilding")),
            Err(e) => log(&format!("template {name}: refusing snapshot: {e}; rebuilding")),
        }
    }
    let snap = build_snapshot(kvm, cfg, backend, name, &rootfs, &dir, expect)?;
    let memory_file = open_file(&memory_path)?;
    remove_stale_snapshots(&dir);
    Ok(Template { name: name.into(), rootfs, rootfs_file, memory_file, snap })
}

fn open_file(path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })
}

/// Deletes the template's other snapshot directories (older kernels, images
/// or settings). Processes still using one hold its files open, so removing
/// the names is safe for them.
fn remove_stale_snapshots(current: &Path) {
    let Some(parent) = current.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p != current && p.is_dir() {
            log(&format!("removing stale snapshot {}", p.display()));
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// Takes an exclusive `flock` on `<dir>/.lock`, held until dropped.
fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<File>, VmmError> {
    std::fs::create_dir_all(dir).map_err(|e| VmmError::File { path: dir.display().to_string(), source: e })?;
    let path = dir.join(".lock");
    let f = File::create(&path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| VmmError::File {
        path: path.display().to_string(),
        source: std::io::Error::from(errno),
    })
}

fn wait_exec_ok(rx: StreamRx<ExecChunk>, timeout: Duration, what: &str) -> Result<(), VmmError> {
    let deadline = Instant::now() + timeout;
    let mut err = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ExecChunk::Exit(0)) => return Ok(()),
            Ok(ExecChunk::Exit(code)) => {
                return Err(VmmError::Guest(format!("{what} exited {code}: {}", String::from_utf8_lossy(&err))))
            }
            Ok(ExecChunk::Failed(m)) => return Err(VmmError::Guest(format!("{what}: {m}"))),
            Ok(ExecChunk::Stderr(b)) => err.extend_from_slice(&b),
            Ok(ExecChunk::Stdout(_)) => {}
            Err(_) => return Err(VmmError::Guest(format!("{what} did not finish within {timeout:?}"))),
        }
    }
}

/// Boots the template once, warms it, and writes its snapshot.
pub fn build_snapshot(
    kvm: &Kvm,
    cfg: &VmmConfig,
    backend: Backend,
    name: &str,
    rootfs: &Path,
    dir: &Path,
    meta: SnapshotMeta,
) -> Result<SnapshotFile, VmmError> {
    let started = Instant::now();
    log(&format!("template {name}: booting to build its snapshot (guest wait up to {:?})", cfg.boot_timeout));
    let spec = VmSpec {
        kernel: cfg.kernel.clone(),
        rootfs: rootfs.to_path_buf(),
        ram_bytes: meta.ram_bytes,
        vcpus: cfg.guest_vcpus,
        backend,
        extra_cmdline: String::new(),
    };
    let vm = Vm::boot(kvm, &format!("tmpl-{name}"), &spec)?;
    let ch = vm.channel().clone();
    let fail = |what: String| {
        let tail = String::from_utf8_lossy(&vm.console_log().contents()).into_owned();
        let tail: String = tail.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect();
        VmmError::Guest(format!("template {name}: {what}\n--- guest console (tail) ---\n{tail}"))
    };
    for port in 0..super::channel::PORTS {
        ch.wait_ready(port, 0, cfg.boot_timeout).map_err(|e| fail(format!("port {port} not ready: {e}")))?;
    }
    log(&format!("template {name}: agent and REPL ready after {:.1}s", started.elapsed().as_secs_f64()));
    let seen = [ch.ready_count(0), ch.ready_count(1)];
    ch.send_hello().map_err(|e| fail(e.to_string()))?;
    for (port, s) in seen.iter().enumerate() {
        ch.wait_ready(port, *s, cfg.boot_timeout).map_err(|e| fail(format!("hello on port {port}: {e}")))?;
    }
    let rx = ch.exec(Language::Python, warmup_code(name)).map_err(|e| fail(e.to_string()))?;
    wait_exec_ok(rx, cfg.boot_timeout, "warm-up").map_err(|e| fail(e.to_string()))?;
    log(&format!("template {name}: warm-up done after {:.1}s", started.elapsed().as_secs_f64()));

    let snap = save_vm(&vm, dir, meta)?;
    drop(vm);
    log(&format!(
        "template {name}: snapshot written to {} in {:.1}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(snap)
}

/// Pauses `vm`, writes its snapshot (state + sparse memory) to `dir`
/// atomically, and leaves the VM paused. Used for templates and for
/// snapshots of running sandboxes.
pub fn save_vm(vm: &Vm, dir: &Path, mut meta: SnapshotMeta) -> Result<SnapshotFile, VmmError> {
    vm.pause()?;
    let machine = vm.save_state()?;
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| VmmError::File { path: tmp.display().to_string(), source: e })?;
    memory::write_sparse(vm.memory(), &tmp.join("memory"))?;
    meta.taken_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    meta.ram_bytes = memory::ram_bytes(vm.memory());
    let snap = SnapshotFile { meta, machine };
    snapshot::write_state(&tmp.join("state"), &snap)?;
    let _ = std::fs::remove_dir_all(dir);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| VmmError::File { path: parent.display().to_string(), source: e })?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| VmmError::File { path: dir.display().to_string(), source: e })?;
    Ok(snap)
}

/// Restores a VM from a snapshot directory written by [`save_vm`] and
/// resumes it. The memory file is mapped private: nothing is copied.
pub fn restore_vm_from(kvm: &Kvm, name: &str, rootfs: &Path, dir: &Path, expect: &SnapshotMeta) -> Result<Vm, VmmError> {
    let snap = snapshot::read_state(&dir.join("state"), expect)?;
    let path = dir.join("memory");
    let file = File::open(&path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })?;
    let mem = memory::private_file_mapping(file, snap.meta.ram_bytes)?;
    let vm = Vm::restore(kvm, name, vm::open_rootfs(rootfs)?, mem, &snap.machine)?;
    vm.resume()?;
    Ok(vm)
}

/// A sandbox's VM, as the sandbox manager sees it.
pub struct RunningGuest {
    vm: Vm,
    inner: Arc<Inner>,
}

impl Guest for RunningGuest {
    fn exec(&self, language: Language, code: &str) -> Result<StreamRx<ExecChunk>, GuestError> {
        if let Some(why) = self.vm.status().stopped() {
            return Err(GuestError::Failed(why));
        }
        self.vm.channel().exec(language, code).map_err(|e| GuestError::Failed(e.to_string()))
    }

    fn private_memory_bytes(&self) -> u64 {
        memory::private_bytes(self.vm.memory())
    }
}

impl RunningGuest {
    /// The VM (benchmarks and tests look at its channel and console).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.inner.counters.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl GuestFactory for VmFactory {
    fn templates(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.templates.keys().cloned().collect();
        v.sort();
        v
    }

    fn create(&self, spec: &GuestSpec) -> Result<Box<dyn Guest>, GuestError> {
        Ok(Box::new(self.create_inner(spec)?))
    }

    fn capacity(&self) -> serde_json::Value {
        self.capacity_json()
    }
}

impl VmFactory {
    fn create_inner(&self, spec: &GuestSpec) -> Result<RunningGuest, GuestError> {
        let inner = &self.inner;
        if !inner.templates.contains_key(&spec.template) {
            return Err(GuestError::UnknownTemplate(spec.template.clone()));
        }
        inner.admit()?;
        let pooled = {
            let mut ready = inner.pool.ready.lock().unwrap_or_else(|p| p.into_inner());
            ready.get_mut(&spec.template).and_then(|v| v.pop())
        };
        let vm = match pooled {
            Some(vm) => {
                inner.counters.pool_hits.fetch_add(1, Ordering::Relaxed);
                inner.pool.wake.notify_all();
                vm
            }
            None => {
                if inner.cfg.pool_size > 0 {
                    inner.counters.pool_misses.fetch_add(1, Ordering::Relaxed);
                }
                inner.restore(&spec.template).map_err(|e| {
                    log(&format!("restore of {} failed: {e}", spec.template));
                    GuestError::Internal(e.to_string())
                })?
            }
        };
        // Fresh clock and entropy for this copy, queued ahead of any exec.
        vm.channel().send_hello().map_err(|e| GuestError::Failed(e.to_string()))?;
        inner.counters.live.fetch_add(1, Ordering::Relaxed);
        inner.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(RunningGuest { vm, inner: inner.clone() })
    }

    fn capacity_json(&self) -> serde_json::Value {
        let inner = &self.inner;
        let c = &inner.counters;
        let (total, avail) = host_meminfo_mib();
        let pool = inner.pool.ready.lock().unwrap_or_else(|p| p.into_inner());
        let templates: serde_json::Map<String, serde_json::Value> = inner
            .templates
            .values()
            .map(|t| {
                (
                    t.name.clone(),
                    serde_json::json!({
                        "pool_ready": pool.get(&t.name).map(|v| v.len()).unwrap_or(0),
                        "pool_target": inner.cfg.pool_size,
                        "snapshot_taken_unix": t.snap.meta.taken_unix,
                    }),
                )
            })
            .collect();
        let created = c.created.load(Ordering::Relaxed);
        serde_json::json!({
            "backend": inner.backend.name(),
            "templates": templates,
            "pool_hits": c.pool_hits.load(Ordering::Relaxed),
            "pool_misses": c.pool_misses.load(Ordering::Relaxed),
            "live_vms": c.live.load(Ordering::Relaxed),
            "created_total": created,
            "max_sandboxes": inner.cfg.max_sandboxes,
            "guest_ram_mib": inner.cfg.guest_ram_mib,
            "host_memory_total_mib": total,
            "host_memory_available_mib": avail,
            "memory_limit_mib": inner.cfg.max_guest_memory_mib,
        })
    }
}

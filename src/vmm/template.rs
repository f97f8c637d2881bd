//! Templates: one snapshot per template, built by booting it once (kernel,
//! agent, REPL, warm-up imports) and cached under the cache directory by a
//! key over everything the guest state depends on.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::memory;
use super::scratch;
use super::snapshot::{self, SnapshotFile, SnapshotMeta};
use super::vm::{self, Vm, VmSpec};
use super::{persist, Backend, VmmConfig, VmmError};
use crate::guest::{ExecChunk, Language, StreamRx};
use crate::obs::Logger;

/// Seconds since `t`, one decimal, for log fields.
fn secs(t: Instant) -> serde_json::Value {
    json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0)
}

/// The guest kernel's first TCP connect costs ~6 s of emulated work on PVM
/// (its lazy set-up of the TCP tables), every later one ~35 ms: one to a
/// closed loopback port before the snapshot spares every sandbox that.
macro_rules! first_connect {
    () => {
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=60).close()\nexcept OSError:\n    pass\n"
    };
}

/// Python run in a template before its snapshot, so every sandbox starts with
/// these modules imported (and the kernel's first connect done).
fn warmup_code(template: &str) -> &'static str {
    match template {
        // Also the first matrix product (OpenBLAS maps its buffers then), a
        // reduction and a frame: their first-touch pages go into the snapshot.
        "python-datasci" => concat!(
            first_connect!(),
            "import numpy, pandas, scipy, matplotlib\n\
            _a = numpy.random.rand(512, 512)\n_a @ _a\nnumpy.ones((1000, 1000)).sum()\n\
            pandas.DataFrame(numpy.random.rand(2000, 10)).describe()\ndel _a\n"
        ),
        _ => concat!(first_connect!(), "import json, base64, hashlib, random, os, sys\n"),
    }
}

/// A template ready to restore from: its base image and snapshot, held open.
pub struct Template {
    /// Template name.
    pub name: String,
    /// Guest RAM of its snapshot (MiB): `PODFLARE_GUEST_RAM_MIB`, or a
    /// size class built on first use ([`ram_class`]).
    pub ram_mib: u64,
    /// The base image path (resolved).
    pub rootfs: PathBuf,
    /// The image the snapshot was taken with, held open: a rebuild of the
    /// image (a new file behind the same `current` link) must not change
    /// what running and future sandboxes of this snapshot read.
    pub rootfs_file: Arc<File>,
    /// The snapshot's memory file, held open for the same reason: restores
    /// keep working if a newer snapshot replaces this one on disk.
    pub memory_file: Arc<File>,
    /// The snapshot's writable disk (each sandbox gets a copy), held open
    /// likewise.
    pub disk_file: File,
    /// Its snapshot's state and metadata.
    pub snap: SnapshotFile,
    /// The memory file's data locked in RAM (None if the host refused:
    /// then host reclaim may evict what every restore shares).
    pub resident: Option<memory::ResidentFile>,
}

fn file_identity(path: &Path) -> Result<String, VmmError> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| VmmError::File { path: path.display().to_string(), source: e })?;
    let meta = std::fs::metadata(&real)
        .map_err(|e| VmmError::File { path: real.display().to_string(), source: e })?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok(format!("{}:{}:{}", real.display(), meta.len(), mtime.map(|d| d.as_secs()).unwrap_or(0)))
}

/// How a template is built up to its snapshot; a new value rebuilds every
/// cached template. 2: the guest settles (its vCPUs quiet) before the
/// snapshot. 3: the writable disk (its file system's identity is in the key
/// too).
const BUILD_REVISION: u32 = 3;

#[allow(clippy::too_many_arguments)]
fn snapshot_key(cfg: &VmmConfig, backend: Backend, name: &str, kernel_id: &str, rootfs_id: &str, disk_id: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        &snapshot::FORMAT_VERSION.to_string(),
        &super::boot::MACHINE_REVISION.to_string(),
        &BUILD_REVISION.to_string(),
        backend.name(),
        name,
        kernel_id,
        rootfs_id,
        disk_id,
        &scratch::CAPACITY_BYTES.to_string(),
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

/// Loads the template's cached snapshot, or boots the template and builds
/// one (minutes on PVM). Several processes take turns through a lock.
pub fn prepare_template(kvm: &Kvm, cfg: &VmmConfig, backend: Backend, name: &str) -> Result<Template, VmmError> {
    prepare_template_sized(kvm, cfg, backend, name, cfg.guest_ram_mib)
}

/// RAM sizes (MiB) templates are built in besides `PODFLARE_GUEST_RAM_MIB`:
/// a request for RAM gets the smallest of these (or the default) that holds
/// it, the largest when it asks for more. 3072 is the most that fits below
/// the MMIO window in one region.
pub const RAM_CLASSES_MIB: [u64; 3] = [1024, 2048, 3072];

/// The RAM a sandbox that asks for `asked` MiB gets: the default size when
/// it asks for no more than that, else the smallest class holding it, at
/// most the largest class.
pub fn ram_class(default_mib: u64, asked: Option<u64>) -> u64 {
    match asked {
        Some(a) if a > default_mib => {
            RAM_CLASSES_MIB.iter().copied().find(|c| *c >= a).unwrap_or(RAM_CLASSES_MIB[RAM_CLASSES_MIB.len() - 1]).max(default_mib)
        }
        _ => default_mib,
    }
}

/// As [`prepare_template`], for a guest of `ram_mib` MiB. A size other than
/// the default lives in its own directory (`<name>-<ram>m`), so building one
/// never removes another's snapshot.
pub fn prepare_template_sized(kvm: &Kvm, cfg: &VmmConfig, backend: Backend, name: &str, ram_mib: u64) -> Result<Template, VmmError> {
    let dir_name = if ram_mib == cfg.guest_ram_mib { name.to_string() } else { format!("{name}-{ram_mib}m") };
    let mut sized = cfg.clone();
    sized.guest_ram_mib = ram_mib;
    let built = prepare_in(kvm, &sized, backend, name, &dir_name, true)?;
    built.ok_or_else(|| VmmError::Guest(format!("template {name} in {ram_mib} MiB was not built")))
}

/// `name` in `ram_mib` MiB (not the default size) if its snapshot is in the
/// cache and fits this kernel and image; never boots.
pub fn cached_template_sized(kvm: &Kvm, cfg: &VmmConfig, backend: Backend, name: &str, ram_mib: u64) -> Result<Option<Template>, VmmError> {
    let mut sized = cfg.clone();
    sized.guest_ram_mib = ram_mib;
    prepare_in(kvm, &sized, backend, name, &format!("{name}-{ram_mib}m"), false)
}

/// Loads the cached snapshot, or (`build`) boots and builds it.
fn prepare_in(kvm: &Kvm, cfg: &VmmConfig, backend: Backend, name: &str, dir_name: &str, build: bool) -> Result<Option<Template>, VmmError> {
    let link = cfg.rootfs(name);
    let rootfs = std::fs::canonicalize(&link).map_err(|_| VmmError::File {
        path: link.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("base image of template {name:?} not found; run scripts/setup")),
    })?;
    let rootfs_file = Arc::new(vm::open_rootfs(&rootfs)?);
    let kernel_id = file_identity(&cfg.kernel)?;
    let rootfs_id = file_identity(&rootfs)?;
    let pristine = scratch::pristine_image(&cfg.cache_dir, false).map_err(|e| VmmError::File {
        path: cfg.cache_dir.join("scratch").display().to_string(),
        source: std::io::Error::new(e.kind(), format!("the writable disk's file system: {e}")),
    })?;
    let disk_id = file_identity(&pristine)?;
    let key = snapshot_key(cfg, backend, name, &kernel_id, &rootfs_id, &disk_id);
    // Guests with more vCPUs live apart too (`<dir>-<n>cpu`): a process
    // building one must not remove the snapshot others restore from.
    let dir_name = if cfg.guest_vcpus == 1 { dir_name.to_string() } else { format!("{dir_name}-{}cpu", cfg.guest_vcpus) };
    let dir = cfg.cache_dir.join("snapshots").join(dir_name).join(&key);
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
    let disk_path = dir.join("disk");
    // Several processes (hostd, test binaries) may start at once: one builds,
    // the others wait here and then find the snapshot ready.
    let _lock = lock_dir(dir.parent().unwrap_or(&cfg.cache_dir))?;
    if state_path.exists() {
        match snapshot::read_state(&state_path, &expect) {
            Ok(snap)
                if memory_path.metadata().map(|m| m.len()).ok() == Some(expect.ram_bytes)
                    && disk_path.metadata().map(|m| m.len()).ok() == Some(scratch::CAPACITY_BYTES) =>
            {
                cfg.log.info(
                    "template snapshot found",
                    &[("template", json!(name)), ("ram_mib", json!(cfg.guest_ram_mib)), ("dir", json!(dir.display().to_string()))],
                );
                let (memory_file, disk_file) = (Arc::new(open_file(&memory_path)?), open_file(&disk_path)?);
                let resident = lock_memory(cfg, name, &memory_file);
                return Ok(Some(Template { name: name.into(), ram_mib: cfg.guest_ram_mib, rootfs, rootfs_file, memory_file, disk_file, snap, resident }));
            }
            Ok(_) => cfg.log.warn(
                "template snapshot memory or disk file is missing or the wrong size; rebuilding",
                &[("template", json!(name))],
            ),
            Err(e) => cfg.log.warn(
                "template snapshot refused; rebuilding",
                &[("template", json!(name)), ("cause", json!(e.to_string()))],
            ),
        }
    }
    if !build {
        return Ok(None);
    }
    let snap = build_snapshot(kvm, cfg, backend, name, (&rootfs, &pristine), &dir, expect)?;
    let (memory_file, disk_file) = (Arc::new(open_file(&memory_path)?), open_file(&disk_path)?);
    remove_stale_snapshots(&cfg.log, &dir);
    let resident = lock_memory(cfg, name, &memory_file);
    Ok(Some(Template { name: name.into(), ram_mib: cfg.guest_ram_mib, rootfs, rootfs_file, memory_file, disk_file, snap, resident }))
}

/// Locks the template's memory file in RAM ([`memory::ResidentFile`]). A
/// refusal (no CAP_IPC_LOCK and a small RLIMIT_MEMLOCK) is logged, not
/// fatal: restores work the same, only slower once reclaim evicts pages.
fn lock_memory(cfg: &VmmConfig, name: &str, file: &File) -> Option<memory::ResidentFile> {
    let len = cfg.guest_ram_mib << 20;
    match memory::lock_resident(file, len) {
        Ok(r) => {
            let mib = (r.locked_bytes as f64 / 1048576.0 * 10.0).round() / 10.0;
            cfg.log.info("template memory locked in RAM", &[("template", json!(name)), ("ram_mib", json!(cfg.guest_ram_mib)), ("locked_mib", json!(mib))]);
            Some(r)
        }
        Err(e) => {
            cfg.log.warn(
                "template memory not locked in RAM (host reclaim may evict it)",
                &[("template", json!(name)), ("cause", json!(e.to_string()))],
            );
            None
        }
    }
}

fn open_file(path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })
}

/// Deletes the template's other snapshot directories (older kernels, images
/// or settings). Processes still using one hold its files open, so removing
/// the names is safe for them.
fn remove_stale_snapshots(log: &Logger, current: &Path) {
    let Some(parent) = current.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p != current && p.is_dir() {
            log.info("removing stale snapshot", &[("dir", json!(p.display().to_string()))]);
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

/// Waits for an exec to exit 0; its stderr is the error otherwise.
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
            Ok(ExecChunk::Stdout(_) | ExecChunk::Started) => {}
            Err(_) => return Err(VmmError::Guest(format!("{what} did not finish within {timeout:?}"))),
        }
    }
}

/// How long a template's guest may take to settle after its warm-up.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// One look at the vCPUs while settling.
const SETTLE_WINDOW: Duration = Duration::from_millis(500);
/// The vCPU time per window below which the guest counts as quiet: an idle
/// tickless guest uses a few ms per second (timer and device interrupts).
const SETTLE_QUIET: Duration = Duration::from_millis(10);

struct Settled {
    waited: Duration,
    vcpu_cpu: Duration,
    quiet: bool,
}

/// Waits until the guest's vCPUs are quiet for two windows in a row (or
/// `limit` passes). Work the guest kernel still has queued when the
/// snapshot is taken would be redone by every sandbox restored from it, and
/// each first exec would wait behind it. (The snapshot built before this
/// step cost 1.5 s of vCPU time per restore on PVM; rebuilt, 0.2-0.8 s,
/// varying by the hour for reasons not pinned down.)
fn settle(vm: &Vm, limit: Duration) -> Settled {
    let started = Instant::now();
    let first = vm.vcpus_cpu_time();
    let (mut last, mut quiet_windows) = (first, 0);
    while quiet_windows < 2 && started.elapsed() < limit {
        std::thread::sleep(SETTLE_WINDOW);
        let now = vm.vcpus_cpu_time();
        quiet_windows = if now.saturating_sub(last) < SETTLE_QUIET { quiet_windows + 1 } else { 0 };
        last = now;
    }
    Settled { waited: started.elapsed(), vcpu_cpu: last.saturating_sub(first), quiet: quiet_windows >= 2 }
}

/// Boots the template once, warms it, lets it settle, and writes its snapshot.
pub fn build_snapshot(
    kvm: &Kvm,
    cfg: &VmmConfig,
    backend: Backend,
    name: &str,
    (rootfs, disk): (&Path, &Path),
    dir: &Path,
    meta: SnapshotMeta,
) -> Result<SnapshotFile, VmmError> {
    let started = Instant::now();
    cfg.log.info(
        "template: booting to build its snapshot",
        &[("template", json!(name)), ("ram_mib", json!(cfg.guest_ram_mib)), ("guest_wait_s", json!(cfg.boot_timeout.as_secs()))],
    );
    let spec = VmSpec {
        kernel: cfg.kernel.clone(),
        rootfs: rootfs.to_path_buf(),
        ram_bytes: meta.ram_bytes,
        vcpus: cfg.guest_vcpus,
        backend,
        extra_cmdline: String::new(),
        disk: Some(disk.to_path_buf()),
    };
    let vm = Vm::boot(kvm, &format!("tmpl-{name}"), &spec)?;
    vm.status().label(cfg.log.clone(), None);
    let ch = vm.channel().clone();
    let fail = |what: String| {
        let tail = String::from_utf8_lossy(&vm.console_log().contents()).into_owned();
        let tail: String = tail.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect();
        VmmError::Guest(format!("template {name}: {what}\n--- guest console (tail) ---\n{tail}"))
    };
    for port in 0..super::channel::PORTS {
        ch.wait_ready(port, 0, cfg.boot_timeout).map_err(|e| fail(format!("port {port} not ready: {e}")))?;
    }
    cfg.log.info("template: agent and REPL ready", &[("template", json!(name)), ("ram_mib", json!(cfg.guest_ram_mib)), ("s", secs(started))]);
    let seen = [ch.ready_count(0), ch.ready_count(1)];
    ch.send_hello().map_err(|e| fail(e.to_string()))?;
    for (port, s) in seen.iter().enumerate() {
        ch.wait_ready(port, *s, cfg.boot_timeout).map_err(|e| fail(format!("hello on port {port}: {e}")))?;
    }
    let rx = ch.exec(Language::Python, warmup_code(name)).map_err(|e| fail(e.to_string()))?;
    wait_exec_ok(rx, cfg.boot_timeout, "warm-up").map_err(|e| fail(e.to_string()))?;
    cfg.log.info("template: warm-up done", &[("template", json!(name)), ("ram_mib", json!(cfg.guest_ram_mib)), ("s", secs(started))]);
    let settled = settle(&vm, SETTLE_LIMIT);
    let fields = [
        ("template", json!(name)),
        ("ram_mib", json!(cfg.guest_ram_mib)),
        ("waited_s", json!((settled.waited.as_secs_f64() * 10.0).round() / 10.0)),
        ("vcpu_ms", json!(settled.vcpu_cpu.as_millis() as u64)),
    ];
    if settled.quiet {
        cfg.log.info("template: guest settled", &fields);
    } else {
        cfg.log.warn("template: guest still busy at the settle limit; snapshotting anyway", &fields);
    }

    let snap = persist::save_vm(&vm, dir, meta)?;
    drop(vm);
    cfg.log.info(
        "template: snapshot written",
        &[("template", json!(name)), ("ram_mib", json!(cfg.guest_ram_mib)), ("dir", json!(dir.display().to_string())), ("s", secs(started))],
    );
    Ok(snap)
}


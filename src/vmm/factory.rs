//! The guest factory the sandbox manager creates guests with: restore on
//! create from a template snapshot, the optional warm pool, admission, and
//! the capacity counters.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde_json::json;

use super::snapshot::SnapshotMeta;
use super::scratch::{self, ScratchDisk};
use super::sized::SizedTemplates;
use super::template::{self, Template};
use super::vm::{Disks, Vm};
use super::admission::{self, Admission};
use super::cache;
use super::{memory, persist, Backend, VmmConfig, VmmError};
use super::channel::Channel;
use super::space::{SpaceError, Spaces, TemplateLookup};
use super::hostnet::{HostNet, NetSlot};
use crate::guest::{ExecChunk, Guest, GuestError, GuestFactory, GuestSpec, Language, PtyControl, PtyStart, SpaceInfo, StreamRx};
use crate::seccomp::{self, ThreadKind};

#[derive(Default)]
struct Counters {
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
    created: AtomicU64,
    restore_ns_total: AtomicU64,
    forks: AtomicU64,
    fork_children: AtomicU64,
}

/// Where one fork's time and bytes went (server side).
#[derive(Debug, Clone, Copy)]
pub struct ForkFigures {
    /// The parent's vCPUs were stopped this long.
    pub parent_paused: Duration,
    /// Until the capture was done (admission, pause, save, copy, remap).
    pub capture: Duration,
    /// Until every child ran and had its Hello queued.
    pub total: Duration,
    /// Non-zero bytes copied into the new image layer.
    pub image_bytes: u64,
    /// Mappings the new layer adds to each VM.
    pub image_runs: usize,
    /// Image layers each child maps over its template.
    pub layers: usize,
    /// Whether the parent's layers were folded into one (a full copy).
    pub folded: bool,
}

/// `vm.max_map_count` hostd asks for: every run of a fork image layer is a
/// mapping in each VM that maps it (up to `MAX_LAYER_RUNS` plus a fold's
/// worth, ~550 per VM), and 1,000 forked sandboxes must fit with room.
const WANT_MAX_MAP_COUNT: u64 = 1_048_576;

/// Raises `vm.max_map_count` to [`WANT_MAX_MAP_COUNT`] if it is lower, and
/// says so (or that it could not) in the log.
fn raise_map_count(log: &crate::obs::Logger) {
    let path = "/proc/sys/vm/max_map_count";
    let now = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    if now >= WANT_MAX_MAP_COUNT {
        return;
    }
    match std::fs::write(path, WANT_MAX_MAP_COUNT.to_string()) {
        Ok(()) => log.info(
            "raised vm.max_map_count for fork images",
            &[("from", json!(now)), ("to", json!(WANT_MAX_MAP_COUNT))],
        ),
        Err(e) => log.warn(
            "vm.max_map_count is low for many forked sandboxes; run: sysctl -w vm.max_map_count=1048576",
            &[("now", json!(now)), ("cause", json!(e.to_string()))],
        ),
    }
}

struct Pool {
    ready: Mutex<HashMap<String, Vec<PooledVm>>>,
    wake: Condvar,
}

/// A restored VM waiting in the pool.
struct PooledVm {
    vm: Vm,
    /// It had its own `Hello` and one exec while pooled ([`warm_pooled`]).
    greeted: bool,
}

/// How long the pool filler waits for a pooled VM's warm-up.
const POOL_WARM_WAIT: Duration = Duration::from_secs(120);

/// Gives a pooled VM its `Hello` (its own clock and entropy, as every copy
/// gets) and one exec, so a create that takes it finds a guest past the
/// first work of a restored kernel (~0.1-0.2 s of emulated kernel here) and
/// its first output comes as fast as any warm exec's.
fn warm_pooled(vm: &Vm, wait: Duration) -> Result<(), String> {
    let ch = vm.channel();
    ch.send_hello().map_err(|e| e.to_string())?;
    for port in [podflare_proto::AGENT_PORT, podflare_proto::REPL_PORT] {
        ch.wait_ready(port as usize, 0, wait).map_err(|e| e.to_string())?;
    }
    let rx = ch.exec(Language::Python, "pass").map_err(|e| e.to_string())?;
    loop {
        match rx.recv_timeout(wait) {
            Ok(ExecChunk::Exit(0)) => return Ok(()),
            Ok(ExecChunk::Exit(c)) => return Err(format!("warm-up exec exited {c}")),
            Ok(ExecChunk::Failed(m)) => return Err(m),
            Ok(_) => {}
            Err(e) => return Err(format!("warm-up exec: {e}")),
        }
    }
}

struct Inner {
    kvm: Kvm,
    cfg: VmmConfig,
    backend: Backend,
    /// Every served template in the default RAM size, built at start.
    templates: HashMap<String, Arc<Template>>,
    /// The same templates in other RAM sizes, built on first use.
    sized: SizedTemplates,
    counters: Counters,
    admission: Admission,
    pool: Pool,
    next_vm: AtomicU64,
    spaces: Spaces,
    /// Where VMs' writable disks are made (unnamed files: nothing is left
    /// here when a VM ends or hostd is killed).
    disks_dir: PathBuf,
    /// Sandbox networking; `None` when `PODFLARE_NETWORK=off`.
    net: Option<HostNet>,
}

/// Restores guests from template snapshots.
pub struct VmFactory {
    inner: Arc<Inner>,
}

impl VmFactory {
    /// Opens KVM, and loads or builds every configured template's snapshot.
    pub fn open(mut cfg: VmmConfig) -> Result<VmFactory, VmmError> {
        // Before anything is read from the cache.
        cache::check(&cfg)?;
        for path in cache::remove_leftovers(&cfg) {
            cfg.log.info("removed a snapshot a killed run left half written", &[("dir", json!(path.display().to_string()))]);
        }
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        raise_map_count(&cfg.log);
        super::channel::set_default_poll_window(cfg.guest_poll);
        let backend = Backend::detect();
        let slice = *cfg.vcpu_slice.get_or_insert(match backend {
            Backend::Pvm => PVM_VCPU_SLICE,
            Backend::Hardware => Duration::ZERO,
        });
        super::threads::set_vcpu_slice(slice);
        let what = match backend {
            Backend::Pvm => "kvm_pvm loaded: guest kernel is emulated, PVM guest settings applied",
            Backend::Hardware => "hardware virtualization",
        };
        let slice_ms = json!(slice.as_millis());
        cfg.log.info("KVM backend", &[("backend", json!(backend.name())), ("detail", json!(what)), ("vcpu_slice_ms", slice_ms)]);
        if !cfg.kernel.is_file() {
            return Err(VmmError::File {
                path: cfg.kernel.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "guest kernel not found; run scripts/setup or set PODFLARE_KERNEL"),
            });
        }
        // The writable disk's empty file system, before any template build
        // (they copy it), from this unfiltered thread (it runs mkfs.ext4).
        let pristine = scratch::pristine_image(&cfg.cache_dir, true).map_err(|e| VmmError::File {
            path: cfg.cache_dir.join("scratch").display().to_string(),
            source: std::io::Error::new(e.kind(), format!("the writable disk's file system: {e}")),
        })?;
        cfg.log.info("writable disk file system", &[("image", json!(pristine.display().to_string()))]);
        // Networking next, from this unfiltered thread (its slot maker runs
        // `ip` and `nft`): a host that cannot is told so before the
        // templates' minutes of building.
        let net = match &cfg.network {
            Some(nc) => {
                let net = HostNet::start(nc.clone(), cfg.log.clone())?;
                cfg.log.info("sandbox networking", &[("network", net.figures())]);
                if nc.dns.is_none() {
                    cfg.log.warn("sandboxes have no resolver: PODFLARE_NET_DNS is none, or the host's resolv.conf names no reachable IPv4 one", &[]);
                }
                Some(net)
            }
            None => {
                cfg.log.info("sandbox networking is off (PODFLARE_NETWORK=off): no sandbox has a path out", &[]);
                None
            }
        };
        let disks_dir = cfg.cache_dir.join("disks");
        std::fs::create_dir_all(&disks_dir).map_err(|e| VmmError::File { path: disks_dir.display().to_string(), source: e })?;
        // Templates build in parallel: each cold boot keeps one vCPU busy.
        let built: Vec<Result<Template, VmmError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = cfg
                .templates
                .iter()
                .map(|name| {
                    let (kvm, cfg) = (&kvm, &cfg);
                    scope.spawn(move || template::prepare_template(kvm, cfg, backend, name))
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
            templates.insert(t.name.clone(), Arc::new(t));
        }
        // The effective limit, also what capacity reports.
        cfg.max_sandboxes = sandboxes_within_fd_limit(&cfg);
        let admission = Admission::new(cfg.max_sandboxes, cfg.max_guest_memory_mib, cfg.memory_floor_mib);
        let spaces = Spaces::open(cfg.spaces_dir.clone(), &cfg.log).map_err(|e| VmmError::Guest(e.to_string()))?;
        let sized = SizedTemplates::start(&cfg, backend)?;
        let inner = Arc::new(Inner {
            kvm,
            cfg,
            backend,
            templates,
            sized,
            counters: Counters::default(),
            admission,
            pool: Pool { ready: Mutex::new(HashMap::new()), wake: Condvar::new() },
            next_vm: AtomicU64::new(1),
            spaces,
            disks_dir,
            net,
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
    /// `name` in `ram_mib` MiB: the default size's, or one built on first
    /// use. A build that takes longer than `PODFLARE_RAM_BUILD_WAIT_SECS`
    /// goes on in the background and this answers `Unavailable` (503: retry).
    fn template(&self, name: &str, ram_mib: u64) -> Result<Arc<Template>, GuestError> {
        let t = self.templates.get(name).ok_or_else(|| GuestError::UnknownTemplate(name.to_string()))?;
        if ram_mib == t.ram_mib {
            return Ok(Arc::clone(t));
        }
        match self.sized.get(name, ram_mib, self.cfg.ram_build_wait) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(GuestError::Unavailable(format!(
                "template {name:?} in {ram_mib} MiB is being built (the first request for this RAM size; a few minutes on a host that emulates the guest kernel); retry in a minute"
            ))),
            Err(e) => {
                self.cfg.log.error(
                    "template of the asked RAM size is not available",
                    &[("template", json!(name)), ("ram_mib", json!(ram_mib)), ("cause", json!(e.to_string()))],
                );
                Err(GuestError::Internal(e.to_string()))
            }
        }
    }

    fn restore(&self, template: &str) -> Result<Vm, VmmError> {
        let t = self
            .templates
            .get(template)
            .ok_or_else(|| VmmError::Config(format!("unknown template {template:?}")))?;
        self.restore_from(t)
    }

    /// A sandbox's network: with egress (and networking on), a namespace of
    /// its own whose tap the VM's card takes; otherwise none, and the card
    /// keeps refusing every packet.
    fn connect(&self, vm: &Vm, egress: bool) -> Result<Option<NetSlot>, GuestError> {
        let Some(net) = self.net.as_ref().filter(|_| egress) else { return Ok(None) };
        let mut slot = net.take().map_err(|e| GuestError::Unavailable(e.to_string()))?;
        let tap = slot.take_tap().ok_or_else(|| GuestError::Internal("a network slot without its tap".into()))?;
        vm.net().attach_tap(tap).map_err(|e| GuestError::Internal(format!("attach the tap: {e}")))?;
        Ok(Some(slot))
    }

    fn restore_from(&self, t: &Template) -> Result<Vm, VmmError> {
        let started = Instant::now();
        let (memory, rootfs) = (t.memory_file.clone(), t.rootfs_file.clone());
        let disk = self.disk_copy(&t.disk_file)?;
        let n = self.next_vm.fetch_add(1, Ordering::Relaxed);
        let vm = persist::restore(&self.kvm, &format!("vm{n}"), Disks { rootfs, disk }, memory, &t.snap)?;
        vm.status().label(self.cfg.log.clone(), None);
        self.counters.restore_ns_total.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(vm)
    }

    /// A new VM's own copy of `base` (its write limit comes with the device
    /// state restored over it).
    fn disk_copy(&self, base: &std::fs::File) -> Result<ScratchDisk, VmmError> {
        ScratchDisk::copy_of(base, &self.disks_dir, scratch::BASE_FS_BYTES)
            .map_err(|e| VmmError::File { path: self.disks_dir.display().to_string(), source: e })
    }
}

/// The vCPU slice on PVM unless `PODFLARE_VCPU_SLICE_MS` says otherwise
/// (see [`VmmConfig::vcpu_slice`]).
const PVM_VCPU_SLICE: Duration = Duration::from_millis(20);

/// Open files one sandbox with `vcpus` vCPUs holds at most: the VM and one
/// per vCPU; an eventfd per device interrupt (5) and two that wake its
/// device thread; that thread's epoll; its writable disk; its network
/// namespace and tap. 12 + `vcpus` counted (the template's image and memory
/// file are shared), with a margin of two.
pub fn fds_per_sandbox(vcpus: u8) -> u64 {
    14 + u64::from(vcpus)
}
/// Open files kept for everything else (HTTP connections, hostd's own).
const FDS_RESERVED: u64 = 1024;

/// How many sandboxes of `vcpus` vCPUs an open-file limit of `soft` holds.
fn sandboxes_fitting(soft: u64, vcpus: u8) -> usize {
    usize::try_from(soft.saturating_sub(FDS_RESERVED) / fds_per_sandbox(vcpus)).unwrap_or(usize::MAX)
}

/// `PODFLARE_MAX_SANDBOXES`, lowered (and said so) where the process's
/// open-file limit cannot hold that many: past it creates would fail with
/// EMFILE; within it the next one is refused as at the count limit.
fn sandboxes_within_fd_limit(cfg: &VmmConfig) -> usize {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) else {
        return cfg.max_sandboxes;
    };
    let fit = sandboxes_fitting(soft, cfg.guest_vcpus);
    if fit < cfg.max_sandboxes {
        cfg.log.warn(
            "the open-file limit holds fewer sandboxes than PODFLARE_MAX_SANDBOXES; admitting at most that many (raise the limit, e.g. LimitNOFILE)",
            &[("open_file_limit", json!(soft)), ("max_sandboxes", json!(cfg.max_sandboxes)), ("admitted_at_most", json!(fit))],
        );
        return fit;
    }
    cfg.max_sandboxes
}

fn pool_filler(inner: std::sync::Weak<Inner>) {
    // Never restore unfiltered. The binary probes every filter at start-up,
    // so this fails only if the kernel changed its mind since.
    if let Err(e) = seccomp::install(ThreadKind::PoolFiller) {
        if let Some(me) = inner.upgrade() {
            me.cfg.log.error("warm pool stopped: creates restore on demand", &[("cause", json!(e.to_string()))]);
        }
        return;
    }
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
            // A pooled VM holds its place from here on (it is counted live).
            let Ok(ticket) = me.admission.reserve() else {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            };
            match me.restore(&name) {
                Ok(vm) => {
                    ticket.admit();
                    let greeted = match warm_pooled(&vm, POOL_WARM_WAIT) {
                        Ok(()) => true,
                        Err(e) => {
                            // The create that takes it sends its Hello then.
                            me.cfg.log.warn("warm pool: warm-up failed", &[("template", json!(name)), ("cause", json!(e))]);
                            false
                        }
                    };
                    let mut ready = me.pool.ready.lock().unwrap_or_else(|p| p.into_inner());
                    ready.entry(name).or_default().push(PooledVm { vm, greeted });
                }
                Err(e) => {
                    drop(ticket);
                    me.cfg.log.error(
                        "warm pool: restore failed",
                        &[("template", json!(name)), ("cause", json!(e.to_string()))],
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// A sandbox's VM, as the sandbox manager sees it.
pub struct RunningGuest {
    vm: Vm,
    /// Its network namespace when it has egress; after `vm`, so the tap
    /// closes first.
    net: Option<NetSlot>,
    inner: Arc<Inner>,
    /// The template snapshot under its memory (name and RAM size).
    template: Arc<Template>,
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

    fn ram_mib(&self) -> Option<u64> {
        Some(self.template.ram_mib)
    }

    fn shutdown(&self, why: &str) {
        self.vm.channel().fail(why);
    }

    fn fork(&self, specs: &[GuestSpec]) -> Result<Vec<Box<dyn Guest>>, GuestError> {
        let (children, _) = self.fork_running(specs)?;
        Ok(children.into_iter().map(|c| Box::new(c) as Box<dyn Guest>).collect())
    }

    fn relabel(&self, sandbox_id: &str) {
        self.vm.status().label(self.inner.cfg.log.clone(), Some(sandbox_id.to_string()));
    }

    fn freeze(&self, source_sandbox: &str, sandbox: serde_json::Value) -> Result<SpaceInfo, GuestError> {
        let inner = &self.inner;
        let started = Instant::now();
        if let Some(why) = self.vm.status().stopped() {
            return Err(GuestError::Failed(why));
        }
        let t = &self.template;
        let paused = std::cell::Cell::new(false);
        let disk_limit = self.vm.disk().limit();
        let frozen = inner.spaces.freeze(&t.name, t.ram_mib, &t.snap.meta, source_sandbox, sandbox.clone(), disk_limit, |file, disk| {
            let f = self.vm.freeze_into(file, disk)?;
            paused.set(true);
            Ok(f)
        });
        let (record, vcpus_stopped, bytes) = match frozen {
            Ok(r) => r,
            Err(e) => {
                // Written but not made durable: the guest runs on.
                if paused.get() {
                    let _ = self.vm.resume();
                }
                inner.cfg.log.error(
                    "freezing into a space failed; the sandbox keeps running",
                    &[("sandbox", json!(source_sandbox)), ("cause", json!(e.to_string()))],
                );
                return Err(GuestError::Internal(format!("freeze: {e}")));
            }
        };
        // Stopped for good: execs now fail at once instead of waiting.
        self.vm.channel().fail("the sandbox was frozen into a space");
        inner.cfg.log.info(
            "sandbox frozen into a space",
            &[
                ("sandbox", json!(source_sandbox)),
                ("space", json!(record.id)),
                ("template", json!(record.template)),
                ("data_bytes", json!(record.data_bytes)),
                ("bytes_on_disk", json!(bytes)),
                ("runs", json!(record.runs.len())),
                ("vcpus_stopped_ms", json!(vcpus_stopped.as_secs_f64() * 1e3)),
                ("ms", json!(started.elapsed().as_secs_f64() * 1e3)),
            ],
        );
        Ok(SpaceInfo {
            id: record.id,
            template: record.template,
            bytes_on_disk: bytes,
            created_unix: record.created_unix,
            source_sandbox: record.source_sandbox,
            sandbox,
        })
    }

    fn pty(&self, start: &PtyStart) -> Result<(StreamRx<ExecChunk>, Box<dyn PtyControl>), GuestError> {
        if let Some(why) = self.vm.status().stopped() {
            return Err(GuestError::Failed(why));
        }
        let req = podflare_proto::PtyRequest {
            argv: start.argv.clone(),
            size: podflare_proto::PtySize { cols: start.cols, rows: start.rows },
            cwd: start.cwd.clone(),
            env: start.env.clone(),
        };
        let channel = self.vm.channel().clone();
        let (stream, rx) = channel.pty(&req).map_err(|e| GuestError::Failed(e.to_string()))?;
        Ok((rx, Box::new(ChannelPty { channel, stream })))
    }

    fn pty_reopen(&self, handle: u64) -> Result<(StreamRx<ExecChunk>, Box<dyn PtyControl>), GuestError> {
        let stream = u32::try_from(handle).map_err(|_| GuestError::Internal(format!("pty handle {handle} is not a stream id")))?;
        let channel = self.vm.channel().clone();
        let rx = channel.adopt_stream(stream).map_err(|e| GuestError::Failed(e.to_string()))?;
        Ok((rx, Box::new(ChannelPty { channel, stream })))
    }
}

/// A terminal session's controls: frames on its stream of the agent port.
struct ChannelPty {
    channel: Channel,
    stream: u32,
}

impl ChannelPty {
    fn send(&self, kind: podflare_proto::Kind, payload: &[u8]) -> Result<(), GuestError> {
        self.channel.to_stream(kind, self.stream, payload).map_err(|e| GuestError::Failed(e.to_string()))
    }
}

impl PtyControl for ChannelPty {
    fn input(&self, data: &[u8]) -> Result<(), GuestError> {
        self.send(podflare_proto::Kind::Stdin, data)
    }

    fn resize(&self, cols: u16, rows: u16) -> Result<(), GuestError> {
        self.send(podflare_proto::Kind::Resize, &Channel::resize_payload(cols, rows))
    }

    fn kill(&self) -> Result<(), GuestError> {
        self.send(podflare_proto::Kind::Cancel, &[])
    }

    fn handle(&self) -> u64 {
        u64::from(self.stream)
    }
}

impl RunningGuest {
    /// The VM (benchmarks and tests look at its channel and console).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Forks this guest into one child per spec and says where the time
    /// went. Every child's place is reserved first, so a fork over capacity
    /// is refused whole before the parent is touched.
    pub fn fork_running(&self, specs: &[GuestSpec]) -> Result<(Vec<RunningGuest>, ForkFigures), GuestError> {
        let inner = &self.inner;
        let started = Instant::now();
        if let Some(why) = self.vm.status().stopped() {
            return Err(GuestError::Failed(why));
        }
        let t = &self.template;
        let mut tickets = Vec::with_capacity(specs.len());
        for _ in specs {
            tickets.push(inner.admission.reserve()?);
        }
        let failed = |what: &str, e: VmmError| {
            inner.cfg.log.error(
                "fork failed",
                &[("sandbox", json!(self.vm.status().sandbox())), ("step", json!(what)), ("cause", json!(e.to_string()))],
            );
            GuestError::Internal(format!("fork: {what}: {e}"))
        };
        let source = self.vm.capture_for_fork().map_err(|e| failed("capture", e))?;
        let capture = started.elapsed();
        let restore_one = |spec: &GuestSpec, ticket: admission::Ticket<'_>| -> Result<RunningGuest, GuestError> {
            let n = inner.next_vm.fetch_add(1, Ordering::Relaxed);
            let (rootfs, memory) = (t.rootfs_file.clone(), t.memory_file.clone());
            let vm = persist::restore_fork_child(&inner.kvm, &format!("vm{n}"), rootfs, memory, &source)
                .map_err(|e| failed("restore child", e))?;
            ticket.admit();
            // The child owns its place now: its drop releases it. Its
            // network before it runs: the parent's egress, a namespace of its own.
            let net = inner.connect(&vm, spec.egress)?;
            let child = RunningGuest { vm, net, inner: inner.clone(), template: Arc::clone(&self.template) };
            child.vm.status().label(inner.cfg.log.clone(), Some(spec.sandbox_id.clone()));
            // Fresh clock and entropy before anything else it runs.
            child.vm.channel().send_hello().map_err(|e| GuestError::Failed(e.to_string()))?;
            Ok(child)
        };
        // One after the other: restoring on several threads measured no
        // faster here (the restores contend in the kernel: mmap lock, KVM).
        let mut children = Vec::with_capacity(specs.len());
        for (spec, ticket) in specs.iter().zip(tickets) {
            children.push(restore_one(spec, ticket)?);
        }
        // All at once at the end: running children would take the CPU from
        // the restore of the rest (each starts by handling its Hello).
        let vms: Vec<&Vm> = children.iter().map(|c| &c.vm).collect();
        Vm::resume_together(&vms).map_err(|e| failed("resume children", e))?;
        let figures = ForkFigures {
            parent_paused: source.paused,
            capture,
            total: started.elapsed(),
            image_bytes: source.copied_bytes,
            image_runs: source.copied_runs,
            layers: source.layers.len(),
            folded: source.folded,
        };
        inner.counters.forks.fetch_add(1, Ordering::Relaxed);
        inner.counters.fork_children.fetch_add(children.len() as u64, Ordering::Relaxed);
        inner.cfg.log.info(
            "fork",
            &[
                ("sandbox", json!(self.vm.status().sandbox())),
                ("children", json!(children.len())),
                ("parent_paused_us", json!(figures.parent_paused.as_micros() as u64)),
                ("capture_us", json!(figures.capture.as_micros() as u64)),
                ("total_us", json!(figures.total.as_micros() as u64)),
                ("image_bytes", json!(figures.image_bytes)),
                ("image_runs", json!(figures.image_runs)),
                ("layers", json!(figures.layers)),
                ("folded", json!(figures.folded)),
            ],
        );
        Ok((children, figures))
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.inner.admission.release();
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

    fn memory_pressure(&self) -> Option<u64> {
        self.inner.admission.pressure()
    }

    fn vm_threads_cpu(&self) -> std::time::Duration {
        super::threads::cpu_time()
    }

    fn spaces(&self) -> Vec<serde_json::Value> {
        self.inner.spaces.list()
    }

    fn resume_space(&self, space: &str, spec: &GuestSpec) -> Result<(Box<dyn Guest>, SpaceInfo), GuestError> {
        let (guest, info) = self.resume_running(space, spec)?;
        Ok((Box::new(guest), info))
    }

    fn delete_space(&self, space: &str) -> Result<(), GuestError> {
        self.inner.spaces.delete(space).map_err(space_error)?;
        self.inner.cfg.log.info("space deleted", &[("space", json!(space))]);
        Ok(())
    }
}

fn space_error(e: SpaceError) -> GuestError {
    match e {
        SpaceError::Unknown(id) => GuestError::UnknownSpace(id),
        SpaceError::Busy(_) | SpaceError::Unusable { .. } | SpaceError::Unservable(_) => GuestError::SpaceConflict(e.to_string()),
        SpaceError::NotYet(why) => GuestError::Unavailable(why),
        SpaceError::Io { .. } => GuestError::Internal(e.to_string()),
    }
}

impl VmFactory {
    /// Resumes `space` as a new guest serving `spec.sandbox_id` and consumes
    /// the space: the template's memory file mapped private, the space's
    /// memory file mapped private over the pages it holds (nothing is
    /// copied), its saved state, a fresh clock and entropy. On an error of
    /// ours the space stays for another try.
    pub fn resume_running(&self, space: &str, spec: &GuestSpec) -> Result<(RunningGuest, SpaceInfo), GuestError> {
        let inner = &self.inner;
        let started = Instant::now();
        let ticket = inner.admission.reserve()?;
        // Its template in its RAM size (a size not built yet is built now).
        let meta_of = |name: &str, mib: u64| match inner.template(name, mib) {
            Ok(t) => Ok(t.snap.meta.clone()),
            Err(GuestError::Unavailable(why)) => Err(TemplateLookup::NotYet(why)),
            Err(e) => Err(TemplateLookup::Missing(e.to_string())),
        };
        let loaded = inner.spaces.take(space, meta_of).map_err(|e| {
            if let SpaceError::Unusable { .. } = e {
                inner.cfg.log.warn("space refused and removed", &[("space", json!(space)), ("cause", json!(e.to_string()))]);
            }
            space_error(e)
        })?;
        let checked = started.elapsed();
        let record = loaded.record;
        let restored = (|| {
            let t = inner.template(&record.template, record.ram_mib).map_err(|e| VmmError::Guest(e.to_string()))?;
            let mem = memory::private_file_mapping(t.memory_file.clone(), t.snap.meta.ram_bytes)?;
            let image = Arc::new(memory::ForkImage::from_file(loaded.memory, record.runs.clone(), record.data_bytes));
            // SAFETY: `mem` is a fresh mapping no VM uses yet and nobody
            // references; the runs were checked to lie inside guest RAM.
            unsafe { memory::map_image(&mem, &image) }?;
            let n = inner.next_vm.fetch_add(1, Ordering::Relaxed);
            let rootfs = t.rootfs_file.clone();
            let disk = inner.disk_copy(&loaded.disk)?;
            let disks = Disks { rootfs, disk };
            let vm = Vm::restore_space(&inner.kvm, &format!("vm{n}"), disks, mem, &loaded.machine, record.next_stream, image)?;
            vm.resume()?;
            Ok::<_, VmmError>((vm, t))
        })();
        let (vm, template) = match restored {
            Ok(r) => r,
            Err(e) => {
                inner.spaces.release(space);
                inner.cfg.log.error("resume failed; the space stays", &[("space", json!(space)), ("cause", json!(e.to_string()))]);
                return Err(GuestError::Internal(format!("resume: {e}")));
            }
        };
        let net = match inner.connect(&vm, spec.egress) {
            Ok(n) => n,
            Err(e) => {
                inner.spaces.release(space);
                return Err(e);
            }
        };
        ticket.admit();
        let guest = RunningGuest { vm, net, inner: inner.clone(), template };
        guest.vm.status().label(inner.cfg.log.clone(), Some(spec.sandbox_id.clone()));
        inner.spaces.consumed(space);
        guest.vm.channel().send_hello().map_err(|e| GuestError::Failed(e.to_string()))?;
        inner.counters.created.fetch_add(1, Ordering::Relaxed);
        inner.cfg.log.info(
            "space resumed",
            &[
                ("space", json!(space)),
                ("sandbox", json!(spec.sandbox_id)),
                ("checked_ms", json!(checked.as_secs_f64() * 1e3)),
                ("ms", json!(started.elapsed().as_secs_f64() * 1e3)),
            ],
        );
        let info = SpaceInfo {
            id: record.id,
            template: record.template,
            bytes_on_disk: 0,
            created_unix: record.created_unix,
            source_sandbox: record.source_sandbox,
            sandbox: record.sandbox,
        };
        Ok((guest, info))
    }

    fn create_inner(&self, spec: &GuestSpec) -> Result<RunningGuest, GuestError> {
        let inner = &self.inner;
        if !inner.templates.contains_key(&spec.template) {
            return Err(GuestError::UnknownTemplate(spec.template.clone()));
        }
        let mib = template::ram_class(inner.cfg.guest_ram_mib, spec.ram_mib);
        // Another RAM size: its template (built now if this is its first use).
        let template = inner.template(&spec.template, mib)?;
        // The warm pool holds default-size VMs only.
        let pooled = if mib == inner.cfg.guest_ram_mib {
            let mut ready = inner.pool.ready.lock().unwrap_or_else(|p| p.into_inner());
            ready.get_mut(&spec.template).and_then(|v| v.pop())
        } else {
            None
        };
        // From here the VM holds a place: a pooled one took it when pooled.
        let mut greeted = false;
        let vm = match pooled {
            Some(p) => {
                inner.counters.pool_hits.fetch_add(1, Ordering::Relaxed);
                inner.pool.wake.notify_all();
                greeted = p.greeted;
                p.vm
            }
            None => {
                let ticket = inner.admission.reserve()?;
                if inner.cfg.pool_size > 0 {
                    inner.counters.pool_misses.fetch_add(1, Ordering::Relaxed);
                }
                let vm = inner.restore_from(&template).map_err(|e| {
                    inner.cfg.log.error(
                        "restore failed",
                        &[
                            ("sandbox", json!(spec.sandbox_id)),
                            ("template", json!(spec.template)),
                            ("cause", json!(e.to_string())),
                        ],
                    );
                    GuestError::Internal(e.to_string())
                })?;
                ticket.admit();
                vm
            }
        };
        // The guest owns the place now: its drop releases it, whatever happens next.
        let mut guest = RunningGuest { vm, net: None, inner: inner.clone(), template };
        guest.net = inner.connect(&guest.vm, spec.egress)?;
        guest.vm.status().label(inner.cfg.log.clone(), Some(spec.sandbox_id.clone()));
        // The disk it asked for: the device lets it write that far, and the
        // agent grows the file system before it answers its Hello.
        let disk_bytes = spec.rootfs_gb.map(scratch::disk_bytes_for).filter(|b| *b > guest.vm.disk().limit());
        if let Some(bytes) = disk_bytes {
            guest.vm.disk().set_limit(bytes);
        }
        // Fresh clock and entropy for this copy, queued ahead of any exec
        // (after the disk is grown, when it is). A warmed pooled VM had its
        // own already; it gets another only to grow its disk.
        if !greeted || disk_bytes.is_some() {
            guest
                .vm
                .channel()
                .send_hello_growing(disk_bytes, inner.cfg.boot_timeout)
                .map_err(|e| GuestError::Failed(e.to_string()))?;
        }
        inner.counters.created.fetch_add(1, Ordering::Relaxed);
        Ok(guest)
    }

    fn capacity_json(&self) -> serde_json::Value {
        let inner = &self.inner;
        let c = &inner.counters;
        let (total, avail) = admission::host_meminfo_mib().unwrap_or((0, 0));
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
            "network": inner.net.as_ref().map_or_else(|| serde_json::json!({"enabled": false}), HostNet::figures),
            "templates": templates,
            "pool_hits": c.pool_hits.load(Ordering::Relaxed),
            "pool_misses": c.pool_misses.load(Ordering::Relaxed),
            "live_vms": inner.admission.live(),
            "created_total": created,
            "forks_total": c.forks.load(Ordering::Relaxed),
            "fork_children_total": c.fork_children.load(Ordering::Relaxed),
            "max_sandboxes": inner.cfg.max_sandboxes,
            "guest_ram_mib": inner.cfg.guest_ram_mib,
            "ram_sizes_built_mib": inner.sized.built().iter().map(|(n, m)| json!({"template": n, "ram_mib": m})).collect::<Vec<_>>(),
            "host_memory_total_mib": total,
            "host_memory_available_mib": avail,
            "memory_limit_mib": inner.cfg.max_guest_memory_mib,
            "memory_floor_mib": inner.admission.floor_mib(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_bounds_the_sandbox_count() {
        // A shell's 20,000 holds the 1,000 the density target asks for.
        assert_eq!(sandboxes_fitting(20_000, 1), 1265);
        assert_eq!(sandboxes_fitting(20_000, 2), 1186);
        assert_eq!(sandboxes_fitting(1 << 20, 1), 69_836);
        assert_eq!(sandboxes_fitting(1024, 1), 0, "nothing left after the reserve");
        assert_eq!(sandboxes_fitting(0, 1), 0);
    }
}

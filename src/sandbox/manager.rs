//! The sandbox registry: ids, lifecycle (create, destroy, lifetime and idle
//! reaping), the per-sandbox exec queue and replay ring, and the stream limit.

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::exec::ExecStream;
use super::instance::{lock, Expiry, Sandbox, StreamSlot};
use super::params::{CreateParams, PtyCommand, PtyReadParams, PtySpec, ResumeParams};
use super::pty::{PtySession, PtySessions, PtyStream};
use super::SandboxError;
use crate::config::Config;
use crate::guest::{GuestError, GuestFactory, GuestSpec, Language, PtyStart};
use base64::Engine;
use crate::obs::metrics::{Op, Outcome, Snapshot};
use crate::obs::{Logger, Metrics};
use crate::seccomp::{self, ThreadKind};

/// How often the reaper looks for expired sandboxes and memory pressure.
const REAP_INTERVAL: Duration = Duration::from_millis(250);
/// Sandboxes destroyed for memory in one reaper tick at most (the next tick
/// looks again): freeing a guest's memory takes effect at once, so a few
/// are enough unless many guests grow at once.
const MAX_RELIEF_PER_TICK: usize = 8;
/// hostd's free heap goes back to the kernel at most this often, and only
/// after sandboxes were destroyed.
const HEAP_TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// A persistent sandbox whose freeze failed (disk full, say) runs on and
/// is tried again after its idle time, but not sooner than this.
const FREEZE_RETRY: Duration = Duration::from_secs(30);

/// 128 bits from the kernel CSPRNG as 32 hex digits.
fn random_hex32() -> Result<String, SandboxError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| SandboxError::Internal(format!("reading /dev/urandom: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// All sandboxes of this host.
pub struct Manager {
    factory: Arc<dyn GuestFactory>,
    cfg: Config,
    log: Logger,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    streams: Arc<AtomicUsize>,
    /// Sandboxes destroyed since hostd's free heap last went back.
    destroyed_since_trim: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Manager {
    /// A manager creating guests with `factory`, limited by `cfg`. Starts the
    /// reaper thread, which ends when the manager is dropped.
    pub fn new(factory: Arc<dyn GuestFactory>, cfg: &Config, log: Logger) -> Arc<Manager> {
        let m = Arc::new(Manager {
            factory,
            cfg: cfg.clone(),
            log: log.clone(),
            sandboxes: Mutex::new(HashMap::new()),
            streams: Arc::new(AtomicUsize::new(0)),
            destroyed_since_trim: AtomicUsize::new(0),
            metrics: Arc::new(Metrics::new()),
        });
        let weak = Arc::downgrade(&m);
        let reaper_log = log.clone();
        let spawned = std::thread::Builder::new().name("reaper".into()).spawn(move || reaper(weak, &reaper_log));
        if let Err(e) = spawned {
            log.error("cannot start the reaper thread; sandboxes will not expire", &[("cause", json!(e.to_string()))]);
        }
        m
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The metrics every operation here updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts `op`'s outcome (and a capacity refusal's reason).
    fn count<T>(&self, op: Op, r: &Result<T, SandboxError>) {
        match r {
            Ok(_) => self.metrics.operation(op, Outcome::Ok),
            Err(e) => {
                self.metrics.operation(op, e.outcome());
                if let SandboxError::Capacity(reason, _) = e {
                    self.metrics.refused(reason.as_str());
                }
            }
        }
    }

    /// Creates a sandbox: validates the template, starts a guest, registers it.
    pub fn create(&self, p: &CreateParams) -> Result<Arc<Sandbox>, SandboxError> {
        let started = Instant::now();
        let r = self.create_inner(p);
        self.count(Op::Create, &r);
        if r.is_ok() {
            self.metrics.observe_create(started.elapsed());
        }
        r
    }

    fn create_inner(&self, p: &CreateParams) -> Result<Arc<Sandbox>, SandboxError> {
        let template = p.template.clone().unwrap_or_else(|| "default".into());
        let served = self.factory.templates();
        if !served.contains(&template) {
            return Err(SandboxError::UnknownTemplate { template, served });
        }
        let id = format!("sbx_{}", random_hex32()?);
        // Asked for (at most the host's maximum), else the host's default;
        // the VMM rounds it up to a size it builds.
        let ram_mib = Some(self.cfg.ram_mib.resolve(p.ram_mib));
        let rootfs_gb = Some(self.cfg.rootfs_gb.resolve(p.rootfs_gb));
        let spec = GuestSpec { template: template.clone(), egress: p.egress, sandbox_id: id.clone(), ram_mib, rootfs_gb };
        // Guest creation can take a while (restore); no lock is held.
        let guest = self.factory.create(&spec).map_err(SandboxError::from_guest)?;
        let sb = Arc::new(Sandbox::new(
            id,
            template,
            p.persistent,
            p.egress,
            Duration::from_secs(self.cfg.timeout_seconds.resolve(p.timeout_seconds)),
            Duration::from_secs(self.cfg.idle_timeout_seconds.resolve(p.idle_timeout_seconds)),
            guest,
            self.cfg.replay_max_bytes,
        ));
        lock(&self.sandboxes).insert(sb.id().to_string(), Arc::clone(&sb));
        self.log.info(
            "sandbox created",
            &[
                ("sandbox", json!(sb.id())),
                ("template", json!(sb.template())),
                ("timeout_s", json!(sb.lifetime().as_secs())),
                ("idle_timeout_s", json!(sb.idle().as_secs())),
                ("ram_mib", json!(sb.guest().and_then(|g| g.ram_mib()))),
                ("rootfs_gb", json!(self.cfg.rootfs_gb.resolve(p.rootfs_gb))),
                ("egress", json!(p.egress)),
                ("persistent", json!(p.persistent)),
            ],
        );
        Ok(sb)
    }

    /// Forks `id` into `n` new sandboxes: each starts from the parent's
    /// memory, processes and files, and inherits its template, egress,
    /// persistence, lifetime and idle limit (its clocks start now). All or
    /// nothing.
    pub fn fork(&self, id: &str, n: u32) -> Result<Vec<Arc<Sandbox>>, SandboxError> {
        let started = Instant::now();
        let r = self.fork_inner(id, n);
        self.count(Op::Fork, &r);
        if r.is_ok() {
            self.metrics.observe_fork(started.elapsed());
        }
        r
    }

    fn fork_inner(&self, id: &str, n: u32) -> Result<Vec<Arc<Sandbox>>, SandboxError> {
        let parent = self.get(id)?;
        let guest = parent.guest().ok_or_else(|| SandboxError::UnknownSandbox(id.to_string()))?;
        let ids = (0..n).map(|_| random_hex32().map(|h| format!("sbx_{h}"))).collect::<Result<Vec<_>, _>>()?;
        let specs: Vec<GuestSpec> = ids
            .iter()
            .map(|c| GuestSpec { template: parent.template().to_string(), egress: parent.egress(), sandbox_id: c.clone(), ram_mib: None, rootfs_gb: None })
            .collect();
        let started = Instant::now();
        // No lock is held: the parent runs on, other sandboxes are untouched.
        let guests = guest.fork(&specs).map_err(SandboxError::from_guest)?;
        let children: Vec<Arc<Sandbox>> = ids
            .into_iter()
            .zip(guests)
            .map(|(child, g)| {
                Arc::new(Sandbox::new(
                    child,
                    parent.template().to_string(),
                    parent.persistent(),
                    parent.egress(),
                    parent.lifetime(),
                    parent.idle(),
                    g,
                    self.cfg.replay_max_bytes,
                ))
            })
            .collect();
        // Running terminal sessions carry over: each child's guest runs its
        // copy of them.
        for c in &children {
            if let Some(g) = c.guest() {
                c.ptys().inherit(parent.ptys(), g.as_ref(), &self.log);
            }
        }
        {
            let mut map = lock(&self.sandboxes);
            for c in &children {
                map.insert(c.id().to_string(), Arc::clone(c));
            }
        }
        self.log.info(
            "sandbox forked",
            &[
                ("sandbox", json!(id)),
                ("children", json!(children.iter().map(|c| c.id()).collect::<Vec<_>>())),
                ("ms", json!(started.elapsed().as_secs_f64() * 1e3)),
            ],
        );
        Ok(children)
    }

    /// Makes `parent` drive `winner`'s VM: the winner id goes away, the
    /// parent's old VM is destroyed (an exec running on it ends with a
    /// message saying so), queued execs of the parent run on the new VM.
    pub fn merge(&self, parent: &str, winner: &str) -> Result<(), SandboxError> {
        let r = self.merge_inner(parent, winner);
        self.count(Op::Merge, &r);
        r
    }

    fn merge_inner(&self, parent: &str, winner: &str) -> Result<(), SandboxError> {
        let (p, w) = (self.get(parent)?, self.get(winner)?);
        if p.template() != w.template() {
            return Err(SandboxError::MergeAcrossTemplates {
                parent: parent.to_string(),
                parent_template: p.template().to_string(),
                winner: winner.to_string(),
                winner_template: w.template().to_string(),
            });
        }
        let w = lock(&self.sandboxes).remove(winner).ok_or_else(|| SandboxError::UnknownSandbox(winner.to_string()))?;
        let guest = w.take_guest().ok_or_else(|| SandboxError::UnknownSandbox(winner.to_string()))?;
        guest.relabel(parent);
        let old = match p.replace_guest(guest, w.egress()) {
            Ok(old) => old,
            Err(guest) => {
                // The parent was deleted meanwhile: the winner goes too.
                guest.shutdown("merge_into: the parent sandbox was deleted meanwhile");
                self.destroyed_since_trim.fetch_add(1, Ordering::Relaxed);
                return Err(SandboxError::UnknownSandbox(parent.to_string()));
            }
        };
        old.shutdown(&format!("the sandbox was replaced by merge_into: it now runs {winner}'s state"));
        self.destroyed_since_trim.fetch_add(1, Ordering::Relaxed);
        self.metrics.destroyed("merged", 1);
        self.log.info("sandbox merged", &[("sandbox", json!(parent)), ("winner", json!(winner))]);
        Ok(())
    }

    /// The live sandbox `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, SandboxError> {
        lock(&self.sandboxes).get(id).cloned().ok_or_else(|| SandboxError::UnknownSandbox(id.to_string()))
    }

    /// Number of live sandboxes.
    pub fn live(&self) -> usize {
        lock(&self.sandboxes).len()
    }

    /// Removes `id` and destroys its VM (a running exec ends with a failure).
    pub fn destroy(&self, id: &str) -> Result<(), SandboxError> {
        let r = self.destroy_inner(id);
        self.count(Op::Delete, &r);
        if r.is_ok() {
            self.metrics.destroyed("delete", 1);
        }
        r
    }

    fn destroy_inner(&self, id: &str) -> Result<(), SandboxError> {
        let sb = lock(&self.sandboxes).remove(id).ok_or_else(|| SandboxError::UnknownSandbox(id.to_string()))?;
        self.destroyed_since_trim.fetch_add(1, Ordering::Relaxed);
        // Outside the registry lock: tearing down a VM takes time.
        sb.destroy_guest("the sandbox was deleted");
        self.log.info("sandbox destroyed", &[("sandbox", json!(id)), ("reason", json!("delete"))]);
        Ok(())
    }

    fn acquire_stream(&self, sb: &Sandbox) -> Result<(StreamSlot, StreamSlot), SandboxError> {
        let per = self.cfg.max_streams_per_sandbox;
        let mine = StreamSlot::acquire(sb.streams(), per).ok_or_else(|| {
            self.metrics.refused("sandbox_streams");
            SandboxError::TooManySandboxStreams { max: per }
        })?;
        let max = self.cfg.max_streams;
        let host = StreamSlot::acquire(&self.streams, max).ok_or_else(|| {
            self.metrics.refused("streams");
            SandboxError::TooManyStreams { max }
        })?;
        Ok((host, mine))
    }

    /// Queues an exec on `id`. The stream runs it when earlier execs are done.
    pub fn exec(&self, id: &str, language: Language, code: String) -> Result<ExecStream, SandboxError> {
        let sb = self.get(id)?;
        let bytes = crate::guest::exec_request_len(language, &code);
        if bytes > crate::guest::MAX_FRAME_PAYLOAD {
            return Err(SandboxError::CodeTooLarge { bytes, limit: crate::guest::MAX_FRAME_PAYLOAD });
        }
        let slot = self.acquire_stream(&sb)?;
        Ok(ExecStream::new(sb, language, code, self.cfg.keepalive, slot, Arc::clone(&self.metrics)))
    }

    /// Starts a terminal session in `id`; the stream gives `pty_ready` (or
    /// `pty_error`), its output, then `pty_exit`.
    pub fn pty_create(&self, id: &str, spec: &PtySpec) -> Result<PtyStream, SandboxError> {
        let sb = self.get(id)?;
        let guest = sb.guest().ok_or_else(|| SandboxError::UnknownSandbox(id.to_string()))?;
        let (argv, label) = match &spec.command {
            PtyCommand::Shell(cmd) => (vec!["bash".into(), "-lc".into(), cmd.clone()], cmd.clone()),
            PtyCommand::Argv(argv) => (argv.clone(), argv.join(" ")),
            PtyCommand::LoginShell => (vec!["bash".into(), "-l".into()], "bash -l".into()),
        };
        let slot = self.acquire_stream(&sb)?;
        let start = PtyStart { argv, cols: spec.cols, rows: spec.rows, cwd: spec.cwd.clone(), env: spec.env.clone() };
        let (rx, control) = guest.pty(&start).map_err(SandboxError::from_guest)?;
        let pty_id = format!("pty_{}", &random_hex32()?[..16]);
        let stream = sb.ptys().start(pty_id.clone(), label, rx, control, self.cfg.keepalive, slot, &self.log).map_err(|_| {
            self.metrics.refused("pty_sessions");
            SandboxError::TooManyPtySessions { max: super::pty::MAX_SESSIONS }
        })?;
        sb.touch();
        self.log.info("pty session started", &[("sandbox", json!(id)), ("pty", json!(pty_id))]);
        Ok(stream)
    }

    fn pty(&self, id: &str, pty: &str) -> Result<(Arc<Sandbox>, Arc<PtySession>), SandboxError> {
        let sb = self.get(id)?;
        let session = sb.ptys().get(pty).ok_or_else(|| SandboxError::UnknownPty(pty.to_string()))?;
        Ok((sb, session))
    }

    /// `GET /v1/sandboxes/{id}/pty`: every session, with exit codes.
    pub fn pty_list(&self, id: &str) -> Result<Value, SandboxError> {
        Ok(Value::Array(self.get(id)?.ptys().list()))
    }

    /// Types `data` into a session (ignored by the guest once it ended).
    pub fn pty_input(&self, id: &str, pty: &str, data: &[u8]) -> Result<(), SandboxError> {
        let (sb, s) = self.pty(id, pty)?;
        sb.touch();
        s.control().input(data).map_err(SandboxError::from_guest)
    }

    /// Resizes a session's terminal.
    pub fn pty_resize(&self, id: &str, pty: &str, cols: u16, rows: u16) -> Result<(), SandboxError> {
        let (sb, s) = self.pty(id, pty)?;
        sb.touch();
        s.control().resize(cols, rows).map_err(SandboxError::from_guest)
    }

    /// SIGKILL to a session's process group.
    pub fn pty_kill(&self, id: &str, pty: &str) -> Result<(), SandboxError> {
        let (sb, s) = self.pty(id, pty)?;
        sb.touch();
        s.control().kill().map_err(SandboxError::from_guest)
    }

    /// Another client on a session: its replay, then live events.
    pub fn pty_attach(&self, id: &str, pty: &str) -> Result<PtyStream, SandboxError> {
        let (sb, s) = self.pty(id, pty)?;
        let slot = self.acquire_stream(&sb)?;
        Ok(PtySessions::attach(&s, self.cfg.keepalive, slot))
    }

    /// Long-poll read of a session's output.
    pub fn pty_read(&self, id: &str, pty: &str, p: &PtyReadParams) -> Result<Value, SandboxError> {
        let (sb, s) = self.pty(id, pty)?;
        sb.touch();
        let max = usize::try_from(p.max_bytes).unwrap_or(usize::MAX);
        let (data, next_seq, exited, exit_code) = s.read(p.since_seq, max, Duration::from_millis(p.timeout_ms));
        Ok(json!({
            "data_b64": base64::engine::general_purpose::STANDARD.encode(data),
            "next_seq": next_seq,
            "exited": exited,
            "exit_code": exit_code,
        }))
    }

    /// The replay ring of `id` as NDJSON.
    pub fn replay(&self, id: &str) -> Result<Vec<u8>, SandboxError> {
        Ok(self.get(id)?.replay_ndjson())
    }

    /// The `GET /v1/capacity` document (shape documented in the README).
    pub fn capacity(&self) -> Value {
        let sandboxes: Vec<Arc<Sandbox>> = lock(&self.sandboxes).values().cloned().collect();
        let private: u64 = sandboxes.iter().map(|s| s.private_memory_bytes()).sum();
        let busy = sandboxes.iter().filter(|s| s.busy()).count();
        json!({
            "sandboxes": { "live": sandboxes.len(), "busy": busy },
            "streams": { "active": self.streams.load(Ordering::Acquire), "max": self.cfg.max_streams },
            "guest_private_memory_bytes": private,
            "templates": self.factory.templates(),
            "vmm": self.factory.capacity(),
            "spaces": self.factory.spaces(),
        })
    }

    /// The live figures of a metrics scrape.
    pub fn metrics_snapshot(&self) -> Snapshot {
        let sandboxes: Vec<Arc<Sandbox>> = lock(&self.sandboxes).values().cloned().collect();
        let vmm = self.factory.capacity();
        let count = |key: &str| vmm.get(key).and_then(Value::as_u64).unwrap_or(0);
        let pool_ready = vmm
            .get("templates")
            .and_then(Value::as_object)
            .map_or(0, |t| t.values().filter_map(|v| v.get("pool_ready").and_then(Value::as_u64)).sum());
        Snapshot {
            sandboxes_live: sandboxes.len() as u64,
            sandboxes_busy: sandboxes.iter().filter(|s| s.busy()).count() as u64,
            guest_private_memory_bytes: sandboxes.iter().map(|s| s.private_memory_bytes()).sum(),
            streams_open: self.streams.load(Ordering::Acquire) as u64,
            pool_hits: count("pool_hits"),
            pool_misses: count("pool_misses"),
            pool_ready,
            vm_threads_cpu: self.factory.vm_threads_cpu(),
        }
    }

    /// The `GET /v1/sandboxes` document: every live sandbox, oldest first.
    pub fn list(&self) -> Value {
        let mut sandboxes: Vec<Arc<Sandbox>> = lock(&self.sandboxes).values().cloned().collect();
        sandboxes.sort_by_key(|s| s.created_at());
        let (now, wall) = (Instant::now(), std::time::SystemTime::now());
        json!({ "sandboxes": sandboxes.iter().map(|s| s.info(now, wall)).collect::<Vec<_>>() })
    }

    /// The `GET /v1/sandboxes/{id}` document.
    pub fn info(&self, id: &str) -> Result<Value, SandboxError> {
        Ok(self.get(id)?.info(Instant::now(), std::time::SystemTime::now()))
    }

    /// While the host is short of memory (guests dirtied more than it can
    /// hold), destroys the sandbox holding the most guest memory, then looks
    /// again; at most [`MAX_RELIEF_PER_TICK`] per call. Returns how many.
    pub fn relieve_memory(&self) -> usize {
        let mut destroyed = 0;
        while destroyed < MAX_RELIEF_PER_TICK {
            let Some(short_mib) = self.factory.memory_pressure() else { break };
            let victim = {
                let mut map = lock(&self.sandboxes);
                let biggest = map
                    .values()
                    .map(|s| (s.private_memory_bytes(), s.id().to_string()))
                    .max()
                    .map(|(_, id)| id);
                biggest.and_then(|id| map.remove(&id))
            };
            let Some(sb) = victim else { break };
            let held = sb.private_memory_bytes();
            sb.destroy_guest("the host ran short of memory and this sandbox held the most");
            destroyed += 1;
            self.metrics.destroyed("host_memory", 1);
            self.destroyed_since_trim.fetch_add(1, Ordering::Relaxed);
            self.log.warn(
                "sandbox destroyed: host memory is low",
                &[
                    ("sandbox", json!(sb.id())),
                    ("reason", json!("host_memory")),
                    ("guest_private_bytes", json!(held)),
                    ("short_mib", json!(short_mib)),
                ],
            );
        }
        destroyed
    }

    /// hostd is stopping: freezes every persistent sandbox into a space
    /// (first, while the shutdown's time bound is fresh), then destroys the
    /// rest: running execs end with `why` and exit 137, queued ones do not
    /// start. Returns how many were destroyed and how many frozen.
    pub fn destroy_all(&self, why: &str) -> (usize, usize) {
        let mut all: Vec<Arc<Sandbox>> = lock(&self.sandboxes).drain().map(|(_, s)| s).collect();
        all.sort_by_key(|s| !s.persistent());
        let (mut destroyed, mut frozen) = (0, 0);
        for sb in &all {
            if sb.persistent() && self.freeze(sb, "shutdown").is_ok() {
                frozen += 1;
                continue;
            }
            sb.destroy_guest(why);
            destroyed += 1;
            self.log.info("sandbox destroyed", &[("sandbox", json!(sb.id())), ("reason", json!("shutdown"))]);
        }
        self.metrics.destroyed("shutdown", destroyed as u64);
        (destroyed, frozen)
    }

    /// Destroys every sandbox past its lifetime or idle time (a persistent
    /// one is frozen into a space instead); returns how many went.
    pub fn reap(&self, now: Instant) -> usize {
        let expired: Vec<(Arc<Sandbox>, Expiry)> = {
            let mut map = lock(&self.sandboxes);
            let ids: Vec<(String, Expiry)> =
                map.values().filter_map(|s| s.expiry(now).map(|e| (s.id().to_string(), e))).collect();
            ids.into_iter().filter_map(|(id, e)| map.remove(&id).map(|s| (s, e))).collect()
        };
        let mut gone = 0;
        for (sb, why) in &expired {
            let reason = match why {
                Expiry::Lifetime => "timeout_seconds",
                Expiry::Idle => "idle_timeout_seconds",
            };
            let frozen = if sb.persistent() { Some(self.freeze(sb, reason)) } else { None };
            match frozen {
                Some(Ok(_)) => {}
                // A guest that cannot freeze at all (not a VM, or one that
                // has failed) goes as before.
                Some(Err(e @ (SandboxError::NotImplemented(_) | SandboxError::Guest(GuestError::Failed(_))))) => {
                    sb.destroy_guest(&format!("the sandbox reached its {reason}"));
                    self.metrics.destroyed(reason, 1);
                    self.log.warn(
                        "persistent sandbox destroyed: its guest cannot be frozen",
                        &[("sandbox", json!(sb.id())), ("reason", json!(reason)), ("cause", json!(e.to_string()))],
                    );
                }
                Some(Err(_)) => {
                    // It runs on (the error is logged); back in the registry.
                    sb.postpone_expiry(Instant::now() + sb.idle().max(FREEZE_RETRY));
                    lock(&self.sandboxes).insert(sb.id().to_string(), Arc::clone(sb));
                    continue;
                }
                None => {
                    sb.destroy_guest(&format!("the sandbox reached its {reason}"));
                    self.metrics.destroyed(reason, 1);
                    self.log.info("sandbox destroyed", &[("sandbox", json!(sb.id())), ("reason", json!(reason))]);
                }
            }
            gone += 1;
        }
        self.destroyed_since_trim.fetch_add(gone, Ordering::Relaxed);
        gone
    }

    /// What a space keeps of a sandbox besides its guest: its limits and
    /// flags, and its running terminal sessions.
    fn sandbox_record(sb: &Sandbox) -> Value {
        json!({
            "timeout_seconds": sb.lifetime().as_secs(),
            "idle_timeout_seconds": sb.idle().as_secs(),
            "persistent": sb.persistent(),
            "egress": sb.egress(),
            "ptys": sb.ptys().save(),
        })
    }

    /// Freezes `sb` (already out of the registry) into a space; on success
    /// its guest is gone. `reason` names what expired, for the log.
    fn freeze(&self, sb: &Arc<Sandbox>, reason: &str) -> Result<String, SandboxError> {
        let guest = sb.guest().ok_or_else(|| SandboxError::UnknownSandbox(sb.id().to_string()))?;
        let r = guest.freeze(sb.id(), Self::sandbox_record(sb)).map_err(SandboxError::from_guest);
        self.count(Op::Freeze, &r);
        let space = r?;
        drop(guest);
        sb.destroy_guest("the sandbox was frozen into a space");
        self.metrics.destroyed("frozen", 1);
        self.log.info(
            "sandbox frozen",
            &[("sandbox", json!(sb.id())), ("space", json!(space.id)), ("reason", json!(reason)), ("bytes_on_disk", json!(space.bytes_on_disk))],
        );
        Ok(space.id)
    }

    /// `POST /v1/spaces/{space}/resume`: a NEW sandbox from the space, which
    /// is consumed. Lifetime, idle limit, `persistent` and `egress` are the
    /// request's, as for a create.
    pub fn resume_space(&self, space: &str, p: &ResumeParams) -> Result<Arc<Sandbox>, SandboxError> {
        let started = Instant::now();
        let r = self.resume_inner(space, p);
        self.count(Op::Resume, &r);
        if r.is_ok() {
            self.metrics.observe_create(started.elapsed());
        }
        r
    }

    fn resume_inner(&self, space: &str, p: &ResumeParams) -> Result<Arc<Sandbox>, SandboxError> {
        let id = format!("sbx_{}", random_hex32()?);
        // The template comes from the space; the factory fills it in.
        let spec = GuestSpec { template: String::new(), egress: p.egress, sandbox_id: id.clone(), ram_mib: None, rootfs_gb: None };
        let (guest, info) = self.factory.resume_space(space, &spec).map_err(SandboxError::from_guest)?;
        // Like a create: what the request asks, else the host's defaults
        // (not the frozen sandbox's: a short idle limit that froze it
        // would freeze or end the resumed one as soon).
        let lifetime = self.cfg.timeout_seconds.resolve(p.timeout_seconds);
        let idle = self.cfg.idle_timeout_seconds.resolve(p.idle_timeout_seconds);
        let sb = Arc::new(Sandbox::new(
            id,
            info.template.clone(),
            p.persistent,
            p.egress,
            Duration::from_secs(lifetime),
            Duration::from_secs(idle),
            guest,
            self.cfg.replay_max_bytes,
        ));
        if let (Some(g), Some(ptys)) = (sb.guest(), info.sandbox.get("ptys")) {
            sb.ptys().resume_saved(ptys, g.as_ref(), &self.log);
        }
        lock(&self.sandboxes).insert(sb.id().to_string(), Arc::clone(&sb));
        self.log.info(
            "sandbox resumed from a space",
            &[
                ("sandbox", json!(sb.id())),
                ("space", json!(space)),
                ("source_sandbox", json!(info.source_sandbox)),
                ("template", json!(sb.template())),
                ("timeout_s", json!(lifetime)),
                ("idle_timeout_s", json!(idle)),
                ("persistent", json!(p.persistent)),
                ("egress", json!(p.egress)),
            ],
        );
        Ok(sb)
    }

    /// `DELETE /v1/spaces/{space}`.
    pub fn delete_space(&self, space: &str) -> Result<(), SandboxError> {
        self.factory.delete_space(space).map_err(SandboxError::from_guest)
    }
}

fn reaper(manager: Weak<Manager>, log: &Logger) {
    // Never reap unfiltered. The binary probes every filter at start-up,
    // so this fails only if the kernel changed its mind since.
    if let Err(e) = seccomp::install(ThreadKind::Reaper) {
        log.error("reaper thread stopped; sandboxes will not expire", &[("cause", json!(e.to_string()))]);
        return;
    }
    let mut last_trim = Instant::now();
    loop {
        std::thread::sleep(REAP_INTERVAL);
        let Some(m) = manager.upgrade() else { return };
        m.reap(Instant::now());
        m.relieve_memory();
        if last_trim.elapsed() >= HEAP_TRIM_INTERVAL && m.destroyed_since_trim.swap(0, Ordering::Relaxed) > 0 {
            crate::vmm::memory::release_free_heap();
            last_trim = Instant::now();
        }
    }
}

//! One virtual machine: KVM fds, guest memory, devices, its device thread and
//! its vCPU threads. Built by a cold boot or by restoring a snapshot.
//!
//! Creation order (both paths): VM fd -> TSS address -> memory slots (before
//! the irqchip: later slots cost more on this host) -> irqchip -> PIT ->
//! devices (irqfds, ioeventfds, buses) -> vCPUs -> threads started paused ->
//! resume.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use super::boot;
use super::channel::{Channel, ChannelSeed};
use super::device_manager::{self, Backends, BusKind, DeviceManager, DevicesState};
use super::memory;
use super::scratch::{self, ScratchDisk};
use super::state::{msrs_to_save, VcpuState, VmState};
use super::vcpu::{VcpuCommand, VcpuContext, VcpuHandle, VcpuReply};
use super::{Backend, VmStatus, VmmError};
use crate::devices::serial::ConsoleLog;
use crate::devices::GuestMemory;
use crate::seccomp::{self, ThreadKind};

const TSS_ADDR: usize = 0xfffb_d000;

/// Fork image layers a VM stacks over its template before its next fork
/// folds them into one. Each layer adds its runs as mappings to every VM
/// that maps it, and keeps pages alive that later layers cover; a fork that
/// folds pays a full copy of the VM's own pages once.
pub const MAX_FORK_LAYERS: usize = 8;

/// Mappings a VM's layers may add in all (the runs of their
/// [`memory::layer_plan`]) before its next fork folds them, whatever their
/// number, so the mappings per VM stay bounded (see
/// the factory's `vm.max_map_count`).
pub const MAX_LAYER_RUNS: usize = 384;
const CONSOLE_LOG_BYTES: usize = 64 << 10;
/// How long a vCPU thread may take to answer a command (pause, resume,
/// save, restore state). It answers between two KVM_RUNs, within
/// microseconds when it gets a CPU; the bound is for a host whose threads
/// wait their turn: 800 sandboxes being created on 2 cores once saw a
/// resume wait past 5 s.
const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a VM is made of, apart from its memory.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// vmlinux.
    pub kernel: PathBuf,
    /// Read-only base image.
    pub rootfs: PathBuf,
    /// Guest RAM.
    pub ram_bytes: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Which KVM we run on.
    pub backend: Backend,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// The file system the writable disk starts as (copied; the template
    /// build's is the empty one [`scratch::pristine_image`] makes). None: an
    /// empty disk, and the guest writes into RAM.
    pub disk: Option<PathBuf>,
}

/// The disks a VM is given: the shared read-only base image and its own
/// writable disk.
pub struct Disks {
    /// The base image (the very file a snapshot was taken with: its cached
    /// blocks live in guest memory).
    pub rootfs: Arc<File>,
    /// The VM's own writable disk, as it was when its memory was saved.
    pub disk: ScratchDisk,
}

/// Full saved state of a VM except its memory.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// One per vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
}

/// A VM frozen into a file: what a resume needs besides that file.
pub struct Frozen {
    /// vCPU, VM and device state.
    pub machine: MachineState,
    /// The channel's next stream number (nothing else was in flight).
    pub next_stream: u32,
    /// The guest pages the file holds (everything else is the template's).
    pub runs: Vec<memory::PageRun>,
    /// Non-zero bytes written.
    pub data_bytes: u64,
    /// Checksum of the writable disk written beside it
    /// ([`scratch::checksum`]).
    pub disk_crc32: u32,
    /// How long the vCPUs have been stopped when this returns.
    pub paused: Duration,
}

/// A running VM captured for a fork: what every child is restored from.
pub struct ForkSource {
    /// vCPU, VM and device state at the capture.
    pub machine: MachineState,
    /// Where each child's channel starts.
    pub channel: ChannelSeed,
    /// The parent's writable disk at the capture; each child gets a copy.
    pub disk: ScratchDisk,
    /// The image layers, in order, a child maps over the template (the last
    /// one new with this fork, unless the parent wrote nothing since its
    /// previous fork).
    pub layers: Vec<Arc<memory::ForkImage>>,
    /// What a child maps, computed once: runs of guest pages and the layer
    /// each comes from ([`memory::layer_plan`]).
    pub plan: Vec<(memory::PageRun, usize)>,
    /// Non-zero bytes this fork copied into its new layer.
    pub copied_bytes: u64,
    /// Mappings the new layer adds to each VM.
    pub copied_runs: usize,
    /// Whether this fork folded the parent's layers into one.
    pub folded: bool,
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// How long the parent's vCPUs were stopped.
    pub paused: Duration,
}

/// A running (or paused) VM. Dropping it stops every thread and frees all.
pub struct Vm {
    name: String,
    vcpus: Vec<VcpuHandle>,
    device_thread: Option<JoinHandle<()>>,
    devices: DeviceManager,
    channel: Channel,
    status: Arc<VmStatus>,
    console_log: Arc<ConsoleLog>,
    /// Its writable disk (the device writes through its own descriptor).
    disk: ScratchDisk,
    /// The fork image layers mapped over the template file, in order
    /// (empty until this VM forks or, for a fork child, its parent's).
    /// Holding them keeps their files open for the next fork's children.
    overlay: Mutex<Vec<Arc<memory::ForkImage>>>,
    /// One fork of this VM at a time.
    forking: Mutex<()>,
    // Order matters for teardown: the VM fd (and with it every memory slot)
    // closes before the memory it points at is unmapped.
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm { what, source: e }
}

/// The guest kernel command line for our device layout.
pub fn kernel_cmdline(backend: Backend, extra: &str) -> String {
    boot::cmdline(backend, &device_manager::virtio_mmio_devices(), extra)
}

fn new_vm_fd(kvm: &Kvm, mem: &GuestMemory) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    memory::register_slots(&vm, mem)?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Opens a base image read-only; the error names the file.
pub fn open_rootfs(path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })
}

impl Vm {
    /// Cold-boots a VM from a kernel and a base image.
    pub fn boot(kvm: &Kvm, name: &str, spec: &VmSpec) -> Result<Vm, VmmError> {
        if !spec.kernel.is_file() {
            return Err(VmmError::File {
                path: spec.kernel.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "guest kernel not found (run scripts/setup)"),
            });
        }
        let cmdline = kernel_cmdline(spec.backend, &spec.extra_cmdline);
        let kernel = spec.kernel.clone();
        Vm::boot_with(kvm, name, spec, move |mem| {
            let entry = boot::load_kernel(mem, &kernel)?;
            boot::write_boot_structures(mem, &cmdline, spec.vcpus)?;
            Ok(entry)
        })
    }

    /// Boots a hand-made guest: `code` runs in 64-bit mode at 0x1000 with the
    /// same devices, threads and teardown as a Linux guest. For VMM tests.
    pub fn boot_code(kvm: &Kvm, name: &str, spec: &VmSpec, code: &[u8]) -> Result<Vm, VmmError> {
        let code = code.to_vec();
        Vm::boot_with(kvm, name, spec, move |mem| {
            boot::write_boot_structures(mem, "", spec.vcpus)?;
            use vm_memory::Bytes;
            mem.write_slice(&code, vm_memory::GuestAddress(0x1000))
                .map_err(|e| boot::BootError::Memory(e.to_string()))?;
            Ok(vm_memory::GuestAddress(0x1000))
        })
    }

    fn boot_with(
        kvm: &Kvm,
        name: &str,
        spec: &VmSpec,
        load: impl FnOnce(&GuestMemory) -> Result<vm_memory::GuestAddress, boot::BootError>,
    ) -> Result<Vm, VmmError> {
        let rootfs = Arc::new(open_rootfs(&spec.rootfs)?);
        let disk = match &spec.disk {
            Some(base) => {
                let dir = base.parent().unwrap_or(Path::new("/"));
                let file = File::open(base).map_err(|e| VmmError::File { path: base.display().to_string(), source: e })?;
                ScratchDisk::copy_of(&file, dir, scratch::BASE_FS_BYTES)
                    .map_err(|e| VmmError::File { path: dir.display().to_string(), source: e })?
            }
            None => ScratchDisk::empty(&std::env::temp_dir()).map_err(VmmError::Io)?,
        };
        if spec.vcpus == 0 {
            return Err(VmmError::Config("at least one vCPU is needed".into()));
        }
        let mem = memory::anonymous(spec.ram_bytes)?;
        let vm_fd = new_vm_fd(kvm, &mem)?;
        let entry = load(&mem)?;
        let channel = Channel::new();
        let log = ConsoleLog::new(CONSOLE_LOG_BYTES);
        let backends = Backends::new(rootfs, &disk, &channel, log.clone())?;
        let devices = DeviceManager::build(&vm_fd, &mem, backends, None)?;
        let supported = boot::supported_msrs(kvm)?;
        let mut fds = Vec::new();
        for i in 0..spec.vcpus {
            let fd = vm_fd.create_vcpu(u64::from(i)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&boot::cpuid_for(kvm, spec.backend, i, spec.vcpus)?)
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            boot::setup_msrs(&fd, &supported)?;
            if i == 0 {
                boot::setup_registers(&fd, entry)?;
            }
            boot::setup_lapic(&fd)?;
            fds.push(fd);
        }
        let vm = Vm::start_paused(name, vm_fd, mem, devices, channel, log, disk, fds, msrs_to_save(&supported))?;
        vm.resume()?;
        Ok(vm)
    }

    /// Restores a VM from saved state and a memory object (usually a private
    /// mapping of a snapshot's memory file). `disks.rootfs` must be the very
    /// image the snapshot was taken with (its cached blocks live in guest
    /// memory), so callers pass an open file rather than a path that may be
    /// rebuilt; `disks.disk` a copy of the writable disk saved with it.
    /// The VM starts paused; call [`Vm::resume`].
    pub fn restore(
        kvm: &Kvm,
        name: &str,
        disks: Disks,
        mem: GuestMemory,
        state: &MachineState,
    ) -> Result<Vm, VmmError> {
        Vm::restore_with(kvm, name, disks, mem, state, Channel::new())
    }

    /// Restores a fork child: `mem` is the template mapping with the
    /// source's image laid over it, and the channel continues the parent's.
    /// The VM starts paused.
    pub fn restore_fork_child(
        kvm: &Kvm,
        name: &str,
        disks: Disks,
        mem: GuestMemory,
        source: &ForkSource,
    ) -> Result<Vm, VmmError> {
        let vm = Vm::restore_with(kvm, name, disks, mem, &source.machine, Channel::start_from(&source.channel))?;
        *vm.overlay.lock().unwrap_or_else(PoisonError::into_inner) = source.layers.clone();
        Ok(vm)
    }

    /// Restores a frozen space: `mem` is the template mapping with the
    /// space's `image` laid over it; the VM keeps the image as its one layer
    /// (its pages are the VM's own for a later fork or freeze). The VM
    /// starts paused.
    pub fn restore_space(
        kvm: &Kvm,
        name: &str,
        disks: Disks,
        mem: GuestMemory,
        machine: &MachineState,
        next_stream: u32,
        image: Arc<memory::ForkImage>,
    ) -> Result<Vm, VmmError> {
        let channel = Channel::start_from(&ChannelSeed::at_stream(next_stream));
        let vm = Vm::restore_with(kvm, name, disks, mem, machine, channel)?;
        *vm.overlay.lock().unwrap_or_else(PoisonError::into_inner) = vec![image];
        Ok(vm)
    }

    fn restore_with(
        kvm: &Kvm,
        name: &str,
        disks: Disks,
        mem: GuestMemory,
        state: &MachineState,
        channel: Channel,
    ) -> Result<Vm, VmmError> {
        let vm_fd = new_vm_fd(kvm, &mem)?;
        let age_ns = state.vm.age_ns();
        state.vm.restore(&vm_fd, age_ns)?;
        let log = ConsoleLog::new(CONSOLE_LOG_BYTES);
        let Disks { rootfs, disk } = disks;
        let backends = Backends::new(rootfs, &disk, &channel, log.clone())?;
        let devices = DeviceManager::build(&vm_fd, &mem, backends, Some(&state.devices))?;
        let supported = boot::supported_msrs(kvm)?;
        let mut fds = Vec::new();
        for (i, vs) in state.vcpus.iter().enumerate() {
            let fd = vm_fd.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vs.restore(&fd, age_ns)?;
            fds.push(fd);
        }
        Vm::start_paused(name, vm_fd, mem, devices, channel, log, disk, fds, msrs_to_save(&supported))
    }

    #[allow(clippy::too_many_arguments)]
    fn start_paused(
        name: &str,
        vm_fd: VmFd,
        mem: GuestMemory,
        devices: DeviceManager,
        channel: Channel,
        log: Arc<ConsoleLog>,
        disk: ScratchDisk,
        fds: Vec<kvm_ioctls::VcpuFd>,
        msr_indices: Vec<u32>,
    ) -> Result<Vm, VmmError> {
        super::vcpu::install_kick_handler().map_err(VmmError::Config)?;
        let status = Arc::new(VmStatus::new(name, channel.clone()));
        let device_thread = devices.spawn_thread(name, status.clone())?;
        channel.attach(devices.console_handle().clone());
        channel.attach_ring(devices.ring_handle().clone());
        let ctx = Arc::new(VcpuContext {
            pio: Arc::new(devices.bus(BusKind::Pio)?),
            mmio: Arc::new(devices.bus(BusKind::Mmio)?),
            status: status.clone(),
            msr_indices,
            // Each vCPU thread takes its slice and narrows itself before its
            // first KVM_RUN; a filter error fails the VM (see `ThreadStartHook`).
            on_thread_start: Some(Arc::new(|_| {
                super::threads::apply_vcpu_slice();
                seccomp::install(ThreadKind::Vcpu).map_err(|e| e.to_string())
            })),
        });
        let mut vcpus = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            vcpus.push(VcpuHandle::spawn(name, i as u8, fd, ctx.clone()).map_err(VmmError::Io)?);
        }
        Ok(Vm {
            name: name.to_string(),
            vcpus,
            device_thread: Some(device_thread),
            devices,
            channel,
            status,
            console_log: log,
            disk,
            overlay: Mutex::new(Vec::new()),
            forking: Mutex::new(()),
            vm_fd: Arc::new(vm_fd),
            mem,
        })
    }

    fn all_vcpus(&self, cmd: fn() -> VcpuCommand, want: fn(&VcpuReply) -> bool) -> Result<Vec<VcpuReply>, VmmError> {
        let mut replies = Vec::new();
        for v in &self.vcpus {
            let reply = v.command(cmd(), VCPU_REPLY_TIMEOUT).map_err(VmmError::Vcpu)?;
            if !want(&reply) {
                return Err(VmmError::Vcpu(format!("unexpected vCPU reply {reply:?}")));
            }
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Lets every vCPU of every VM in `vms` run, all at once: each is told
    /// before any answer is awaited, so ones already running do not delay
    /// the rest (a fork's children).
    pub fn resume_together(vms: &[&Vm]) -> Result<(), VmmError> {
        let all = || vms.iter().flat_map(|vm| vm.vcpus.iter());
        for v in all() {
            v.post(VcpuCommand::Resume).map_err(VmmError::Vcpu)?;
        }
        for v in all() {
            match v.reply(VCPU_REPLY_TIMEOUT).map_err(VmmError::Vcpu)? {
                VcpuReply::Resumed => {}
                other => return Err(VmmError::Vcpu(format!("unexpected vCPU reply {other:?}"))),
            }
        }
        Ok(())
    }

    /// Lets every vCPU run.
    pub fn resume(&self) -> Result<(), VmmError> {
        self.all_vcpus(|| VcpuCommand::Resume, |r| matches!(r, VcpuReply::Resumed)).map(|_| ())
    }

    /// Stops every vCPU at a clean boundary (no MMIO/PIO half done).
    pub fn pause(&self) -> Result<(), VmmError> {
        self.all_vcpus(|| VcpuCommand::Pause, |r| matches!(r, VcpuReply::Paused)).map(|_| ())
    }

    /// Saves vCPU, VM and device state. The VM must be paused.
    pub fn save_state(&self) -> Result<MachineState, VmmError> {
        let mut vcpus = Vec::new();
        for reply in self.all_vcpus(|| VcpuCommand::Save, |r| matches!(r, VcpuReply::State(_)))? {
            if let VcpuReply::State(s) = reply {
                vcpus.push(*s);
            }
        }
        let vm = VmState::save(&self.vm_fd)?;
        Ok(MachineState { vm, vcpus, devices: self.devices.save() })
    }

    /// Captures this running VM for a fork and lets it run on. With the
    /// device thread held throughout (no device writes guest RAM or changes
    /// state), KVM's dirty log on, and the guest still running, it copies
    /// the pages the VM wrote since its last fork (anonymous ones; zero
    /// pages skipped) into a new image layer. Then it pauses the vCPUs,
    /// copies again what the guest wrote meanwhile, saves the state, maps
    /// the layer copy-on-write over the VM's own RAM too (parent and
    /// children share those pages) and resumes. Children map the template,
    /// then, run by run, the topmost layer holding each page. A VM with
    /// [`MAX_FORK_LAYERS`] layers (or [`MAX_LAYER_RUNS`] mappings for them)
    /// folds them into one (copying every page that is not the template's), so
    /// neither the chain nor the mappings grow without bound. Where KVM has
    /// no dirty log, everything is copied paused.
    pub fn capture_for_fork(&self) -> Result<ForkSource, VmmError> {
        let _one_fork = self.forking.lock().unwrap_or_else(PoisonError::into_inner);
        let _devices_still = self.devices.hold();
        let mut overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let pages = (memory::ram_bytes(&self.mem) / memory::PAGE_BYTES) as usize;
        let fold = overlay.len() >= MAX_FORK_LAYERS || memory::layer_plan(&overlay, pages).len() >= MAX_LAYER_RUNS;
        // Pages already in a layer count as the VM's own only when folding.
        let below: Vec<memory::PageRun> =
            if fold { overlay.iter().flat_map(|l| l.runs.iter().copied()).collect() } else { Vec::new() };
        // The device thread is held from here to the end, so the disk
        // copied now is the disk at the pause below: no request is served
        // in between (ones the guest queues meanwhile are in the saved
        // queues, and the children serve them).
        let disk = self.disk.copy().map_err(|e| VmmError::Guest(format!("copying the writable disk: {e}")))?;
        let mut image = memory::ImageBuilder::new(&self.mem)?;
        let logging = memory::set_dirty_log(&self.vm_fd, &self.mem, true).is_ok();
        let mut copied = None;
        if logging {
            let own = memory::own_pages(&self.mem, &below)?;
            let pre = memory::pages_of(&memory::runs_of(&own), own.len());
            // SAFETY: `mem` stays mapped; what the running guest writes
            // meanwhile is in the dirty log and copied again below.
            unsafe { image.copy(&self.mem, &pre, memory::Zeros::Skip) }?;
            copied = Some(pre);
        }
        let paused_at = Instant::now();
        self.pause()?;
        let captured = (|| {
            let mut own = memory::own_pages(&self.mem, &below)?;
            let (runs, to_copy, zeros) = match &copied {
                Some(pre) => {
                    let dirty = memory::dirty_pages(&self.vm_fd, &self.mem)?;
                    for (o, (d, p)) in own.iter_mut().zip(dirty.iter().zip(pre)) {
                        *o |= *d || *p;
                    }
                    let runs = memory::runs_of(&own);
                    let all = memory::pages_of(&runs, own.len());
                    // Written since the pre-copy, or newly inside a run.
                    let again: Vec<bool> = all.iter().zip(dirty.iter().zip(pre)).map(|(a, (d, p))| *a && (*d || !*p)).collect();
                    (runs, again, memory::Zeros::Write)
                }
                None => {
                    let runs = memory::runs_of(&own);
                    let all = memory::pages_of(&runs, own.len());
                    (runs, all, memory::Zeros::Skip)
                }
            };
            // SAFETY: the vCPUs are paused and the device thread is held, so
            // nothing writes guest RAM now.
            unsafe { image.copy(&self.mem, &to_copy, zeros) }?;
            let machine = self.save_state()?;
            let channel = self.channel.seed();
            let (copied_bytes, copied_runs) = (image.data_bytes(), runs.len());
            if !runs.is_empty() {
                let layer = Arc::new(image.seal(runs)?);
                // SAFETY: as above; the layer holds exactly what those pages
                // hold now, so the guest sees no change.
                unsafe { memory::map_image(&self.mem, &layer) }?;
                if fold {
                    overlay.clear();
                }
                overlay.push(layer);
            }
            Ok::<_, VmmError>((machine, channel, overlay.clone(), copied_bytes, copied_runs))
        })();
        let resumed = self.resume();
        let paused = paused_at.elapsed();
        if logging {
            // Off again, with the guest running: it only drops the log.
            let _ = memory::set_dirty_log(&self.vm_fd, &self.mem, false);
        }
        let (machine, channel, layers, copied_bytes, copied_runs) = captured?;
        resumed?;
        let plan = memory::layer_plan(&layers, pages);
        Ok(ForkSource {
            machine,
            channel,
            disk,
            layers,
            plan,
            copied_bytes,
            copied_runs,
            folded: fold,
            ram_bytes: memory::ram_bytes(&self.mem),
            paused,
        })
    }

    /// Freezes this VM into `file`: with the device thread held and the
    /// vCPUs paused, every page that is not the template's (written pages
    /// and the pages of its layers) is written at its guest offset (zero
    /// pages left as holes), and the state saved. On success the VM stays
    /// paused: the caller makes the file durable, then drops the VM; on an
    /// error it runs on. A guest frame half received (the guest was
    /// mid-send) refuses the freeze: a later try finds it whole.
    pub fn freeze_into(&self, file: File, disk_file: &File) -> Result<Frozen, VmmError> {
        let _one_capture = self.forking.lock().unwrap_or_else(PoisonError::into_inner);
        let _devices_still = self.devices.hold();
        let overlay = self.overlay.lock().unwrap_or_else(PoisonError::into_inner);
        let paused_at = Instant::now();
        self.pause()?;
        let frozen = (|| {
            let next_stream = self
                .channel
                .seed()
                .quiet_next_stream()
                .ok_or_else(|| VmmError::Guest("the guest was sending a frame: freeze again later".into()))?;
            let below: Vec<memory::PageRun> = overlay.iter().flat_map(|l| l.runs.iter().copied()).collect();
            let own = memory::own_pages(&self.mem, &below)?;
            let runs = memory::runs_of(&own);
            let mut image = memory::ImageBuilder::on_file(file, &self.mem)?;
            // SAFETY: the vCPUs are paused and the device thread is held,
            // so nothing writes guest RAM now.
            unsafe { image.copy(&self.mem, &memory::pages_of(&runs, own.len()), memory::Zeros::Skip) }?;
            let machine = self.save_state()?;
            let disk_crc32 =
                self.disk.write_into(disk_file).map_err(|e| VmmError::Guest(format!("writing the disk into the space: {e}")))?;
            Ok::<_, VmmError>(Frozen { machine, next_stream, runs, data_bytes: image.data_bytes(), disk_crc32, paused: Duration::ZERO })
        })();
        match frozen {
            Ok(f) => Ok(Frozen { paused: paused_at.elapsed(), ..f }),
            Err(e) => {
                self.resume()?;
                Err(e)
            }
        }
    }

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// CPU time the vCPU threads have used so far: what the guest costs the
    /// host while it runs (on PVM, mostly its emulated kernel).
    pub fn vcpus_cpu_time(&self) -> Duration {
        self.vcpus.iter().filter_map(VcpuHandle::cpu_time).sum()
    }

    /// Its network card (the factory attaches a sandbox's tap).
    pub fn net(&self) -> &crate::devices::virtio::net::NetHandle {
        self.devices.net_handle()
    }

    /// The writable disk.
    pub fn disk(&self) -> &ScratchDisk {
        &self.disk
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The guest channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Last bytes the guest wrote to its serial console.
    pub fn console_log(&self) -> &Arc<ConsoleLog> {
        &self.console_log
    }

    /// Shutdown or failure reason, if any.
    pub fn status(&self) -> &Arc<VmStatus> {
        &self.status
    }

    /// The VM's name (thread names start with it).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.channel.fail("sandbox destroyed");
        self.devices.console_handle().close();
        for v in &mut self.vcpus {
            v.stop(Duration::from_secs(2));
        }
        self.vcpus.clear();
        self.devices.stop_thread();
        if let Some(t) = self.device_thread.take() {
            let _ = t.join();
        }
    }
}

//! One virtual machine: KVM fds, guest memory, devices, its device thread and
//! its vCPU threads. Built by a cold boot or by restoring a snapshot.
//!
//! Creation order (both paths): VM fd -> TSS address -> memory slots (before
//! the irqchip: later slots cost more on this host) -> irqchip -> PIT ->
//! devices (irqfds, ioeventfds, buses) -> vCPUs -> threads started paused ->
//! resume.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::boot;
use super::memory;
use super::state::{msrs_to_save, VcpuState, VmState};
use super::vcpu::{VcpuCommand, VcpuContext, VcpuHandle, VcpuReply};
use super::{Backend, VmStatus, VmmError};
use super::channel::Channel;
use crate::devices::bus::Bus;
use crate::devices::serial::{ConsoleLog, SerialDevice, SerialState};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::{Console, ConsoleHandle};
use crate::devices::virtio::mmio::{MmioState, MmioTransport, MMIO_LEN, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::DeviceError;
use crate::devices::GuestMemory;

const SERIAL_PORT: u64 = 0x3f8;
const SERIAL_GSI: u32 = 4;
const BLOCK_ADDR: u64 = memory::MMIO_START;
const BLOCK_GSI: u32 = 5;
const CONSOLE_ADDR: u64 = memory::MMIO_START + MMIO_LEN;
const CONSOLE_GSI: u32 = 6;
const TSS_ADDR: usize = 0xfffb_d000;
const CONSOLE_LOG_BYTES: usize = 64 << 10;
/// Names the guest sees for the channel ports (in `/sys/class/virtio-ports`).
const PORT_NAMES: [&str; 2] = ["podflare.agent", "podflare.repl"];

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
}

/// Device state in a snapshot.
#[derive(Clone, Serialize, Deserialize)]
pub struct DevicesState {
    serial: SerialState,
    block: MmioState,
    console: MmioState,
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

struct Devices {
    serial: Arc<Mutex<SerialDevice>>,
    block: Arc<Mutex<MmioTransport>>,
    console: Arc<Mutex<MmioTransport>>,
    /// The console model itself, also reachable outside its transport so
    /// host output can be pushed without going through the transport lock.
    console_dev: Arc<Mutex<Console>>,
    console_handle: ConsoleHandle,
}

/// A running (or paused) VM. Dropping it stops every thread and frees all.
pub struct Vm {
    name: String,
    vcpus: Vec<VcpuHandle>,
    device_thread: Option<JoinHandle<()>>,
    stop: EventFd,
    devices: Devices,
    channel: Channel,
    status: Arc<VmStatus>,
    console_log: Arc<ConsoleLog>,
    // Order matters for teardown: the VM fd (and with it every memory slot)
    // closes before the memory it points at is unmapped.
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm { what, source: e }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The guest kernel command line for our device layout.
pub fn kernel_cmdline(backend: Backend, extra: &str) -> String {
    boot::cmdline(backend, &[(BLOCK_ADDR, BLOCK_GSI), (CONSOLE_ADDR, CONSOLE_GSI)], extra)
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
            boot::write_boot_structures(mem, &cmdline)?;
            Ok(entry)
        })
    }

    /// Boots a hand-made guest: `code` runs in 64-bit mode at 0x1000 with the
    /// same devices, threads and teardown as a Linux guest. For VMM tests.
    pub fn boot_code(kvm: &Kvm, name: &str, spec: &VmSpec, code: &[u8]) -> Result<Vm, VmmError> {
        let code = code.to_vec();
        Vm::boot_with(kvm, name, spec, move |mem| {
            boot::write_boot_structures(mem, "")?;
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
        let rootfs = open_rootfs(&spec.rootfs)?;
        if spec.vcpus == 0 {
            return Err(VmmError::Config("at least one vCPU is needed".into()));
        }
        let mem = memory::anonymous(spec.ram_bytes)?;
        let vm_fd = new_vm_fd(kvm, &mem)?;
        let entry = load(&mem)?;
        let channel = Channel::new();
        let log = ConsoleLog::new(CONSOLE_LOG_BYTES);
        let (devices, notifiers) = build_devices(&vm_fd, &mem, rootfs, &channel, &log, None)?;
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
        let vm = Vm::start_paused(name, vm_fd, mem, devices, notifiers, channel, log, fds, msrs_to_save(&supported))?;
        vm.resume()?;
        Ok(vm)
    }

    /// Restores a VM from saved state and a memory object (usually a private
    /// mapping of a snapshot's memory file). `rootfs` must be the very image
    /// the snapshot was taken with (its cached blocks live in guest memory),
    /// so callers pass an open file rather than a path that may be rebuilt.
    /// The VM starts paused; call [`Vm::resume`].
    pub fn restore(
        kvm: &Kvm,
        name: &str,
        rootfs: File,
        mem: GuestMemory,
        state: &MachineState,
    ) -> Result<Vm, VmmError> {
        let vm_fd = new_vm_fd(kvm, &mem)?;
        let age_ns = state.vm.age_ns();
        state.vm.restore(&vm_fd, age_ns)?;
        let channel = Channel::new();
        let log = ConsoleLog::new(CONSOLE_LOG_BYTES);
        let (devices, notifiers) = build_devices(&vm_fd, &mem, rootfs, &channel, &log, Some(&state.devices))?;
        let supported = boot::supported_msrs(kvm)?;
        let mut fds = Vec::new();
        for (i, vs) in state.vcpus.iter().enumerate() {
            let fd = vm_fd.create_vcpu(i as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vs.restore(&fd, age_ns)?;
            fds.push(fd);
        }
        Vm::start_paused(name, vm_fd, mem, devices, notifiers, channel, log, fds, msrs_to_save(&supported))
    }

    #[allow(clippy::too_many_arguments)]
    fn start_paused(
        name: &str,
        vm_fd: VmFd,
        mem: GuestMemory,
        devices: Devices,
        notifiers: Vec<Notifier>,
        channel: Channel,
        log: Arc<ConsoleLog>,
        fds: Vec<kvm_ioctls::VcpuFd>,
        msr_indices: Vec<u32>,
    ) -> Result<Vm, VmmError> {
        super::vcpu::install_kick_handler().map_err(VmmError::Config)?;
        let status = Arc::new(VmStatus::new(channel.clone()));
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VmmError::Io)?;
        let device_thread = spawn_device_thread(name, &stop, notifiers, &devices, status.clone())?;
        channel.attach(devices.console_handle.clone());
        let ctx = Arc::new(VcpuContext {
            pio: Arc::new(pio_bus(&devices)?),
            mmio: Arc::new(mmio_bus(&devices)?),
            status: status.clone(),
            msr_indices,
            on_thread_start: None,
        });
        let mut vcpus = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            vcpus.push(VcpuHandle::spawn(name, i as u8, fd, ctx.clone()).map_err(VmmError::Io)?);
        }
        Ok(Vm {
            name: name.to_string(),
            vcpus,
            device_thread: Some(device_thread),
            stop,
            devices,
            channel,
            status,
            console_log: log,
            vm_fd: Arc::new(vm_fd),
            mem,
        })
    }

    fn all_vcpus(&self, cmd: fn() -> VcpuCommand, want: fn(&VcpuReply) -> bool) -> Result<Vec<VcpuReply>, VmmError> {
        let mut replies = Vec::new();
        for v in &self.vcpus {
            let reply = v.command(cmd(), Duration::from_secs(5)).map_err(VmmError::Vcpu)?;
            if !want(&reply) {
                return Err(VmmError::Vcpu(format!("unexpected vCPU reply {reply:?}")));
            }
            replies.push(reply);
        }
        Ok(replies)
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
        let devices = DevicesState {
            serial: lock(&self.devices.serial).state(),
            block: lock(&self.devices.block).state(),
            console: lock(&self.devices.console).state(),
        };
        Ok(MachineState { vm, vcpus, devices })
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
        self.devices.console_handle.close();
        for v in &mut self.vcpus {
            v.stop(Duration::from_secs(2));
        }
        self.vcpus.clear();
        let _ = self.stop.write(1);
        if let Some(t) = self.device_thread.take() {
            let _ = t.join();
        }
    }
}

/// Which device a notifier eventfd belongs to.
enum NotifyTarget {
    Block(usize),
    Console(usize),
    ConsoleKick,
}

struct Notifier {
    fd: EventFd,
    target: NotifyTarget,
}

fn ioevent_for_queue(vm: &VmFd, base: u64, queue: usize) -> Result<EventFd, VmmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::Io)?;
    vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), queue as u32)
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
    Ok(evt)
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::Io)?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(evt)
}

fn build_devices(
    vm: &VmFd,
    mem: &GuestMemory,
    rootfs: File,
    channel: &Channel,
    log: &Arc<ConsoleLog>,
    saved: Option<&DevicesState>,
) -> Result<(Devices, Vec<Notifier>), VmmError> {
    let serial_irq = irqfd(vm, SERIAL_GSI)?;
    let serial = match saved {
        Some(s) => SerialDevice::restore(&s.serial, serial_irq, log.clone())?,
        None => SerialDevice::new(serial_irq, log.clone())?,
    };

    let block_dev = Block::new(rootfs, "podflare-rootfs")?;
    let block_irq = Interrupt::new(irqfd(vm, BLOCK_GSI)?);
    let block = match saved {
        Some(s) => MmioTransport::restore(&s.block, Box::new(block_dev), mem.clone(), block_irq)?,
        None => MmioTransport::new(Box::new(block_dev), mem.clone(), block_irq),
    };

    let (console_model, console_handle) = Console::new(&PORT_NAMES, channel.sink())?;
    let kick = console_model.kick_fd().try_clone().map_err(VmmError::Io)?;
    let console_dev = Arc::new(Mutex::new(console_model));
    let console_irq = Interrupt::new(irqfd(vm, CONSOLE_GSI)?);
    let shared = Box::new(SharedDevice::new(console_dev.clone()));
    let console = match saved {
        Some(s) => MmioTransport::restore(&s.console, shared, mem.clone(), console_irq)?,
        None => MmioTransport::new(shared, mem.clone(), console_irq),
    };

    let mut notifiers = Vec::new();
    for q in 0..block.num_queues() {
        notifiers.push(Notifier { fd: ioevent_for_queue(vm, BLOCK_ADDR, q)?, target: NotifyTarget::Block(q) });
    }
    for q in 0..console.num_queues() {
        notifiers.push(Notifier { fd: ioevent_for_queue(vm, CONSOLE_ADDR, q)?, target: NotifyTarget::Console(q) });
    }
    notifiers.push(Notifier { fd: kick, target: NotifyTarget::ConsoleKick });
    let _ = NoDatamatch;
    Ok((
        Devices {
            serial: Arc::new(Mutex::new(serial)),
            block: Arc::new(Mutex::new(block)),
            console: Arc::new(Mutex::new(console)),
            console_dev,
            console_handle,
        },
        notifiers,
    ))
}

/// A virtio device reachable both from its transport and directly (lock
/// order: transport, then device; the direct path takes only the device).
struct SharedDevice<D> {
    dev: Arc<Mutex<D>>,
    /// Fixed at construction; kept here so the trait can lend a slice.
    sizes: Vec<u16>,
}

impl<D: VirtioDevice> SharedDevice<D> {
    fn new(dev: Arc<Mutex<D>>) -> Self {
        let sizes = lock(&dev).queue_max_sizes().to_vec();
        SharedDevice { dev, sizes }
    }
}

impl<D: VirtioDevice> VirtioDevice for SharedDevice<D> {
    fn device_type(&self) -> u32 {
        lock(&self.dev).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        lock(&self.dev).features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).write_config(offset, data)
    }
    fn activate(&mut self, mem: GuestMemory, interrupt: Interrupt, queues: Vec<virtio_queue::Queue>) -> Result<(), DeviceError> {
        lock(&self.dev).activate(mem, interrupt, queues)
    }
    fn queue_notify(&mut self, index: usize) {
        lock(&self.dev).queue_notify(index)
    }
    fn reset(&mut self) {
        lock(&self.dev).reset()
    }
    fn save(&self) -> serde_json::Value {
        lock(&self.dev).save()
    }
    fn restore(&mut self, state: &serde_json::Value, mem: GuestMemory, interrupt: Interrupt, queues: Vec<virtio_queue::Queue>) -> Result<(), DeviceError> {
        lock(&self.dev).restore(state, mem, interrupt, queues)
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        lock(&self.dev).queue_states()
    }
    fn set_memory(&mut self, mem: &GuestMemory) -> bool {
        lock(&self.dev).set_memory(mem)
    }
}

fn pio_bus(d: &Devices) -> Result<Bus, VmmError> {
    let mut bus = Bus::new();
    bus.insert(SERIAL_PORT, 8, d.serial.clone())?;
    Ok(bus)
}

fn mmio_bus(d: &Devices) -> Result<Bus, VmmError> {
    let mut bus = Bus::new();
    bus.insert(BLOCK_ADDR, MMIO_LEN, d.block.clone())?;
    bus.insert(CONSOLE_ADDR, MMIO_LEN, d.console.clone())?;
    Ok(bus)
}

/// The VM's device thread: waits on queue notifications and the console's
/// host-output kick, and runs the device code for each. Guest-facing code
/// runs here, so a panic is caught and fails only this VM.
fn spawn_device_thread(
    name: &str,
    stop: &EventFd,
    notifiers: Vec<Notifier>,
    devices: &Devices,
    status: Arc<VmStatus>,
) -> Result<JoinHandle<()>, VmmError> {
    let epoll = Epoll::new().map_err(VmmError::Io)?;
    const STOP_TOKEN: u64 = u64::MAX;
    epoll
        .ctl(ControlOperation::Add, stop_raw(stop), EpollEvent::new(EventSet::IN, STOP_TOKEN))
        .map_err(VmmError::Io)?;
    for (i, n) in notifiers.iter().enumerate() {
        epoll
            .ctl(ControlOperation::Add, stop_raw(&n.fd), EpollEvent::new(EventSet::IN, i as u64))
            .map_err(VmmError::Io)?;
    }
    let stop = stop.try_clone().map_err(VmmError::Io)?;
    let block = devices.block.clone();
    let console = devices.console.clone();
    let console_dev = devices.console_dev.clone();
    std::thread::Builder::new()
        .name(format!("{name}-dev"))
        .spawn(move || {
            let body = std::panic::AssertUnwindSafe(|| {
                let mut events = vec![EpollEvent::default(); 16];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            status.fail(format!("device thread epoll failed: {e}"));
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == STOP_TOKEN {
                            let _ = stop.read();
                            return;
                        }
                        let Some(n) = notifiers.get(token as usize) else { continue };
                        let _ = n.fd.read();
                        match n.target {
                            NotifyTarget::Block(q) => lock(&block).queue_notify(q),
                            NotifyTarget::Console(q) => lock(&console).queue_notify(q),
                            NotifyTarget::ConsoleKick => lock(&console_dev).process_host_output(),
                        }
                    }
                }
            });
            if std::panic::catch_unwind(body).is_err() {
                status.fail("device emulation panicked".to_string());
            }
        })
        .map_err(VmmError::Io)
}

fn stop_raw(fd: &EventFd) -> std::os::unix::io::RawFd {
    use std::os::unix::io::AsRawFd;
    fd.as_raw_fd()
}

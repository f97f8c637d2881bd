//! The device manager: which devices a VM has, where each sits on the
//! buses, which interrupt it raises, its typed saved state, and the device
//! thread that runs their queue work.
//!
//! The VM lifecycle (`vm.rs`) never names a device: it hands in the
//! [`Backends`] (what a device talks to outside the guest: the base image,
//! the writable disk, the channel's sink, the console log) and gets buses, notifiers and one
//! state record back. A new device is a row in [`LAYOUT`], a variant of
//! [`DeviceSnapshot`], a field of [`Backends`] and a match arm in `build`.
//! The network card has no backend handed in: every VM starts refusing
//! traffic, and the VMM attaches a tap later ([`DeviceManager::net_handle`]).

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::channel::Channel;
use super::scratch::{self, ScratchDisk};
use super::{memory, VmStatus, VmmError};
use crate::seccomp::{self, ThreadKind};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::ring::{Ring, RingHandle, RingPeer};
use crate::devices::serial::{ConsoleLog, SerialDevice, SerialState};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::{Console, ConsoleHandle, ConsoleSink};
use crate::devices::virtio::mmio::{MmioState, MmioTransport, MMIO_LEN, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, NetHandle, TAP_TOKEN};
use crate::devices::virtio::shared::SharedDevice;
use crate::devices::virtio::Interrupt;
use crate::devices::GuestMemory;

/// Names the guest sees for the channel ports (in `/sys/class/virtio-ports`).
pub const PORT_NAMES: [&str; 2] = ["podflare.agent", "podflare.repl"];

/// Which bus a device is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// x86 port I/O.
    Pio,
    /// Memory-mapped I/O (virtio-mmio windows).
    Mmio,
}

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// 16550A UART: the guest's kernel console, kept in a bounded log.
    Serial,
    /// Read-only virtio-blk over the template's base image.
    Block,
    /// Writable virtio-blk over the VM's own disk (`/dev/vdb`).
    Disk,
    /// Multiport virtio-console carrying the agent channel.
    Console,
    /// virtio-net (`eth0`): refusing until the VMM attaches a tap.
    Net,
}

/// One row of the device table.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSlot {
    /// Name in snapshots and logs.
    pub name: &'static str,
    /// The device.
    pub kind: DeviceKind,
    /// Its bus.
    pub bus: BusKind,
    /// First address (port or guest-physical).
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// The interrupt line (GSI) it raises.
    pub gsi: u32,
}

/// Every VM's devices, in build order. The guest learns the virtio ones
/// from its command line ([`virtio_mmio_devices`]).
pub const LAYOUT: [DeviceSlot; 5] = [
    DeviceSlot { name: "serial", kind: DeviceKind::Serial, bus: BusKind::Pio, base: 0x3f8, len: 8, gsi: 4 },
    DeviceSlot {
        name: "block",
        kind: DeviceKind::Block,
        bus: BusKind::Mmio,
        base: memory::MMIO_START,
        len: MMIO_LEN,
        gsi: 5,
    },
    DeviceSlot {
        name: "console",
        kind: DeviceKind::Console,
        bus: BusKind::Mmio,
        base: memory::MMIO_START + MMIO_LEN,
        len: MMIO_LEN,
        gsi: 6,
    },
    // Probed after the base image, so the guest names it vdb.
    DeviceSlot {
        name: "disk",
        kind: DeviceKind::Disk,
        bus: BusKind::Mmio,
        base: memory::MMIO_START + 2 * MMIO_LEN,
        len: MMIO_LEN,
        gsi: 7,
    },
    DeviceSlot {
        name: "net",
        kind: DeviceKind::Net,
        bus: BusKind::Mmio,
        base: memory::MMIO_START + 3 * MMIO_LEN,
        len: MMIO_LEN,
        gsi: 8,
    },
];

/// `(window base, GSI)` of every virtio-mmio device, for the command line.
pub fn virtio_mmio_devices() -> Vec<(u64, u32)> {
    LAYOUT.iter().filter(|d| d.bus == BusKind::Mmio).map(|d| (d.base, d.gsi)).collect()
}

/// What devices talk to outside the guest. Not part of a snapshot: handed in
/// again at every restore.
pub struct Backends {
    /// The base image (the very file a snapshot was taken with).
    pub rootfs: Arc<File>,
    /// The VM's writable disk and the limit its writes stay under.
    pub disk: (Arc<File>, Arc<AtomicU64>),
    /// Where the console delivers guest bytes (the channel).
    pub channel_sink: ConsoleSink,
    /// The host side of the REPL's ring (the channel).
    pub ring_peer: Box<dyn RingPeer>,
    /// Where the serial console's output is kept.
    pub console_log: Arc<ConsoleLog>,
}

impl Backends {
    /// The backends of a VM with `rootfs`, `disk` and `channel`.
    pub fn new(rootfs: Arc<File>, disk: &ScratchDisk, channel: &Channel, console_log: Arc<ConsoleLog>) -> Result<Backends, VmmError> {
        let file = disk.device_file();
        Ok(Backends {
            rootfs,
            disk: (file, disk.limit_handle()),
            channel_sink: channel.sink(),
            ring_peer: channel.ring_peer(),
            console_log,
        })
    }
}

/// One device's saved state, typed by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DeviceSnapshot {
    /// The UART.
    Serial(SerialState),
    /// A virtio-mmio device: transport plus the device's own typed state.
    Virtio(MmioState),
}

/// Saved state of every device, by table name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DevicesState {
    /// `(name, state)` in table order.
    pub devices: Vec<(String, DeviceSnapshot)>,
}

impl DevicesState {
    fn get(&self, name: &str) -> Result<&DeviceSnapshot, VmmError> {
        self.devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .ok_or_else(|| VmmError::Config(format!("snapshot has no state for device {name:?}")))
    }
}

enum Live {
    Serial(Arc<Mutex<SerialDevice>>),
    Virtio(Arc<Mutex<MmioTransport>>),
}

/// The device thread's wake-ups: two eventfds for everything, so a VM
/// holds two open files for them rather than one per queue and kick (ten
/// queues and three host kicks; open files bound how many sandboxes a host
/// holds).
struct Wakes {
    /// Registered with KVM at every virtio device's QueueNotify register,
    /// matching any value: the guest notified some queue, and the thread
    /// serves them all (a queue with nothing new costs a read of its avail
    /// index and nothing else).
    guest: Arc<EventFd>,
    /// Written by host code that queued console or ring bytes, resumed a
    /// port, or stops the thread.
    host: Arc<EventFd>,
    /// Set before `host` is written to end the thread.
    stopping: Arc<AtomicBool>,
}

/// A VM's devices.
pub struct DeviceManager {
    live: Vec<(DeviceSlot, Live)>,
    console_handle: ConsoleHandle,
    net_handle: NetHandle,
    /// The device thread's epoll, made here so the card's handle can add
    /// its tap to it at any time.
    epoll: Arc<Epoll>,
    ring: Arc<Mutex<Ring>>,
    ring_handle: RingHandle,
    console: Arc<Mutex<Console>>,
    wakes: Wakes,
    /// Held by the device thread while it handles a batch of events, and by
    /// whoever needs devices and guest memory still (a fork's capture).
    work: Arc<Mutex<()>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device state stays consistent between calls; a panic fails the VM.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm { what, source: e }
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::Io)?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(evt)
}

fn new_eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(EFD_NONBLOCK).map_err(VmmError::Io)
}

impl DeviceManager {
    /// Builds every device of [`LAYOUT`] with its interrupt, and the
    /// device thread's wake-ups; from `saved` (untrusted, validated by each
    /// device) when restoring.
    pub fn build(vm: &VmFd, mem: &GuestMemory, backends: Backends, saved: Option<&DevicesState>) -> Result<DeviceManager, VmmError> {
        let Backends { rootfs, disk, channel_sink, ring_peer, console_log } = backends;
        let (mut rootfs, mut disk, mut channel_sink) = (Some(rootfs), Some(disk), Some(channel_sink));
        let mut live = Vec::with_capacity(LAYOUT.len());
        let wakes = Wakes { guest: Arc::new(new_eventfd()?), host: Arc::new(new_eventfd()?), stopping: Arc::new(AtomicBool::new(false)) };
        let mut console = None;
        let mut console_handle = None;
        let mut net_handle = None;
        let epoll = Arc::new(Epoll::new().map_err(VmmError::Io)?);
        for slot in LAYOUT {
            let state = saved.map(|s| s.get(slot.name)).transpose()?;
            let irq = irqfd(vm, slot.gsi)?;
            let device = match slot.kind {
                DeviceKind::Serial => {
                    let serial = match state {
                        Some(DeviceSnapshot::Serial(s)) => SerialDevice::restore(s, irq, console_log.clone())?,
                        Some(_) => return Err(wrong_kind(slot)),
                        None => SerialDevice::new(irq, console_log.clone())?,
                    };
                    Live::Serial(Arc::new(Mutex::new(serial)))
                }
                DeviceKind::Block => {
                    let image = rootfs.take().ok_or_else(|| wrong_kind(slot))?;
                    let dev = Box::new(Block::new(image, "podflare-rootfs")?);
                    Live::Virtio(virtio(slot, dev, mem, irq, state)?)
                }
                DeviceKind::Disk => {
                    let (file, limit) = disk.take().ok_or_else(|| wrong_kind(slot))?;
                    let dev = Block::writable(file, "podflare-disk", scratch::CAPACITY_BYTES)?.sharing_limit(limit);
                    Live::Virtio(virtio(slot, Box::new(dev), mem, irq, state)?)
                }
                DeviceKind::Console => {
                    let sink = channel_sink.take().ok_or_else(|| wrong_kind(slot))?;
                    let (model, handle) = Console::with_kick(&PORT_NAMES, sink, wakes.host.clone())?;
                    let model = Arc::new(Mutex::new(model));
                    console = Some(model.clone());
                    console_handle = Some(handle);
                    Live::Virtio(virtio(slot, Box::new(SharedDevice::new(model)), mem, irq, state)?)
                }
                DeviceKind::Net => {
                    let model = Arc::new(Mutex::new(Net::new()));
                    net_handle = Some(NetHandle::new(model.clone(), epoll.clone()));
                    Live::Virtio(virtio(slot, Box::new(SharedDevice::new(model)), mem, irq, state)?)
                }
            };
            if let Live::Virtio(_) = &device {
                // No data match: any queue index the guest writes wakes the thread.
                vm.register_ioevent(&wakes.guest, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET), NoDatamatch)
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            live.push((slot, device));
        }
        let console = console.ok_or_else(|| VmmError::Config("the device table has no console".into()))?;
        let console_handle =
            console_handle.ok_or_else(|| VmmError::Config("the device table has no console".into()))?;
        let net_handle = net_handle.ok_or_else(|| VmmError::Config("the device table has no network card".into()))?;
        // The ring needs no saved state of its own: everything it has is in
        // guest memory (the counters it owns are read back from there).
        let (ring, ring_handle) = Ring::with_kick(mem, ring_peer, wakes.host.clone())?;
        let ring = Arc::new(Mutex::new(ring));
        let work = Arc::new(Mutex::new(()));
        Ok(DeviceManager { live, console_handle, net_handle, epoll, ring, ring_handle, console, wakes, work })
    }

    /// Every device's state. Take it with the vCPUs paused.
    pub fn save(&self) -> DevicesState {
        let devices = self
            .live
            .iter()
            .map(|(slot, dev)| {
                let state = match dev {
                    Live::Serial(s) => DeviceSnapshot::Serial(lock(s).state()),
                    Live::Virtio(t) => DeviceSnapshot::Virtio(lock(t).state()),
                };
                (slot.name.to_string(), state)
            })
            .collect();
        DevicesState { devices }
    }

    /// The bus of `kind` with every device of the table that sits on it.
    pub fn bus(&self, kind: BusKind) -> Result<Bus, VmmError> {
        let mut bus = Bus::new();
        for (slot, dev) in self.live.iter().filter(|(s, _)| s.bus == kind) {
            let dev: Arc<Mutex<dyn BusDevice>> = match dev {
                Live::Serial(s) => s.clone(),
                Live::Virtio(t) => t.clone(),
            };
            bus.insert(slot.base, slot.len, dev)?;
        }
        Ok(bus)
    }

    /// The console's host-side handle (the channel sends through it).
    pub fn console_handle(&self) -> &ConsoleHandle {
        &self.console_handle
    }

    /// The network card's handle (the VMM attaches the sandbox's tap).
    pub fn net_handle(&self) -> &NetHandle {
        &self.net_handle
    }

    /// The ring's host-side handle (the channel sends Python execs through it).
    pub fn ring_handle(&self) -> &RingHandle {
        &self.ring_handle
    }

    /// Stops device work until the guard drops: the device thread finishes
    /// the batch it is in and then waits, so no device touches guest memory
    /// or changes state. Host senders only queue bytes meanwhile.
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        lock(&self.work)
    }

    /// Ends the device thread after the batch it is in (join it then).
    pub fn stop_thread(&self) {
        self.wakes.stopping.store(true, Ordering::Release);
        // Counter overflow is the only failure, and means already woken.
        let _ = self.wakes.host.write(1);
    }

    /// Starts the VM's device thread: it waits on the guest's queue
    /// notifications, host kicks and the tap, and runs the device code for
    /// them, until [`DeviceManager::stop_thread`]. After each batch it polls
    /// the ring; while the ring is busy it keeps polling (see [`ring_nap`]),
    /// and otherwise it sleeps until an event. Guest-facing code runs here,
    /// so a panic is caught and fails only this VM, and the thread installs
    /// its seccomp filter first (an error is returned once it is known, and
    /// the thread has ended).
    pub fn spawn_thread(&self, name: &str, status: Arc<VmStatus>) -> Result<JoinHandle<()>, VmmError> {
        use std::os::unix::io::AsRawFd;
        const GUEST_TOKEN: u64 = 0;
        const HOST_TOKEN: u64 = 1;
        let (epoll, work, ring, net) = (self.epoll.clone(), self.work.clone(), self.ring.clone(), self.net_handle.clone());
        for (fd, token) in [(self.wakes.guest.as_raw_fd(), GUEST_TOKEN), (self.wakes.host.as_raw_fd(), HOST_TOKEN)] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)).map_err(VmmError::Io)?;
        }
        // Shared, not duplicated: a clone of an eventfd is one more open file.
        let (guest, host) = (self.wakes.guest.clone(), self.wakes.host.clone());
        let (stopping, console) = (self.wakes.stopping.clone(), self.console.clone());
        let transports: Vec<Arc<Mutex<MmioTransport>>> = self
            .live
            .iter()
            .filter_map(|(_, d)| match d {
                Live::Virtio(t) => Some(t.clone()),
                Live::Serial(_) => None,
            })
            .collect();
        let (ready, filtered) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-dev"))
            .spawn(move || {
                let _cpu = super::threads::account_this_thread();
                // The filter first; device emulation (guest-controlled
                // input) never runs unfiltered.
                let installed = seccomp::install(ThreadKind::Device);
                let ok = installed.is_ok();
                let _ = ready.send(installed);
                if !ok {
                    return;
                }
                let body = std::panic::AssertUnwindSafe(|| {
                    let mut events = vec![EpollEvent::default(); 16];
                    let mut ring_busy = false;
                    let mut quiet_since = std::time::Instant::now();
                    loop {
                        if ring_busy {
                            if let Some(nap) = ring_nap(quiet_since.elapsed()) {
                                std::thread::sleep(nap);
                            }
                        }
                        let n = match epoll.wait(if ring_busy { 0 } else { -1 }, &mut events) {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                status.fail(format!("device thread epoll failed: {e}"));
                                return;
                            }
                        };
                        let _working = lock(&work);
                        for ev in &events[..n] {
                            match ev.data() {
                                GUEST_TOKEN => {
                                    let _ = guest.read();
                                    for t in &transports {
                                        let mut t = lock(t);
                                        for q in 0..t.num_queues() {
                                            t.queue_notify(q);
                                        }
                                    }
                                }
                                HOST_TOKEN => {
                                    let _ = host.read();
                                    if stopping.load(Ordering::Acquire) {
                                        return;
                                    }
                                    // Ring bytes: the poll after the batch.
                                    lock(&console).process_host_output();
                                }
                                TAP_TOKEN => net.tap_readable(),
                                _ => {}
                            }
                        }
                        let polled = lock(&ring).poll();
                        ring_busy = polled.busy;
                        if polled.moved || n > 0 {
                            quiet_since = std::time::Instant::now();
                        }
                    }
                });
                if std::panic::catch_unwind(body).is_err() {
                    status.fail("device emulation panicked".to_string());
                }
            })
            .map_err(VmmError::Io)?;
        // The VM is refused rather than run without its device thread.
        match filtered.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(VmmError::Seccomp(e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(VmmError::Config("the device thread ended before it started".into()))
            }
        }
    }
}

/// The longest nap between polls of a busy ring: the most a silent exec's
/// next output waits for the host, and ~1,000 cheap wake-ups a second per
/// running exec. A ring with nothing running is not polled at all.
pub const RING_NAP_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// The nap before the next poll of a busy ring that moved nothing for
/// `quiet`: none for the first 100 us (a short exec's answer is that
/// close), 50 us naps until 2 ms (one costs the host a few microseconds),
/// then naps growing to [`RING_NAP_MAX`] for execs that run long.
fn ring_nap(quiet: std::time::Duration) -> Option<std::time::Duration> {
    use std::time::Duration;
    let us = quiet.as_micros();
    match us {
        0..100 => None,
        100..2_000 => Some(Duration::from_micros(50)),
        _ => Some(Duration::from_micros((us / 4) as u64).min(RING_NAP_MAX)),
    }
}

fn wrong_kind(slot: DeviceSlot) -> VmmError {
    VmmError::Config(format!("device {:?}: saved state or backend of another kind", slot.name))
}

/// A virtio device behind a new transport, restored from `state` if given.
fn virtio(
    slot: DeviceSlot,
    dev: Box<dyn crate::devices::virtio::VirtioDevice>,
    mem: &GuestMemory,
    irq: EventFd,
    state: Option<&DeviceSnapshot>,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    let irq = Interrupt::new(irq);
    let transport = match state {
        Some(DeviceSnapshot::Virtio(s)) => MmioTransport::restore(s, dev, mem.clone(), irq)?,
        Some(_) => return Err(wrong_kind(slot)),
        None => MmioTransport::new(dev, mem.clone(), irq),
    };
    Ok(Arc::new(Mutex::new(transport)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_ring_is_polled_at_once_then_in_short_then_longer_naps() {
        use std::time::Duration;
        assert_eq!(ring_nap(Duration::from_micros(10)), None);
        assert_eq!(ring_nap(Duration::from_millis(1)), Some(Duration::from_micros(50)));
        assert_eq!(ring_nap(Duration::from_millis(3)), Some(Duration::from_micros(750)));
        assert_eq!(ring_nap(Duration::from_secs(60)), Some(RING_NAP_MAX));
    }

    #[test]
    fn table_has_no_overlaps_and_distinct_lines() {
        for (i, a) in LAYOUT.iter().enumerate() {
            for b in &LAYOUT[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.gsi, b.gsi, "{} and {} share a GSI", a.name, b.name);
                if a.bus == b.bus {
                    assert!(a.base + a.len <= b.base || b.base + b.len <= a.base, "{} overlaps {}", a.name, b.name);
                }
            }
        }
        // The base image first, so the guest names it vda and the disk vdb.
        let mmio: Vec<&str> = LAYOUT.iter().filter(|d| d.bus == BusKind::Mmio).map(|d| d.name).collect();
        assert_eq!(mmio, ["block", "console", "disk", "net"]);
        assert_eq!(virtio_mmio_devices().len(), 4);
    }

    #[test]
    fn missing_device_state_is_an_error() {
        let st = DevicesState { devices: vec![] };
        assert!(st.get("serial").is_err());
    }
}

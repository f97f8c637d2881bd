//! virtio-console with `VIRTIO_CONSOLE_F_MULTIPORT`: named generic ports
//! (`/dev/vportNpM`, `/sys/class/virtio-ports/*/name`) carrying the agent
//! channel between hostd and the guest (virtio 1.1 section 5.3; Linux
//! `drivers/char/virtio_console.c` for what the driver really does).
//!
//! Queues: rx0, tx0, ctrl-rx, ctrl-tx, rx1, tx1, ... Guest -> host bytes
//! (tx) go to the sink synchronously during `queue_notify`; the sink never
//! blocks, and answers [`SinkFlow::Pause`] when the host cannot take more
//! from that port for now: the port's tx queue is then left alone (the guest
//! waits on it) until [`ConsoleHandle::resume_tx`]. Host -> guest
//! bytes are queued per port by [`ConsoleHandle::send`] (any thread, with
//! backpressure) and copied into the port's rx buffers by the device thread,
//! only while the guest has the port open: Linux discards data that arrives
//! for a port nobody has open.

mod handle;
mod persist;
mod queues;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

pub use handle::ConsoleHandle;
use handle::{PortShared, Shared, SharedState};
pub use persist::{ConsoleState, PortState};

use super::{read_config_bytes, DeviceState, Interrupt, VirtioDevice};
use crate::devices::{DeviceError, GuestMemory};

/// Feature bit: the device has several ports and a control queue pair.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;

// Control events (spec 5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
const CTRL_HEADER_LEN: usize = 8;

/// Host bytes that may wait for one port before `send` blocks.
pub const DEFAULT_PENDING_LIMIT: usize = 4 << 20;
/// Most ports a console may have (each costs two queues).
pub const MAX_PORTS: usize = 31;
/// Linux fills each rx queue completely with page-sized buffers, so the rx
/// size is guest memory spent per port (64 pages = 256 KiB).
const RX_QUEUE_SIZE: u16 = 64;
const TX_QUEUE_SIZE: u16 = 128;
const CTRL_QUEUE_SIZE: u16 = 32;
/// Control messages to the guest waiting for ctrl-rx buffers; a guest that
/// asks (DEVICE_READY) without ever posting buffers cannot grow this forever.
const MAX_CTRL_PENDING: usize = 1024;
/// Guest -> host bytes are read through this buffer, so a chain claiming
/// gigabytes costs no more host memory than this.
const TX_CHUNK: usize = 64 * 1024;
/// How long `send` sleeps between checks while blocked on backpressure.
const SEND_WAIT: Duration = Duration::from_millis(100);
/// How long `send` waits on a full port while the guest takes nothing:
/// generous, an emulated guest kernel drains slowly but steadily.
pub const DEFAULT_SEND_STALL: Duration = Duration::from_secs(60);

const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;

fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * (port + 1)
    }
}

/// What the sink wants after taking some guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFlow {
    /// Keep delivering.
    Continue,
    /// Stop taking this port's tx queue until [`ConsoleHandle::resume_tx`].
    Pause,
}

/// Receives guest -> host bytes as `(port, bytes)`, on the device thread.
/// Must not block.
pub type ConsoleSink = Box<dyn FnMut(u32, &[u8]) -> SinkFlow + Send>;

struct Active {
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<Queue>,
}

/// A multiport virtio-console.
pub struct Console {
    names: Vec<String>,
    shared: Arc<Shared>,
    sink: ConsoleSink,
    queue_sizes: Vec<u16>,
    config: [u8; 12],
    active: Option<Active>,
    device_ready: bool,
    /// The guest announced the port (PORT_READY) and got its name.
    port_ready: Vec<bool>,
    ctrl_pending: VecDeque<Vec<u8>>,
    buf: Vec<u8>,
    /// Ports whose tx queue the sink paused.
    tx_paused: Vec<bool>,
}

fn valid_name(n: &str) -> bool {
    // The name becomes a sysfs attribute and a /dev/virtio-ports symlink.
    !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

impl Console {
    /// A console with one generic port per name; guest -> host bytes go to
    /// `sink(port, bytes)`. Returns the device and the host-side handle.
    pub fn new(
        port_names: &[&str],
        sink: ConsoleSink,
    ) -> Result<(Self, ConsoleHandle), DeviceError> {
        Self::with_limit(port_names, sink, DEFAULT_PENDING_LIMIT)
    }

    /// As [`Console::new`], with `limit` host bytes pending per port before
    /// `send` blocks.
    pub fn with_limit(
        port_names: &[&str],
        sink: ConsoleSink,
        limit: usize,
    ) -> Result<(Self, ConsoleHandle), DeviceError> {
        Self::with_limits(port_names, sink, limit, DEFAULT_SEND_STALL)
    }

    /// As [`Console::with_limit`], giving up a `send` after `stall` with the
    /// port full and nothing drained.
    pub fn with_limits(
        port_names: &[&str],
        sink: ConsoleSink,
        limit: usize,
        stall: Duration,
    ) -> Result<(Self, ConsoleHandle), DeviceError> {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::Io)?);
        Self::build(port_names, sink, limit, stall, kick)
    }

    /// As [`Console::new`], kicking the device thread through `kick`, an
    /// eventfd the VM's other host-side work may share: the thread then
    /// runs [`Console::process_host_output`] on every wake of it.
    pub fn with_kick(port_names: &[&str], sink: ConsoleSink, kick: Arc<EventFd>) -> Result<(Self, ConsoleHandle), DeviceError> {
        Self::build(port_names, sink, DEFAULT_PENDING_LIMIT, DEFAULT_SEND_STALL, kick)
    }

    fn build(
        port_names: &[&str],
        sink: ConsoleSink,
        limit: usize,
        stall: Duration,
        kick: Arc<EventFd>,
    ) -> Result<(Self, ConsoleHandle), DeviceError> {
        let n = port_names.len();
        if n == 0 || n > MAX_PORTS || limit == 0 {
            return Err(DeviceError::BadState(format!("console with {n} ports, limit {limit}")));
        }
        if let Some(bad) = port_names.iter().find(|s| !valid_name(s)) {
            return Err(DeviceError::BadState(format!("bad console port name {bad:?}")));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                closed: false,
                ports: (0..n).map(|_| PortShared::default()).collect(),
            }),
            drained: Condvar::new(),
            kick,
            limit,
            stall,
        });
        let mut queue_sizes = Vec::with_capacity(2 * (n + 1));
        for i in 0..=n {
            // Pair 1 is the control pair; the others are ports' rx/tx.
            let (rx, tx) = if i == 1 { (CTRL_QUEUE_SIZE, CTRL_QUEUE_SIZE) } else { (RX_QUEUE_SIZE, TX_QUEUE_SIZE) };
            queue_sizes.extend([rx, tx]);
        }
        let mut config = [0u8; 12];
        // cols, rows (le16, unused without F_SIZE), max_nr_ports (le32), emerg_wr.
        config[4..8].copy_from_slice(&(n as u32).to_le_bytes());
        let handle = ConsoleHandle { shared: shared.clone() };
        let console = Console {
            names: port_names.iter().map(|s| s.to_string()).collect(),
            shared,
            sink,
            queue_sizes,
            config,
            active: None,
            device_ready: false,
            port_ready: vec![false; n],
            ctrl_pending: VecDeque::new(),
            buf: Vec::new(),
            tx_paused: vec![false; n],
        };
        Ok((console, handle))
    }

    /// Readable when host bytes were queued; the device thread then
    /// consumes it and calls [`Console::process_host_output`].
    pub fn kick_fd(&self) -> &EventFd {
        &self.shared.kick
    }

    /// Moves pending host bytes into guest buffers, and takes the tx queues
    /// of ports the host asked to resume. The caller consumed the kick.
    pub fn process_host_output(&mut self) {
        let mut used = false;
        for p in 0..self.names.len() {
            used |= self.fill_port(p);
            let resume = std::mem::take(&mut self.shared.lock().ports[p].resume_tx);
            if resume && self.tx_paused[p] {
                self.tx_paused[p] = false;
                used |= self.process_tx(p);
            }
        }
        self.signal_if(used);
    }

    fn signal_if(&mut self, used: bool) {
        if let (true, Some(a)) = (used, self.active.as_ref()) {
            // Without EVENT_IDX the driver always wants an interrupt.
            a.interrupt.signal_used_queue();
        }
    }

    fn queue_ctrl(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) {
        if self.ctrl_pending.len() >= MAX_CTRL_PENDING {
            return;
        }
        let mut msg = Vec::with_capacity(CTRL_HEADER_LEN + payload.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&event.to_le_bytes());
        msg.extend_from_slice(&value.to_le_bytes());
        msg.extend_from_slice(payload);
        self.ctrl_pending.push_back(msg);
    }

    /// One control message from the guest; malformed ones are ignored.
    fn handle_ctrl(&mut self, id: u32, event: u16, value: u16) {
        let nports = self.names.len();
        let port = usize::try_from(id).ok().filter(|&p| p < nports);
        match (event, port) {
            (DEVICE_READY, _) if value == 1 => {
                self.device_ready = true;
                for p in 0..nports as u32 {
                    self.queue_ctrl(p, DEVICE_ADD, 1, &[]);
                }
            }
            (PORT_READY, Some(p)) if value == 1 => {
                self.port_ready[p] = true;
                let name = self.names[p].clone();
                self.queue_ctrl(id, PORT_NAME, 1, name.as_bytes());
                // The host end is always connected; otherwise guest reads EOF.
                self.queue_ctrl(id, PORT_OPEN, 1, &[]);
            }
            (PORT_OPEN, Some(p)) => {
                self.shared.lock().ports[p].guest_open = value != 0;
            }
            _ => {}
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_CONSOLE_F_MULTIPORT)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr only exists with F_EMERG_WRITE, which is not offered.
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(DeviceError::BadState(format!(
                "virtio-console needs {} queues, got {}",
                self.queue_sizes.len(),
                queues.len()
            )));
        }
        self.active = Some(Active { mem, interrupt, queues });
        // Work posted before a restore: control both ways, then data.
        let mut used = self.process_ctrl_tx() | self.flush_ctrl();
        for p in 0..self.names.len() {
            used |= self.process_tx(p) | self.fill_port(p);
        }
        self.signal_if(used);
        Ok(())
    }

    fn queue_notify(&mut self, index: usize) {
        let used = match index {
            CTRL_RX => self.flush_ctrl(),
            CTRL_TX => {
                let mut used = self.process_ctrl_tx() | self.flush_ctrl();
                // A PORT_OPEN may have made pending bytes deliverable.
                for p in 0..self.names.len() {
                    used |= self.fill_port(p);
                }
                used
            }
            _ => {
                let port = if index < 2 { 0 } else { index / 2 - 1 };
                if port >= self.names.len() {
                    false
                } else if index.is_multiple_of(2) {
                    self.fill_port(port)
                } else {
                    self.process_tx(port)
                }
            }
        };
        self.signal_if(used);
    }

    fn reset(&mut self) {
        self.active = None;
        self.device_ready = false;
        self.port_ready.fill(false);
        self.ctrl_pending.clear();
        self.tx_paused.fill(false);
        // The driver is gone, so is every open; host bytes stay queued for
        // the next driver instance.
        for p in &mut self.shared.lock().ports {
            p.guest_open = false;
        }
    }

    fn save(&self) -> DeviceState {
        DeviceState::Console(self.save_state())
    }

    fn restore(
        &mut self,
        state: &DeviceState,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        let DeviceState::Console(st) = state else {
            return Err(DeviceError::BadState("virtio-console given another device's state".into()));
        };
        self.restore_state(st)?;
        if queues.is_empty() {
            return Ok(());
        }
        self.activate(mem, interrupt, queues)
    }

    fn set_memory(&mut self, mem: &GuestMemory) -> bool {
        if let Some(a) = self.active.as_mut() {
            a.mem = mem.clone();
        }
        true
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().flat_map(|a| a.queues.iter().map(|q| q.state())).collect()
    }
}

#[cfg(test)]
mod tests;

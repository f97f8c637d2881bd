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

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes};
use vmm_sys_util::eventfd::EventFd;

use super::{chain_descriptors, read_config_bytes, Interrupt, VirtioDevice};
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

/// Per-port state shared with [`ConsoleHandle`]s.
#[derive(Default)]
struct PortShared {
    pending: VecDeque<u8>,
    guest_open: bool,
    /// The host asked to take the port's tx queue again after a pause.
    resume_tx: bool,
}

struct SharedState {
    closed: bool,
    ports: Vec<PortShared>,
}

struct Shared {
    state: Mutex<SharedState>,
    /// Signalled whenever pending bytes shrink or the console closes.
    drained: Condvar,
    kick: EventFd,
    limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        // A panicked sender must not take the device thread down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Host-side handle on the console's ports; cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub struct ConsoleHandle {
    shared: Arc<Shared>,
}

impl ConsoleHandle {
    /// Queues `bytes` for the guest on `port` and kicks the device thread.
    /// Blocks while the port already has the limit pending (the guest is not
    /// reading), and fails once the console is closed. Must not be called
    /// from the console's own sink (the device thread is what drains).
    pub fn send(&self, port: u32, bytes: &[u8]) -> Result<(), DeviceError> {
        let p = port as usize;
        let mut rest = bytes;
        let mut st = self.shared.lock();
        if p >= st.ports.len() {
            return Err(DeviceError::NoSuchPort(port));
        }
        loop {
            if st.closed {
                return Err(DeviceError::Closed);
            }
            if rest.is_empty() {
                return Ok(());
            }
            let room = self.shared.limit.saturating_sub(st.ports[p].pending.len());
            if room == 0 {
                st = match self.shared.drained.wait_timeout(st, SEND_WAIT) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                };
                continue;
            }
            let n = room.min(rest.len());
            st.ports[p].pending.extend(&rest[..n]);
            rest = &rest[n..];
            // Counter overflow is the only failure, and means already kicked.
            let _ = self.shared.kick.write(1);
        }
    }

    /// Whether the guest has `port` open.
    pub fn guest_opened(&self, port: u32) -> bool {
        self.shared
            .lock()
            .ports
            .get(port as usize)
            .is_some_and(|p| p.guest_open)
    }

    /// Host bytes queued for `port` and not yet in guest buffers.
    pub fn pending(&self, port: u32) -> usize {
        self.shared.lock().ports.get(port as usize).map_or(0, |p| p.pending.len())
    }

    /// Lets the device take `port`'s tx queue again after the sink paused
    /// it (any thread; the device thread does the work).
    pub fn resume_tx(&self, port: u32) {
        if let Some(p) = self.shared.lock().ports.get_mut(port as usize) {
            p.resume_tx = true;
        }
        // Counter overflow is the only failure, and means already kicked.
        let _ = self.shared.kick.write(1);
    }

    /// Closes the console (VM teardown): blocked and later senders fail.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.drained.notify_all();
    }
}

struct Active {
    mem: GuestMemory,
    interrupt: Interrupt,
    queues: Vec<Queue>,
}

/// Saved state (see `VirtioDevice::save`).
#[derive(Serialize, Deserialize)]
struct ConsoleState {
    port_names: Vec<String>,
    device_ready: bool,
    ports: Vec<PortState>,
    /// Control messages not yet delivered, base64.
    ctrl_pending: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct PortState {
    ready: bool,
    guest_open: bool,
    /// Host bytes not yet delivered, base64.
    pending: String,
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
        let n = port_names.len();
        if n == 0 || n > MAX_PORTS || limit == 0 {
            return Err(DeviceError::BadState(format!("console with {n} ports, limit {limit}")));
        }
        if let Some(bad) = port_names.iter().find(|s| !valid_name(s)) {
            return Err(DeviceError::BadState(format!("bad console port name {bad:?}")));
        }
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::Io)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                closed: false,
                ports: (0..n).map(|_| PortShared::default()).collect(),
            }),
            drained: Condvar::new(),
            kick,
            limit,
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

    /// Readable when host bytes were queued; the device thread then calls
    /// [`Console::process_host_output`].
    pub fn kick_fd(&self) -> &EventFd {
        &self.shared.kick
    }

    /// Consumes the kick, moves pending host bytes into guest buffers, and
    /// takes the tx queues of ports the host asked to resume.
    pub fn process_host_output(&mut self) {
        // EAGAIN just means no kick was pending.
        let _ = self.shared.kick.read();
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

    /// Delivers queued control messages into ctrl-rx buffers.
    fn flush_ctrl(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(CTRL_RX) else {
            return false;
        };
        let mut used = false;
        while let Some(msg) = self.ctrl_pending.front() {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut pending: VecDeque<u8> = msg.iter().copied().collect();
            let descs = chain_descriptors(chain).unwrap_or_default();
            let cap: u64 = descs.iter().filter(|d| d.is_write_only()).map(|d| u64::from(d.len())).sum();
            // A message is delivered whole or not at all (Linux posts page-sized
            // buffers; a smaller one is a broken driver and loses the message).
            let n = if cap >= msg.len() as u64 { write_into(&a.mem, &descs, &mut pending) } else { 0 };
            self.ctrl_pending.pop_front();
            used |= q.add_used(&a.mem, head, n).is_ok();
        }
        used
    }

    /// Reads and handles the guest's control messages.
    fn process_ctrl_tx(&mut self) -> bool {
        let mut msgs = Vec::new();
        let mut used = false;
        if let Some(a) = self.active.as_mut() {
            if let Some(q) = a.queues.get_mut(CTRL_TX) {
                while let Some(chain) = q.pop_descriptor_chain(&a.mem) {
                    let head = chain.head_index();
                    let mut hdr = [0u8; CTRL_HEADER_LEN];
                    if let Some(descs) = chain_descriptors(chain) {
                        if read_prefix(&a.mem, &descs, &mut hdr) == CTRL_HEADER_LEN {
                            msgs.push(hdr);
                        }
                    }
                    used |= q.add_used(&a.mem, head, 0).is_ok();
                }
            }
        }
        for m in msgs {
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            self.handle_ctrl(id, event, value);
        }
        used
    }

    /// Hands the guest's bytes on `port`'s tx queue to the sink, in order,
    /// until the sink asks for a pause (the chain in hand is finished first:
    /// it is already off the ring).
    fn process_tx(&mut self, port: usize) -> bool {
        let Console { active, sink, buf, tx_paused, .. } = self;
        if tx_paused.get(port).copied().unwrap_or(true) {
            return false;
        }
        let Some(a) = active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(rx_queue(port) + 1) else {
            return false;
        };
        if buf.len() < TX_CHUNK {
            buf.resize(TX_CHUNK, 0);
        }
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            for d in chain_descriptors(chain).unwrap_or_default() {
                if d.is_write_only() {
                    continue;
                }
                let mut off = 0u32;
                while off < d.len() {
                    let n = (d.len() - off).min(TX_CHUNK as u32);
                    let chunk = &mut buf[..n as usize];
                    let ok = d
                        .addr()
                        .checked_add(u64::from(off))
                        .is_some_and(|addr| a.mem.read_slice(chunk, addr).is_ok());
                    if !ok {
                        break;
                    }
                    if sink(port as u32, chunk) == SinkFlow::Pause {
                        tx_paused[port] = true;
                    }
                    off += n;
                }
            }
            used |= q.add_used(&a.mem, head, 0).is_ok();
            if tx_paused[port] {
                break;
            }
        }
        used
    }

    /// Copies pending host bytes for `port` into its rx buffers.
    fn fill_port(&mut self, port: usize) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(rx_queue(port)) else {
            return false;
        };
        let mut st = self.shared.lock();
        let Some(ps) = st.ports.get_mut(port) else {
            return false;
        };
        if !ps.guest_open {
            return false;
        }
        let before = ps.pending.len();
        let mut used = false;
        while !ps.pending.is_empty() {
            let Some(chain) = q.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let n = chain_descriptors(chain).map_or(0, |d| write_into(&a.mem, &d, &mut ps.pending));
            used |= q.add_used(&a.mem, head, n).is_ok();
        }
        if ps.pending.len() < before {
            self.shared.drained.notify_all();
        }
        used
    }
}

/// Moves bytes from the front of `src` into the chain's device-writable
/// buffers; stops at the first buffer guest memory refuses. Returns the
/// bytes written.
fn write_into(mem: &GuestMemory, descs: &[Descriptor], src: &mut VecDeque<u8>) -> u32 {
    let mut total = 0u32;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        let mut off = 0u32;
        while off < d.len() && !src.is_empty() {
            let front = src.as_slices().0;
            let n = front.len().min((d.len() - off) as usize);
            let ok = d
                .addr()
                .checked_add(u64::from(off))
                .is_some_and(|addr| mem.write_slice(&front[..n], addr).is_ok());
            if !ok {
                return total;
            }
            src.drain(..n);
            off += n as u32;
            total = total.saturating_add(n as u32);
        }
        if src.is_empty() {
            break;
        }
    }
    total
}

/// Reads up to `out.len()` bytes from the start of the chain's readable
/// buffers; returns how many it got.
fn read_prefix(mem: &GuestMemory, descs: &[Descriptor], out: &mut [u8]) -> usize {
    let mut got = 0;
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        if got == out.len() {
            break;
        }
        let n = (out.len() - got).min(d.len() as usize);
        if mem.read_slice(&mut out[got..got + n], d.addr()).is_err() {
            break;
        }
        got += n;
    }
    got
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
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

    fn save(&self) -> serde_json::Value {
        let st = self.shared.lock();
        let state = ConsoleState {
            port_names: self.names.clone(),
            device_ready: self.device_ready,
            ports: st
                .ports
                .iter()
                .zip(&self.port_ready)
                .map(|(p, &ready)| PortState {
                    ready,
                    guest_open: p.guest_open,
                    pending: b64().encode(p.pending.iter().copied().collect::<Vec<u8>>()),
                })
                .collect(),
            ctrl_pending: self.ctrl_pending.iter().map(|m| b64().encode(m)).collect(),
        };
        serde_json::to_value(state).unwrap_or_default()
    }

    fn restore(
        &mut self,
        state: &serde_json::Value,
        mem: GuestMemory,
        interrupt: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), DeviceError> {
        let bad = |m: String| DeviceError::BadState(format!("virtio-console state: {m}"));
        let st = ConsoleState::deserialize(state).map_err(|e| bad(e.to_string()))?;
        if st.port_names != self.names || st.ports.len() != self.names.len() {
            return Err(bad(format!("ports {:?} saved, device has {:?}", st.port_names, self.names)));
        }
        if st.ctrl_pending.len() > MAX_CTRL_PENDING {
            return Err(bad("too many control messages".into()));
        }
        let mut ctrl = VecDeque::with_capacity(st.ctrl_pending.len());
        for m in &st.ctrl_pending {
            let m = b64().decode(m).map_err(|e| bad(e.to_string()))?;
            if m.len() < CTRL_HEADER_LEN || m.len() > CTRL_HEADER_LEN + 128 {
                return Err(bad("control message size".into()));
            }
            ctrl.push_back(m);
        }
        let mut pending = Vec::with_capacity(st.ports.len());
        for p in &st.ports {
            // Checked before decoding: base64 is 4/3 of the bytes.
            if p.pending.len() / 4 * 3 > self.shared.limit + 3 {
                return Err(bad("pending bytes over the limit".into()));
            }
            let bytes = b64().decode(&p.pending).map_err(|e| bad(e.to_string()))?;
            if bytes.len() > self.shared.limit {
                return Err(bad("pending bytes over the limit".into()));
            }
            pending.push(bytes);
        }
        self.reset();
        {
            let mut sh = self.shared.lock();
            for ((ps, saved), bytes) in sh.ports.iter_mut().zip(&st.ports).zip(pending) {
                ps.guest_open = saved.guest_open;
                ps.pending = bytes.into();
            }
        }
        self.shared.drained.notify_all();
        self.device_ready = st.device_ready;
        for (r, saved) in self.port_ready.iter_mut().zip(&st.ports) {
            *r = saved.ready;
        }
        self.ctrl_pending = ctrl;
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
#[path = "console_tests.rs"]
mod tests;

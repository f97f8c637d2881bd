//! The host side of the console's ports: bytes queued for the guest (with
//! backpressure), port open state, and the resume request after the sink
//! paused a port. Shared between [`ConsoleHandle`]s and the device.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::SEND_WAIT;
use crate::devices::DeviceError;

/// Per-port state shared with [`ConsoleHandle`]s.
#[derive(Default)]
pub(super) struct PortShared {
    pub(super) pending: VecDeque<u8>,
    pub(super) guest_open: bool,
    /// The host asked to take the port's tx queue again after a pause.
    pub(super) resume_tx: bool,
    /// Bytes at the tail of `pending` from a send still under way (the
    /// rest of its message is not queued yet). A snapshot leaves them out:
    /// a copy restored from it would never get the rest.
    pub(super) partial: usize,
}

pub(super) struct SharedState {
    pub(super) closed: bool,
    pub(super) ports: Vec<PortShared>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<SharedState>,
    /// Signalled whenever pending bytes shrink or the console closes.
    pub(super) drained: Condvar,
    /// Possibly shared with the VM's other host-side kicks.
    pub(super) kick: Arc<EventFd>,
    pub(super) limit: usize,
    /// How long `send` waits with the port full and nothing drained.
    pub(super) stall: Duration,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, SharedState> {
        // A panicked sender must not take the device thread down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Host-side handle on the console's ports; cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub struct ConsoleHandle {
    pub(super) shared: Arc<Shared>,
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
        // A slow guest is fine (an emulated kernel drains a few hundred KiB
        // a second); one that takes nothing for `stall` is not reading.
        let mut last_drain = (st.ports[p].pending.len(), Instant::now());
        let mut queued = 0usize;
        loop {
            if st.closed {
                st.ports[p].partial = 0;
                return Err(DeviceError::Closed);
            }
            if rest.is_empty() {
                st.ports[p].partial = 0;
                return Ok(());
            }
            let pending = st.ports[p].pending.len();
            if pending < last_drain.0 {
                last_drain = (pending, Instant::now());
            }
            let room = self.shared.limit.saturating_sub(pending);
            if room == 0 {
                if last_drain.1.elapsed() >= self.shared.stall {
                    st.ports[p].partial = 0;
                    return Err(DeviceError::Stalled { port, secs: self.shared.stall.as_secs() });
                }
                st = match self.shared.drained.wait_timeout(st, SEND_WAIT) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                };
                continue;
            }
            let n = room.min(rest.len());
            st.ports[p].pending.extend(&rest[..n]);
            rest = &rest[n..];
            queued += n;
            st.ports[p].partial = if rest.is_empty() { 0 } else { queued };
            last_drain.0 = st.ports[p].pending.len();
            // Counter overflow is the only failure, and means already kicked.
            let _ = self.shared.kick.write(1);
        }
    }

    /// Queues `bytes` for the guest on `port` only if they all fit now:
    /// never blocks, so the device thread may use it. False: not queued.
    pub fn try_send(&self, port: u32, bytes: &[u8]) -> bool {
        let mut st = self.shared.lock();
        let limit = self.shared.limit;
        let closed = st.closed;
        let queued = match st.ports.get_mut(port as usize) {
            Some(p) if !closed && p.partial == 0 && p.pending.len() + bytes.len() <= limit => {
                p.pending.extend(bytes);
                true
            }
            _ => false,
        };
        drop(st);
        if queued {
            // Counter overflow is the only failure, and means already kicked.
            let _ = self.shared.kick.write(1);
        }
        queued
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


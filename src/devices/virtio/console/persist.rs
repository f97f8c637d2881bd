//! Snapshot state of the console: port names and readiness, host bytes not
//! yet delivered, control messages not yet delivered.

use std::collections::VecDeque;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{Console, CTRL_HEADER_LEN, MAX_CTRL_PENDING};
use crate::devices::virtio::VirtioDevice;
use crate::devices::DeviceError;

/// The console's saved state (see `VirtioDevice::save`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    port_names: Vec<String>,
    device_ready: bool,
    ports: Vec<PortState>,
    /// Control messages not yet delivered, base64.
    ctrl_pending: Vec<String>,
}

/// One port's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    ready: bool,
    guest_open: bool,
    /// Host bytes not yet delivered, base64.
    pending: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Console {
    /// The console's own saved state. Take it with the VM paused.
    pub(super) fn save_state(&self) -> ConsoleState {
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
                    // Whole messages only: see `PortShared::partial`.
                    pending: b64().encode(
                        p.pending.iter().take(p.pending.len() - p.partial.min(p.pending.len())).copied().collect::<Vec<u8>>(),
                    ),
                })
                .collect(),
            ctrl_pending: self.ctrl_pending.iter().map(|m| b64().encode(m)).collect(),
        };
        state
    }

    /// Takes saved state (untrusted: sizes and encodings are checked) into
    /// an inactive console; the caller activates it with its queues.
    pub(super) fn restore_state(&mut self, st: &ConsoleState) -> Result<(), DeviceError> {
        let bad = |m: String| DeviceError::BadState(format!("virtio-console state: {m}"));
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
                ps.partial = 0;
            }
        }
        self.shared.drained.notify_all();
        self.device_ready = st.device_ready;
        for (r, saved) in self.port_ready.iter_mut().zip(&st.ports) {
            *r = saved.ready;
        }
        self.ctrl_pending = ctrl;
        Ok(())
    }

}

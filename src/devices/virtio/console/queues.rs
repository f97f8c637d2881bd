//! The console's queue work on the device thread: control messages both
//! ways, guest output (tx) into the sink, host bytes into rx buffers. Every
//! descriptor is guest input and goes through checked memory accessors.

use std::collections::VecDeque;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes};

use super::{rx_queue, Console, SinkFlow, CTRL_HEADER_LEN, CTRL_RX, CTRL_TX, TX_CHUNK};
use crate::devices::virtio::chain_descriptors;
use crate::devices::GuestMemory;

impl Console {
    /// Delivers queued control messages into ctrl-rx buffers.
    pub(super) fn flush_ctrl(&mut self) -> bool {
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
    pub(super) fn process_ctrl_tx(&mut self) -> bool {
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
    pub(super) fn process_tx(&mut self, port: usize) -> bool {
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
    pub(super) fn fill_port(&mut self, port: usize) -> bool {
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


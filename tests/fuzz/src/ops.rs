//! The rig's operations: their codes and operands (read by
//! [`crate::virtio::Rig::step`]), and a builder that encodes them for seeds.

use crate::Writer;

/// Operation codes (the first byte of each operation, modulo 15).
pub const OP_INIT: u8 = 0;
/// `off: u16, value: u32`: a 32-bit register write.
pub const OP_REG_WRITE: u8 = 1;
/// `off: u16, blob, dir: u8`: an access of any size (config space too).
pub const OP_ACCESS: u8 = 2;
/// `addr: u32, blob`: raw guest memory write.
pub const OP_MEM: u8 = 3;
/// `q: u8, idx: u16, addr: u64, len: u32, flags: u16, next: u16`.
pub const OP_DESC: u8 = 4;
/// `q: u8, head: u16`: publish a chain head.
pub const OP_AVAIL: u8 = 5;
/// `q: u8, idx: u16`: set the avail index to anything.
pub const OP_AVAIL_IDX: u8 = 6;
/// `q: u8, how: u8`: notify through the ioeventfd path or the register.
pub const OP_NOTIFY: u8 = 7;
/// Save and restore the transport (must succeed and change nothing).
pub const OP_SNAPSHOT: u8 = 8;
/// Save, mutate (see [`crate::mutate::mmio_state`]), restore if accepted.
pub const OP_MUTATED: u8 = 9;
/// `port: u8, blob`: host bytes for a console port.
pub const OP_SEND: u8 = 10;
/// The console's host-output kick.
pub const OP_HOST_OUTPUT: u8 = 11;
/// `on: u8`: the sink answers Pause from now on (or not).
pub const OP_PAUSE: u8 = 12;
/// `port: u8`: the host resumes a paused port.
pub const OP_RESUME: u8 = 13;
/// `shift: u8`: remap guest memory.
pub const OP_REMAP: u8 = 14;

/// Builds rig operations for seeds.
#[derive(Default)]
pub struct Ops(pub Writer);

impl Ops {
    /// [`OP_INIT`].
    pub fn init(&mut self, features: u64, log2: [u8; 6]) -> &mut Self {
        self.0.u8(OP_INIT).u64(features);
        for l in log2 {
            self.0.u8(l);
        }
        self
    }

    /// [`OP_DESC`].
    pub fn desc(&mut self, q: u8, idx: u16, addr: u64, len: u32, flags: u16, next: u16) -> &mut Self {
        self.0.u8(OP_DESC).u8(q).u16(idx).u64(addr).u32(len).u16(flags).u16(next);
        self
    }

    /// [`OP_AVAIL`].
    pub fn avail(&mut self, q: u8, head: u16) -> &mut Self {
        self.0.u8(OP_AVAIL).u8(q).u16(head);
        self
    }

    /// [`OP_MEM`].
    pub fn mem(&mut self, addr: u32, data: &[u8]) -> &mut Self {
        self.0.u8(OP_MEM).u32(addr).blob(data);
        self
    }

    /// [`OP_NOTIFY`] through the ioeventfd path.
    pub fn notify(&mut self, q: u8) -> &mut Self {
        self.0.u8(OP_NOTIFY).u8(q).u8(0);
        self
    }

    /// A bare operation code (no operands).
    pub fn op(&mut self, code: u8) -> &mut Self {
        self.0.u8(code);
        self
    }

    /// [`OP_SEND`].
    pub fn send(&mut self, port: u8, data: &[u8]) -> &mut Self {
        self.0.u8(OP_SEND).u8(port).blob(data);
        self
    }

    /// The encoded operations.
    pub fn bytes(&self) -> Vec<u8> {
        self.0 .0.clone()
    }
}

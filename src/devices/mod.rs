//! Device models of one VM: an address-range bus (PIO and MMIO), the 16550A
//! serial port, virtio-mmio devices (block, console), and the REPL's
//! shared-memory ring.
//!
//! Everything here is guest-facing and runs inside the one hostd process that
//! hosts every VM, so no input the guest can produce (register writes,
//! descriptor tables, control messages) may panic: arithmetic is checked and
//! guest memory is touched only through vm-memory's checked accessors.

pub mod bus;
pub mod ring;
pub mod serial;
pub mod virtio;

/// The VM's guest memory type, shared by the VMM and every device.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Errors of the device models.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A bus range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A bus range is empty or runs past the end of the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A host I/O operation (backing file, eventfd) failed.
    #[error("device I/O: {0}")]
    Io(#[source] std::io::Error),
    /// Saved state or a configuration is inconsistent (restore input is untrusted).
    #[error("invalid device state: {0}")]
    BadState(String),
    /// A virtio queue could not be built from its configuration.
    #[error("virtio queue: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// A console port number that the device does not have.
    #[error("no such console port {0}")]
    NoSuchPort(u32),
    /// The guest took none of the bytes already waiting for a port for this
    /// long: it is not reading, and the sender gives up.
    #[error("the guest has not read port {port} for {secs} s")]
    Stalled {
        /// The port.
        port: u32,
        /// How long nothing moved.
        secs: u64,
    },
    /// The console was closed (VM teardown): nothing more can be sent.
    #[error("console closed")]
    Closed,
}

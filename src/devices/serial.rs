//! The 16550A UART at PIO 0x3f8 (8 ports, IRQ 4), emulated by vm-superio.
//!
//! Guest output goes only into a bounded [`ConsoleLog`] (never to hostd's
//! stdout: with hundreds of VMs in one process that would be unreadable and a
//! guest could flood it). The log keeps the last `cap` bytes for diagnostics
//! such as "did the kernel panic" or "boot reached /init".

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::DeviceError;

/// Port I/O base of COM1.
pub const SERIAL_PIO_BASE: u64 = 0x3f8;
/// Number of ports the UART decodes.
pub const SERIAL_PIO_LEN: u64 = 8;
/// The legacy IRQ (and GSI) of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// A bounded ring of the last bytes a guest wrote to a console.
pub struct ConsoleLog {
    cap: usize,
    inner: Mutex<LogInner>,
}

struct LogInner {
    buf: VecDeque<u8>,
    total: u64,
}

impl ConsoleLog {
    /// A log that keeps the last `cap` bytes (e.g. 64 KiB).
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(ConsoleLog {
            cap,
            inner: Mutex::new(LogInner {
                buf: VecDeque::with_capacity(cap.min(64 * 1024)),
                total: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic elsewhere must not make the log (a diagnostics path) panic too.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends bytes, dropping the oldest ones beyond the capacity.
    pub fn append(&self, bytes: &[u8]) {
        let mut g = self.lock();
        g.total = g.total.saturating_add(bytes.len() as u64);
        let keep = bytes.len().min(self.cap);
        let tail = &bytes[bytes.len() - keep..];
        let overflow = (g.buf.len() + tail.len()).saturating_sub(self.cap);
        g.buf.drain(..overflow);
        g.buf.extend(tail);
    }

    /// The bytes currently kept, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().buf.iter().copied().collect()
    }

    /// Whether the kept bytes contain `needle`.
    pub fn contains(&self, needle: &[u8]) -> bool {
        if needle.is_empty() {
            return true;
        }
        let mut g = self.lock();
        g.buf.make_contiguous().windows(needle.len()).any(|w| w == needle)
    }

    /// Bytes ever written, including the ones dropped from the ring.
    pub fn total_written(&self) -> u64 {
        self.lock().total
    }
}

/// The UART's output sink: the shared log.
struct LogWriter(Arc<ConsoleLog>);

impl io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's interrupt line: an eventfd the VM registers as irqfd for GSI 4.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Saved UART registers and receive FIFO (mirror of vm-superio's
/// `SerialState`, which is not serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest (at most 64).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

fn superio_err(e: vm_superio::serial::Error<io::Error>) -> DeviceError {
    match e {
        vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
            DeviceError::Io(e)
        }
        vm_superio::serial::Error::FullFifo => {
            DeviceError::BadState("serial receive FIFO over 64 bytes".into())
        }
    }
}

/// COM1 on the PIO bus; register at [`SERIAL_PIO_BASE`], length [`SERIAL_PIO_LEN`].
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, LogWriter>,
}

impl SerialDevice {
    /// A UART in its power-on state. `irq` is registered by the VM as the
    /// irqfd of GSI 4; output goes to `log`.
    pub fn new(irq: EventFd, log: Arc<ConsoleLog>) -> Result<Self, DeviceError> {
        Self::restore(&SerialState::from(vm_superio::SerialState::default()), irq, log)
    }

    /// The registers and FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// A UART from saved (untrusted) state: a FIFO longer than the hardware's
    /// is rejected, register values are any byte as on real hardware.
    pub fn restore(state: &SerialState, irq: EventFd, log: Arc<ConsoleLog>) -> Result<Self, DeviceError> {
        let uart = Serial::from_state(&state.into(), IrqTrigger(irq), NoEvents, LogWriter(log))
            .map_err(superio_err)?;
        Ok(SerialDevice { uart })
    }

    /// Queues host input for the guest to read; returns how many bytes fit in
    /// the 64-byte FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; a wider access (not something a
        // driver does) reads as zeros rather than having side effects.
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) if u64::from(off) < SERIAL_PIO_LEN => *b = self.uart.read(off),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if u64::from(off) < SERIAL_PIO_LEN {
                // A failed interrupt (eventfd counter full) means one is already
                // pending; a failed output write cannot happen with the log sink.
                let _ = self.uart.write(off, *b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn log_is_bounded_and_searchable() {
        let log = ConsoleLog::new(8);
        log.append(b"hello ");
        log.append(b"world");
        assert_eq!(log.contents(), b"lo world");
        assert_eq!(log.total_written(), 11);
        assert!(log.contains(b"o w"));
        assert!(!log.contains(b"hello"));
        log.append(b"0123456789abc");
        assert_eq!(log.contents(), b"56789abc");
        assert_eq!(log.total_written(), 24);
        let empty = ConsoleLog::new(0);
        empty.append(b"x");
        assert!(empty.contents().is_empty());
    }

    #[test]
    fn output_goes_to_log_and_raises_irq() {
        let log = ConsoleLog::new(1024);
        let irq = efd();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), log.clone()).unwrap();
        // Enable the THR-empty interrupt, then write a line.
        s.write(1, &[0x02]);
        for b in b"boot ok\n" {
            s.write(0, &[*b]);
        }
        assert!(log.contains(b"boot ok"));
        assert!(irq.read().unwrap() > 0);
        // Line status says the transmitter is empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let log = ConsoleLog::new(64);
        let mut s = SerialDevice::new(efd(), log.clone()).unwrap();
        for off in [0u64, 7, 8, 255, 256, u64::MAX] {
            for size in [0usize, 1, 2, 4, 8] {
                let mut buf = vec![0xaa; size];
                s.read(off, &mut buf);
                s.write(off, &buf);
            }
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let log = ConsoleLog::new(64);
        let mut s = SerialDevice::new(efd(), log.clone()).unwrap();
        s.write(3, &[0x80]); // DLAB on
        s.write(0, &[0x0c]);
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(7, &[0x5a]);
        assert_eq!(s.enqueue_input(b"in"), 2);
        let st = s.state();
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        let mut r = SerialDevice::restore(&back, efd(), log).unwrap();
        assert_eq!(r.state(), st);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        r.read(0, &mut b);
        assert_eq!(b, [b'i']);

        let mut bad = st.clone();
        bad.in_buffer = vec![0; 65];
        assert!(SerialDevice::restore(&bad, efd(), ConsoleLog::new(1)).is_err());
    }
}

//! An address-range bus, used for both port I/O and MMIO exits.
//!
//! Devices register a `[base, base + len)` range; an access is routed to the
//! device whose range holds the whole access, with the offset from the base.

use std::sync::{Arc, Mutex, MutexGuard};

use super::DeviceError;

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the range base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the range base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// Devices by address range, kept sorted by base address and non-overlapping.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

/// Locks a device, recovering the guard from a poisoned mutex: the VM thread
/// that panicked is already marked failed, and the caller (a vCPU thread) must
/// not panic in turn.
fn lock(dev: &Mutex<dyn BusDevice>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base + len)`. Rejects an empty range, one that
    /// wraps past `u64::MAX`, and one that overlaps a device already there.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), DeviceError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(DeviceError::BadRange { base, len });
        }
        // First range whose base is above ours; the one before it (if any) may
        // reach into ours, and this one must start past our last byte.
        let idx = self.ranges.partition_point(|r| r.base <= base);
        if let Some(prev) = idx.checked_sub(1).and_then(|i| self.ranges.get(i)) {
            // prev.base <= base; overlap if prev's last byte >= base.
            if prev.base + (prev.len - 1) >= base {
                return Err(DeviceError::Overlap { base, len });
            }
        }
        if let Some(next) = self.ranges.get(idx) {
            if base + (len - 1) >= next.base {
                return Err(DeviceError::Overlap { base, len });
            }
        }
        self.ranges.insert(idx, Range { base, len, dev });
        Ok(())
    }

    /// The device holding the whole access `[addr, addr + size)`, with the
    /// offset of `addr` from its base.
    pub fn get(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let idx = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let r = self.ranges.get(idx)?;
        let offset = addr - r.base;
        // An access straddling the end of a range goes nowhere rather than
        // handing the device an offset past its length.
        let end = offset.checked_add(u64::try_from(size).ok()?)?;
        if offset < r.len && end <= r.len {
            Some((offset, &r.dev))
        } else {
            None
        }
    }

    /// Routes a read. Returns false when no device holds the access (the
    /// caller then answers all ones, as an unclaimed bus does).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.get(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write. Returns false when no device holds the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.get(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_rejects_overlap_empty_and_wrap() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, probe()).unwrap();
        bus.insert(0x200, 0x10, probe()).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x9), (0x10f, 1), (0x1f0, 0x11), (0x108, 0x100)] {
            assert!(
                matches!(bus.insert(base, len, probe()), Err(DeviceError::Overlap { .. })),
                "{base:#x}+{len:#x}"
            );
        }
        assert!(matches!(bus.insert(0x300, 0, probe()), Err(DeviceError::BadRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, probe()), Err(DeviceError::BadRange { .. })));
        // Touching ranges are fine, and so is the very last byte of the space.
        bus.insert(0xf0, 0x10, probe()).unwrap();
        bus.insert(0x110, 0xf0, probe()).unwrap();
        bus.insert(u64::MAX, 1, probe()).unwrap();
        bus.insert(0, 1, probe()).unwrap();
    }

    #[test]
    fn lookup_routes_by_range_with_offset() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0xd000_0000, 0x1000, b.clone()).unwrap();

        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().last, Some((0, vec![0x41])));

        let mut buf4 = [0u8; 4];
        assert!(bus.read(0xd000_0ffc, &mut buf4));
        assert!(bus.write(0xd000_0050, &[1, 0, 0, 0]));
        assert_eq!(b.lock().unwrap().last, Some((0x50, vec![1, 0, 0, 0])));

        // Holes, just past the end, and straddling the end.
        assert!(!bus.read(0x3f7, &mut buf));
        assert!(!bus.read(0x400, &mut buf));
        assert!(!bus.read(0xd000_0ffe, &mut buf4));
        assert!(!bus.write(u64::MAX, &[0; 8]));
        assert!(!bus.read(0, &mut buf));
    }

    #[test]
    fn poisoned_device_does_not_panic_the_caller() {
        let mut bus = Bus::new();
        let a = probe();
        bus.insert(0x10, 4, a.clone()).unwrap();
        let a2 = a.clone();
        let _ = std::thread::spawn(move || {
            let _g = a2.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(a.is_poisoned());
        let mut buf = [0u8; 1];
        assert!(bus.read(0x11, &mut buf));
        assert_eq!(buf, [1]);
        assert!(bus.write(0x12, &[7]));
    }
}

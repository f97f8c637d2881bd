//! Admission and memory pressure: whether the host takes another sandbox,
//! and whether guests have dirtied so much memory that one must go.
//!
//! Guests map their RAM from snapshot files and pay only for pages they
//! write, so the host is overcommitted by design (a thousand idle 512 MiB
//! guests fit in 24 GiB). Two rules keep that safe:
//! - at create, a sandbox is admitted only while host memory in use plus a
//!   reserve for every restore still under way stays under
//!   `PODFLARE_MAX_GUEST_MEMORY_MIB`, and the sandbox count under
//!   `PODFLARE_MAX_SANDBOXES`; both are reserved atomically, so concurrent
//!   creates cannot all slip past the same reading;
//! - afterwards, when guests dirty memory until the host's available memory
//!   falls under `PODFLARE_MEMORY_FLOOR_MIB`, the sandbox layer destroys the
//!   sandbox holding the most (see [`Admission::pressure`]): a guest can
//!   lose its sandbox, hostd is never the process the kernel's OOM killer
//!   picks for everyone.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::guest::{CapacityReason, GuestError};

/// Host memory set aside per restore under way when deciding admission.
pub const RESERVE_MIB: u64 = 64;

/// Host memory, in MiB: total and available (`/proc/meminfo`); `None` when
/// it cannot be read (then no decision is made on a made-up zero).
pub fn host_meminfo_mib() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib / 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// The host's admission state.
pub struct Admission {
    max_sandboxes: usize,
    limit_mib: u64,
    floor_mib: u64,
    /// Guests that exist (restored and handed out, or being restored).
    live: AtomicUsize,
    /// Restores under way: their memory is not in the reading yet.
    starting: AtomicUsize,
    meminfo: fn() -> Option<(u64, u64)>,
}

/// A place for one sandbox, taken before its restore. Dropped unused, it
/// gives the place back; [`Ticket::admit`] keeps it until
/// [`Admission::release`].
pub struct Ticket<'a> {
    adm: &'a Admission,
    admitted: bool,
}

impl Admission {
    /// Limits: sandbox count, host memory in use (MiB), and the available
    /// memory under which guests are destroyed (MiB).
    pub fn new(max_sandboxes: usize, limit_mib: u64, floor_mib: u64) -> Self {
        Self::with_meminfo(max_sandboxes, limit_mib, floor_mib, host_meminfo_mib)
    }

    /// As [`Admission::new`] with another memory reading (tests).
    pub fn with_meminfo(
        max_sandboxes: usize,
        limit_mib: u64,
        floor_mib: u64,
        meminfo: fn() -> Option<(u64, u64)>,
    ) -> Self {
        Admission {
            max_sandboxes,
            limit_mib,
            floor_mib,
            live: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            meminfo,
        }
    }

    /// Takes a place for one more sandbox, or says why not.
    pub fn reserve(&self) -> Result<Ticket<'_>, GuestError> {
        let max = self.max_sandboxes;
        self.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).map_err(|n| {
            GuestError::Capacity(CapacityReason::SandboxCount, format!("{n} sandboxes running, the limit is {max} (PODFLARE_MAX_SANDBOXES)"))
        })?;
        let starting = self.starting.fetch_add(1, Ordering::AcqRel) as u64 + 1;
        let ticket = Ticket { adm: self, admitted: false };
        let Some((total, avail)) = (self.meminfo)() else {
            return Err(GuestError::Capacity(CapacityReason::Memory, "cannot read host memory (/proc/meminfo); not admitting".into()));
        };
        let used = total.saturating_sub(avail) + starting * RESERVE_MIB;
        if used > self.limit_mib {
            return Err(GuestError::Capacity(
                CapacityReason::Memory,
                format!(
                "host memory in use is {used} MiB counting restores under way; admitting another sandbox would pass the {} MiB limit (PODFLARE_MAX_GUEST_MEMORY_MIB)",
                self.limit_mib
            )));
        }
        Ok(ticket)
    }

    /// A sandbox admitted with [`Ticket::admit`] is gone.
    pub fn release(&self) {
        let _ = self.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Guests that exist now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// MiB of memory the host is short of its floor, if it is: then the
    /// sandbox holding the most should be destroyed.
    pub fn pressure(&self) -> Option<u64> {
        let (_, avail) = (self.meminfo)()?;
        (avail < self.floor_mib).then(|| self.floor_mib - avail)
    }

    /// The floor, MiB.
    pub fn floor_mib(&self) -> u64 {
        self.floor_mib
    }
}

impl Ticket<'_> {
    /// The restore succeeded: the place is the sandbox's until released.
    pub fn admit(mut self) {
        self.admitted = true;
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.adm.starting.fetch_sub(1, Ordering::AcqRel);
        if !self.admitted {
            self.adm.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::{Arc, Barrier};

    fn fake_meminfo() -> Option<(u64, u64)> {
        Some((16_000, 10_000))
    }

    /// Available memory the pressure test moves (its own: tests run in parallel).
    static AVAIL: AtomicU64 = AtomicU64::new(10_000);

    fn moving_meminfo() -> Option<(u64, u64)> {
        Some((16_000, AVAIL.load(Ordering::SeqCst)))
    }

    fn unreadable_meminfo() -> Option<(u64, u64)> {
        None
    }

    #[test]
    fn unreadable_meminfo_is_no_pressure_and_no_admission() {
        let adm = Admission::with_meminfo(10, u64::MAX, 2_000, unreadable_meminfo);
        assert_eq!(adm.pressure(), None, "no sandbox is destroyed on a reading that failed");
        assert!(adm.reserve().is_err());
        assert_eq!(adm.live(), 0);
    }

    #[test]
    fn concurrent_reserves_never_pass_the_count() {
        let adm = Arc::new(Admission::with_meminfo(5, u64::MAX, 0, fake_meminfo));
        let gate = Arc::new(Barrier::new(16));
        let won: usize = (0..16)
            .map(|_| {
                let (adm, gate) = (adm.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    adm.reserve().map(Ticket::admit).is_ok() as usize
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(won, 5);
        assert_eq!(adm.live(), 5);
        adm.release();
        assert!(adm.reserve().is_ok(), "a released place is free again");
    }

    #[test]
    fn restores_under_way_count_against_memory() {
        // 6,000 MiB in use; a limit of 6,200 leaves room for 3 reserves.
        let adm = Admission::with_meminfo(100, 6_200, 0, fake_meminfo);
        let held: Vec<_> = (0..3).map(|_| adm.reserve().expect("room for three")).collect();
        let err = adm.reserve().err().expect("the fourth restore would pass the limit");
        assert!(err.to_string().contains("PODFLARE_MAX_GUEST_MEMORY_MIB"), "{err}");
        assert_eq!(adm.live(), 3, "a refused reserve gives its place back");
        drop(held);
        assert_eq!(adm.live(), 0, "unadmitted tickets give their places back");
    }

    #[test]
    fn pressure_below_the_floor() {
        let adm = Admission::with_meminfo(10, u64::MAX, 2_000, moving_meminfo);
        AVAIL.store(2_500, Ordering::SeqCst);
        assert_eq!(adm.pressure(), None);
        AVAIL.store(1_500, Ordering::SeqCst);
        assert_eq!(adm.pressure(), Some(500));
    }
}

//! Saved KVM state of a vCPU and of the VM (irqchip, PIT, clock), in the
//! order KVM needs it.
//!
//! Save order (vCPU paused at a clean boundary): mp_state, regs, sregs,
//! xsave/fpu, xcrs, debug regs, LAPIC, MSRs, vCPU events, CPUID.
//! Restore order: CPUID first (MSR validity depends on it), mp_state, regs,
//! sregs (before the LAPIC: APIC base lives there), xsave/fpu, xcrs, debug
//! regs, LAPIC, MSRs (TSC before TSC_DEADLINE), vCPU events last (they may
//! reference everything above).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSRs saved with a vCPU when KVM reports them. TSC comes before
/// TSC_DEADLINE because KVM interprets the deadline against the TSC.
const SAVED_MSRS: &[u32] = &[
    0x10,        // TSC
    0x3b,        // TSC_ADJUST
    0x1b,        // APIC_BASE
    0x174, 0x175, 0x176, // SYSENTER
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x2ff,       // MTRR default type
    0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, // variable MTRRs
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f, // fixed MTRRs
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084, // STAR, LSTAR, CSTAR, SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x11, 0x12,  // kvm-clock (old numbers)
    0x4b56_4d00, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04, 0x4b56_4d05, 0x4b56_4d06, // kvm PV MSRs
];

/// What failed while saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM handled fewer MSRs than asked.
    #[error("{what} handled {done} of {wanted} MSRs")]
    Msrs {
        /// Get or set.
        what: &'static str,
        /// Handled.
        done: usize,
        /// Asked.
        wanted: usize,
    },
    /// Saved data does not fit the structure it claims to be.
    #[error("saved state is malformed: {0}")]
    Malformed(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// The legacy FPU area, for hosts without KVM_CAP_XSAVE.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FpuState {
    fpr: Vec<[u8; 16]>,
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: Vec<[u8; 16]>,
    mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> Result<kvm_fpu, StateError> {
        let mut f = kvm_fpu::default();
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err(StateError::Malformed("FPU register count".into()));
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        f.fcw = self.fcw;
        f.fsw = self.fsw;
        f.ftwx = self.ftwx;
        f.last_opcode = self.last_opcode;
        f.last_ip = self.last_ip;
        f.last_dp = self.last_dp;
        f.mxcsr = self.mxcsr;
        Ok(f)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: Option<kvm_xsave>,
    fpu: Option<FpuState>,
    xcrs: Option<kvm_xcrs>,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
    tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VcpuState {{ rip: {:#x}, msrs: {} }}", self.regs.rip, self.msrs.len())
    }
}

/// MSR indices to save: our list, filtered to what KVM reports.
pub fn msrs_to_save(supported: &[u32]) -> Vec<u32> {
    SAVED_MSRS.iter().copied().filter(|m| supported.contains(m)).collect()
}

impl VcpuState {
    /// Reads the state of a paused vCPU; `msr_indices` from [`msrs_to_save`].
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let (xsave, fpu) = match fd.get_xsave() {
            Ok(x) => (Some(x), None),
            Err(_) => (None, Some(FpuState::from_kvm(&fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?))),
        };
        let xcrs = fd.get_xcrs().ok();
        let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> =
            msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Malformed(format!("{e:?}")))?;
        let done = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if done != entries.len() {
            return Err(StateError::Msrs { what: "KVM_GET_MSRS", done, wanted: entries.len() });
        }
        let events = fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            fpu,
            xcrs,
            debug_regs,
            lapic,
            msrs: msrs.as_slice().to_vec(),
            events,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Where the vCPU was (RIP) and its run state (KVM_MP_STATE_*), for
    /// diagnostics of a guest that does not answer.
    pub fn where_at(&self) -> (u64, u32) {
        (self.regs.rip, self.mp_state.mp_state)
    }

    /// Loads this state into a fresh vCPU, in the order KVM needs.
    /// `age_ns` is how long ago the state was saved: the guest's TSC (its
    /// clocksource when the TSC is stable) and TSC deadline move on by that
    /// much, so the guest's clocks are right from its first instruction.
    pub fn restore(&self, fd: &VcpuFd, age_ns: u64) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| StateError::Malformed(format!("cpuid: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                // A host with another TSC frequency scales the guest's; if KVM
                // cannot, the guest still runs with a drifting clock.
                let _ = fd.set_tsc_khz(khz);
            }
        }
        fd.set_mp_state(self.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a full `kvm_xsave` (4 KiB legacy area) as
            // returned by KVM_GET_XSAVE on a vCPU with the same CPUID, and we
            // filter out the features (AMX) whose state would not fit in it.
            unsafe { fd.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        } else if let Some(fpu) = &self.fpu {
            fd.set_fpu(&fpu.to_kvm()?).map_err(kvm_err("KVM_SET_FPU"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&self.debug_regs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        let khz = u128::from(self.tsc_khz.or_else(|| fd.get_tsc_khz().ok()).unwrap_or_else(host_tsc_khz));
        let tsc_ticks = (u128::from(age_ns) * khz / 1_000_000) as u64;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|e| match e.index {
                0x10 => kvm_msr_entry { data: e.data.wrapping_add(tsc_ticks), ..*e },
                0x6e0 if e.data != 0 => kvm_msr_entry { data: e.data.wrapping_add(tsc_ticks), ..*e },
                _ => *e,
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Malformed(format!("msrs: {e:?}")))?;
        let done = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if done != self.msrs.len() {
            return Err(StateError::Msrs { what: "KVM_SET_MSRS", done, wanted: self.msrs.len() });
        }
        fd.set_vcpu_events(&self.events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Interrupt controllers, PIT and clock of a VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
    /// Host wall clock (ns since the epoch) when `clock` was read.
    saved_at_realtime_ns: u64,
}

/// The host TSC rate, measured once, for KVMs (PVM) that do not report the
/// guest's through KVM_GET_TSC_KHZ; unscaled guests tick at the host's rate.
fn host_tsc_khz() -> u32 {
    static KHZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let t0 = std::time::Instant::now();
        // SAFETY: rdtsc reads a counter; it touches no memory.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(std::time::Duration::from_millis(20));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos().max(1);
        (u128::from(c1.wrapping_sub(c0)) * 1_000_000 / ns) as u32
    })
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl VmState {
    /// Reads the VM-wide state (all vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        let chip = |id| -> Result<kvm_irqchip, StateError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        let mut clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // Only the clock value restores; the flags describe the old host.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
            saved_at_realtime_ns: realtime_ns(),
        })
    }

    /// Nanoseconds since this state was saved (host wall clock).
    pub fn age_ns(&self) -> u64 {
        realtime_ns().saturating_sub(self.saved_at_realtime_ns)
    }

    /// Loads the state into a VM that already has its irqchip and PIT;
    /// `age_ns` as for [`VcpuState::restore`].
    pub fn restore(&self, vm: &VmFd, age_ns: u64) -> Result<(), StateError> {
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // The guest's kvm-clock moves on by the wall time the snapshot spent
        // on disk (its wall-clock offset was set when it booted).
        let mut clock = self.clock;
        clock.clock = clock.clock.saturating_add(age_ns);
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

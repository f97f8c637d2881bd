//! The KVM ioctl numbers a vCPU thread may issue after its filter is in.
//! kvm-ioctls keeps its own table private, so the numbers are rebuilt here
//! with the same macros and kvm-bindings types (a wrong size would give a
//! different number: the unit test pins a few against the kernel's values,
//! and `tests/vmm_vcpu.rs` saves a filtered vCPU, which uses all of them).

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);

/// What a vCPU thread does with its fd: `KVM_RUN` in the loop, and the
/// reads of `VcpuState::save` (vmm/state.rs) when asked to Save. Restoring
/// state happens on the thread that builds the VM, before the vCPU thread
/// exists, so no `KVM_SET_*` is here.
pub fn vcpu_thread_ioctls() -> [u64; 13] {
    [
        KVM_RUN(),
        KVM_GET_MP_STATE(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_FPU(),
        KVM_GET_XCRS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_LAPIC(),
        KVM_GET_MSRS(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_CPUID2(),
        KVM_GET_TSC_KHZ(),
    ]
    .map(u64::from)
}

/// The ioctl "type" byte of every KVM ioctl (bits 8..15 of the number).
pub const KVM_IOCTL_TYPE: u64 = (KVMIO as u64) << 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // From linux/kvm.h on x86_64, as the kernel computes them.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_TSC_KHZ(), 0xaea3);
        assert!(vcpu_thread_ioctls().iter().all(|n| n & 0xff00 == KVM_IOCTL_TYPE));
    }
}

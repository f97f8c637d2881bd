//! The 64-bit Linux boot protocol: kernel load, zero page, command line,
//! identity page tables, GDT, and the initial vCPU registers, CPUID and MSRs.
//!
//! Guest physical layout (low memory):
//! ```text
//! 0x0500 GDT   0x0520 IDT   0x7000 zero page (boot_params)   0x8ff0 boot stack
//! 0x9000 PML4  0xa000 PDPT  0xb000 PD (1 GiB identity map, 2 MiB pages)
//! 0x20000 command line      0x1000000 kernel (vmlinux ELF, its own paddr)
//! 0xd0000000.. virtio-mmio devices, 4 KiB each
//! ```

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::memory::ram_bytes;
use super::Backend;
use crate::devices::GuestMemory;

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const ZERO_PAGE: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CMDLINE_ADDR: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
const HIMEM_START: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9fc00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What can go wrong preparing a boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("guest kernel {path}: {source}")]
    KernelFile {
        /// The path given.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable vmlinux.
    #[error("loading guest kernel {path}: {reason} (expected an uncompressed x86-64 vmlinux ELF)")]
    KernelLoad {
        /// The path given.
        path: String,
        /// linux-loader's reason.
        reason: String,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing boot structures: {0}")]
    Memory(String),
    /// A KVM vCPU ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] super::mptable::MpTableError),
    /// KVM accepted fewer MSRs than we set.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Msrs {
        /// Accepted.
        set: usize,
        /// Asked.
        wanted: usize,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { what, source }
}

fn mem_err<E: std::fmt::Display>(e: E) -> BootError {
    BootError::Memory(e.to_string())
}

/// The guest's memory map: RAM below the EBDA and from 1 MiB on, except
/// the REPL's ring region (`podflare_proto::ring`), which is reserved so
/// the guest kernel never allocates it and user space may map it through
/// `/dev/mem`. RAM too small to hold it (hand-made test guests) has no ring.
fn e820_map(ram_end: u64) -> Vec<boot_e820_entry> {
    use podflare_proto::ring;
    let entry = |addr: u64, end: u64, r#type: u32| boot_e820_entry { addr, size: end - addr, r#type };
    let mut map = vec![entry(0, EBDA_START, E820_RAM)];
    if ram_end >= ring::BASE + ring::LEN {
        map.push(entry(HIMEM_START, ring::BASE, E820_RAM));
        map.push(entry(ring::BASE, ring::BASE + ring::LEN, E820_RESERVED));
        if ram_end > ring::BASE + ring::LEN {
            map.push(entry(ring::BASE + ring::LEN, ram_end, E820_RAM));
        }
    } else {
        map.push(entry(HIMEM_START, ram_end, E820_RAM));
    }
    map
}

/// Loads the vmlinux into guest memory and returns its 64-bit entry point.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<GuestAddress, BootError> {
    let mut file = File::open(path)
        .map_err(|source| BootError::KernelFile { path: path.display().to_string(), source })?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad { path: path.display().to_string(), reason: e.to_string() }
    })?;
    Ok(loaded.kernel_load)
}

/// What the guest is told about its machine, beyond the command line: a
/// template snapshot taken under another description is not reused.
/// Revision 2: an MP table (local APICs, IO-APIC) and the TSC-deadline timer.
/// Revision 3: the REPL's ring region, reserved in the e820 map.
/// Revision 4: a virtio-net card.
pub const MACHINE_REVISION: u32 = 4;

/// Writes the command line, the zero page (with its e820 map), the MP table
/// for `vcpus` vCPUs, the GDT, an empty IDT and identity-mapping page tables.
pub fn write_boot_structures(mem: &GuestMemory, cmdline: &str, vcpus: u8) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(mem_err)?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (cmdline.len() + 1) as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    let ram_end = ram_bytes(mem);
    let e820 = e820_map(ram_end);
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE)), mem)
        .map_err(mem_err)?;
    // In the last KiB below 640 KiB, which the e820 map leaves out of RAM.
    super::mptable::write(mem, vcpus)?;

    // Null, 64-bit code, data, TSS descriptors.
    let gdt: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64)).map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(mem_err)?;

    // Identity-map the first GiB with 2 MiB pages: enough for the kernel's
    // early code, which builds its own tables at once.
    mem.write_obj(PDPT | 0x03, GuestAddress(PML4)).map_err(mem_err)?;
    mem.write_obj(PD | 0x03, GuestAddress(PDPT)).map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8)).map_err(mem_err)?;
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: u8::from(selector != 0x18),
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a vCPU in 64-bit mode at `entry` with `rsi` pointing at the zero page.
pub fn setup_registers(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), BootError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = segment(0x08, 0xb, true);
    let data = segment(0x10, 0x3, false);
    let mut tss = segment(0x18, 0xb, false);
    tss.limit = 0xfffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 1 | (1 << 4) | (1 << 31); // PE, ET, PG
    sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    Ok(())
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a BIOS would.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), BootError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let set = |regs: &mut [i8], off: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    set(&mut lapic.regs, 0x350, 0x7);
    set(&mut lapic.regs, 0x360, 0x4);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// MSRs a freshly booted x86-64 CPU needs, filtered to those KVM reports.
pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), BootError> {
    const WANTED: &[(u32, u64)] = &[
        (0x174, 0),                   // SYSENTER_CS
        (0x175, 0),                   // SYSENTER_ESP
        (0x176, 0),                   // SYSENTER_EIP
        (0xc000_0081, 0),             // STAR
        (0xc000_0082, 0),             // LSTAR
        (0xc000_0083, 0),             // CSTAR
        (0xc000_0084, 0),             // SYSCALL_MASK
        (0xc000_0102, 0),             // KERNEL_GS_BASE
        (0x10, 0),                    // TSC
        (0x1a0, 1),                   // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6),       // MTRR default: enabled, write-back
    ];
    let entries: Vec<kvm_msr_entry> = WANTED
        .iter()
        .filter(|(i, _)| supported.contains(i))
        .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| BootError::Memory(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(BootError::Msrs { set, wanted: entries.len() });
    }
    Ok(())
}

/// KVM's supported CPUID and MSR list never change while the module is
/// loaded; asking once per process keeps two slow ioctls off every create.
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, BootError> {
    static CACHE: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();
    if let Some(c) = CACHE.get() {
        return Ok(c.clone());
    }
    let c = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(CACHE.get_or_init(|| c).clone())
}

/// The MSR indices KVM reports (cached, see [`supported_cpuid`]).
pub fn supported_msrs(kvm: &Kvm) -> Result<Vec<u32>, BootError> {
    static CACHE: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    if let Some(c) = CACHE.get() {
        return Ok(c.clone());
    }
    let list = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(CACHE.get_or_init(|| list.as_slice().to_vec()).clone())
}

/// CPUID for vCPU `index` of `count`: KVM's supported set, with this vCPU's
/// APIC id, the hypervisor bit, and on PVM the features the emulator cannot
/// run (xsave, AVX, popcnt, ...) removed.
pub fn cpuid_for(kvm: &Kvm, backend: Backend, index: u8, count: u8) -> Result<CpuId, BootError> {
    let mut cpuid = supported_cpuid(kvm)?;
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor: use kvm-clock
                if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
                    // The local APIC timer armed by one MSR write with an
                    // absolute TSC value: no calibration, no periodic tick.
                    e.ecx |= 1 << 24;
                }
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            (0xb, _) | (0x1f, _) => e.edx = u32::from(index),
            _ => {}
        }
        if backend == Backend::Pvm {
            filter_for_pvm(e);
            hide_pv_hypercalls(e, count);
        }
    }
    Ok(cpuid)
}

/// KVM's paravirtual feature leaf and the feature bits (EAX) that need a
/// hypercall: PV spinlock kick, PV IPIs, PV yield.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_PV_UNHALT: u32 = 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;

/// Hides the paravirtual features that act through a hypercall, which a
/// guest uses only with more than one vCPU. On PVM the hypercall does not
/// complete: a 2-vCPU boot hung with the second vCPU spinning in
/// `__send_ipi_mask` (PV IPI) and the first in `queued_spin_lock_slowpath`.
/// Without them the guest sends IPIs through its local APIC and its
/// spinlocks spin natively. A 1-vCPU guest's CPUID stays as it was, so its
/// template snapshots keep their key.
fn hide_pv_hypercalls(e: &mut kvm_bindings::kvm_cpuid_entry2, count: u8) {
    if count > 1 && e.function == KVM_CPUID_FEATURES {
        e.eax &= !((1 << KVM_FEATURE_PV_UNHALT) | (1 << KVM_FEATURE_PV_SEND_IPI) | (1 << KVM_FEATURE_PV_SCHED_YIELD));
    }
}

/// Features a PVM host cannot emulate in guest kernel mode (each one was an
/// emulation failure or a wrong result), plus every AVX flavour: with
/// `noxsave` the guest kernel would not preserve their upper register halves.
fn filter_for_pvm(e: &mut kvm_bindings::kvm_cpuid_entry2) {
    const fn bits(list: &[u32]) -> u32 {
        let mut v = 0;
        let mut i = 0;
        while i < list.len() {
            v |= 1 << list[i];
            i += 1;
        }
        v
    }
    match (e.function, e.index) {
        // fma, cx16, pcid, popcnt, xsave, osxsave, avx, f16c, rdrand
        (1, _) => e.ecx &= !bits(&[12, 13, 17, 23, 26, 27, 28, 29, 30]),
        (7, 0) => {
            // fsgsbase, avx2, smep, erms, invpcid, avx512f/dq, rdseed, smap,
            // avx512ifma/pf/er/cd/bw/vl
            e.ebx &= !bits(&[0, 5, 7, 9, 10, 16, 17, 18, 20, 21, 26, 27, 28, 30, 31]);
            // avx512vbmi, pku, ospke, vbmi2, vaes, vpclmulqdq, vnni, bitalg, vpopcntdq
            e.ecx &= !bits(&[1, 3, 4, 6, 9, 10, 11, 12, 14]);
            // 4vnniw, 4fmaps, fsrm, avx512_fp16, amx
            e.edx &= !bits(&[2, 3, 4, 22, 23, 24, 25]);
        }
        (7, 1) => e.eax &= !bits(&[4, 5]), // avx-vnni, avx512_bf16
        (0xd, _) => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// The part of the kernel command line that only PVM needs: it turns off
/// what the emulator cannot run and what makes emulated boot slow. One file,
/// shared with `scripts/qemu-boot`, so the reference VMM boots the same way.
pub const PVM_CMDLINE: &str = include_str!("../../kernel-config/pvm-cmdline");

/// Kernel settings (applied before init runs) that stop an idle guest's
/// periodic wake-ups, each measured as timer interrupts of an idle guest:
/// kcompactd's proactive compaction check wakes twice a second, and the
/// vmstat shepherd once a second folds per-CPU counters (every 10 s is
/// plenty for a sandbox's /proc/vmstat).
pub const IDLE_SYSCTLS: &str = "sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10";

/// The guest's network, set by its kernel at boot (`ip=`, static, no
/// DHCP): the same address, gateway and card in every sandbox, since every
/// sandbox restores one snapshot; the host gives each its own network
/// namespace behind the card. IPv6 stays on loopback only: on eth0 it would
/// solicit routers and join groups on timers, for a network that has none.
pub fn network_args() -> String {
    use crate::devices::virtio::net::{GATEWAY_IP, GUEST_IP, PREFIX_LEN};
    let dotted = |a: [u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
    let mask = (u32::MAX << (32 - u32::from(PREFIX_LEN))).to_be_bytes();
    format!(
        "ip={}::{}:{}:sandbox:eth0:off sysctl.net.ipv6.conf.eth0.disable_ipv6=1",
        dotted(GUEST_IP),
        dotted(GATEWAY_IP),
        dotted(mask)
    )
}

/// Builds the full kernel command line.
pub fn cmdline(backend: Backend, virtio_devices: &[(u64, u32)], extra: &str) -> String {
    let mut s = String::from(
        "console=ttyS0 loglevel=4 reboot=k panic=-1 acpi=off pci=off nomodule i8042.noaux \
         root=/dev/vda ro rootfstype=ext4 init=/sbin/podflare-agent",
    );
    s.push(' ');
    s.push_str(IDLE_SYSCTLS);
    for (addr, irq) in virtio_devices {
        s.push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{irq}"));
    }
    if backend == Backend::Pvm {
        s.push(' ');
        s.push_str(PVM_CMDLINE.trim());
        // Tells the agent to keep user code off AVX (see guest/agent env.rs).
        s.push_str(" podflare.pvm=1");
    }
    // The REPL serves its ring at this address (see podflare_proto::ring).
    s.push_str(&format!(" podflare.ring={:#x}", podflare_proto::ring::BASE));
    s.push(' ');
    s.push_str(&network_args());
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_declares_devices_and_pvm_settings_only_on_pvm() {
        let pvm = cmdline(Backend::Pvm, &[(0xd000_0000, 5)], "");
        assert!(pvm.contains("virtio_mmio.device=4K@0xd0000000:5"));
        assert!(pvm.contains("noxsave"));
        let hw = cmdline(Backend::Hardware, &[(0xd000_0000, 5)], "x=1");
        assert!(!hw.contains("noxsave"));
        assert!(hw.ends_with("x=1"));
        assert!(pvm.contains("podflare.ring=0x800000") && hw.contains("podflare.ring=0x800000"));
        assert!(pvm.contains(" ip=172.16.0.2::172.16.0.1:255.255.255.252:sandbox:eth0:off "));
    }

    #[test]
    fn the_ring_region_is_reserved_and_the_rest_of_ram_is_ram() {
        use podflare_proto::ring;
        let map = e820_map(256 << 20);
        let ram: u64 = map.iter().filter(|e| e.r#type == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, EBDA_START + (256 << 20) - HIMEM_START - ring::LEN);
        let reserved: Vec<_> = map.iter().filter(|e| e.r#type == E820_RESERVED).map(|e| (e.addr, e.size)).collect();
        assert_eq!(reserved, vec![(ring::BASE, ring::LEN)]);
        // Entries are in order and never overlap.
        assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        // A guest too small for the region keeps all of its RAM.
        assert_eq!(e820_map(4 << 20).len(), 2);
    }

    #[test]
    fn smp_guests_on_pvm_lose_only_the_hypercall_pv_features() {
        let leaf = || kvm_bindings::kvm_cpuid_entry2 { function: KVM_CPUID_FEATURES, eax: u32::MAX, ..Default::default() };
        let mut one = leaf();
        hide_pv_hypercalls(&mut one, 1);
        assert_eq!(one.eax, u32::MAX, "a 1-vCPU guest's CPUID must not change");
        let mut two = leaf();
        hide_pv_hypercalls(&mut two, 2);
        for bit in [KVM_FEATURE_PV_UNHALT, KVM_FEATURE_PV_SEND_IPI, KVM_FEATURE_PV_SCHED_YIELD] {
            assert_eq!(two.eax & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(two.eax | (1 << 7) | (1 << 11) | (1 << 13), u32::MAX, "only those three bits go");
        let mut other = kvm_bindings::kvm_cpuid_entry2 { function: 1, eax: u32::MAX, ..Default::default() };
        hide_pv_hypercalls(&mut other, 2);
        assert_eq!(other.eax, u32::MAX);
    }

    #[test]
    fn pvm_filter_removes_avx_and_xsave() {
        let mut e = kvm_bindings::kvm_cpuid_entry2 { function: 1, ecx: u32::MAX, ..Default::default() };
        filter_for_pvm(&mut e);
        assert_eq!(e.ecx & (1 << 28), 0);
        assert_eq!(e.ecx & (1 << 26), 0);
        let mut e = kvm_bindings::kvm_cpuid_entry2 { function: 7, ebx: u32::MAX, ..Default::default() };
        filter_for_pvm(&mut e);
        assert_eq!(e.ebx & (1 << 5), 0, "avx2 hidden");
    }

    #[test]
    fn boot_structures_fit_and_page_tables_identity_map() {
        let mem = super::super::memory::anonymous(64 << 20).unwrap();
        write_boot_structures(&mem, "console=ttyS0", 1).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PD + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        let mut cl = [0u8; 13];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"console=ttyS0");
    }
}

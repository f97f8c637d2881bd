//! The Intel MultiProcessor table (MP specification 1.4) that tells the
//! guest kernel what interrupt hardware it has: one local APIC per vCPU, an
//! IO-APIC, and how ISA interrupts reach it.
//!
//! Without it the kernel finds no APIC description (we boot with
//! `acpi=off`), falls back to "virtual wire" mode and ticks on the PIT: ~100
//! emulated timer interrupts a second even when idle. With it, it uses the
//! local APIC's TSC-deadline timer and stops the tick when idle
//! (`NO_HZ_IDLE`), and it can start more than one vCPU.
//!
//! The table sits in the last KiB of base memory (0x9fc00, outside the e820
//! RAM), one of the places the kernel scans for the "_MP_" floating pointer.
//! It is built as bytes (every field little-endian, no padding), so no
//! packed structs are needed, and written through vm-memory's checked
//! accessors.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemory;

/// Where the floating pointer goes; the configuration table follows it.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The space the kernel scans there: one KiB up to 0xa0000.
const MPTABLE_SPACE: usize = 1024;
/// Where the guest finds its local APIC and IO-APIC registers (the
/// architectural defaults KVM's in-kernel irqchip emulates).
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Version registers of KVM's emulated local APIC and IO-APIC.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// IO-APIC input pins KVM's IO-APIC has; every ISA IRQ maps to its own pin.
const IOAPIC_PINS: u8 = 24;
/// The largest vCPU count one table describes within its KiB.
pub const MAX_VCPUS: u8 = 32;

// Entry types and flags (MP specification, chapter 4).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (edge, active high on ISA).
const INT_FLAGS_BUS_DEFAULT: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Family 6 in the processor entry's signature; APIC and FPU feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 9) | 1;

/// What can go wrong writing the table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than one table holds.
    #[error("{0} vCPUs: the MP table describes 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// Guest memory does not cover the table's place.
    #[error("writing the MP table: {0}")]
    Memory(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// The floating pointer and configuration table for `vcpus` vCPUs, as the
/// bytes to place at [`MPTABLE_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus; // APIC ids 0..vcpus are the vCPUs'
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IO-APIC pin n: KVM's default routing sends GSI n there.
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_VECTORED]);
        entries.extend_from_slice(&INT_FLAGS_BUS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of the boot vCPU takes the 8259's output, LINT1 of every vCPU
    // (0xff) is NMI: the wiring every PC has.
    for (kind, apic, lint) in [(INT_EXTINT, 0u8, 0u8), (INT_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_BUS_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, apic, lint]);
        count += 1;
    }

    const HEADER: usize = 44;
    let table_len = HEADER + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // specification revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"PODFLARE"); // OEM id
    table.extend_from_slice(b"HOSTD       "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // its size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // no extended table
    debug_assert_eq!(table.len(), HEADER);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // specification revision 1.4
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows; no IMCR
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    debug_assert!(out.len() <= MPTABLE_SPACE);
    Ok(out)
}

/// Writes the table for `vcpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus)?;
    // Checked: fails rather than writing past guest RAM.
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(|e| MpTableError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads the table back the way the kernel's mpparse does.
    #[test]
    fn tables_parse_and_checksum_for_every_size() {
        for vcpus in 1..=MAX_VCPUS {
            let t = build(vcpus).unwrap();
            assert!(t.len() <= MPTABLE_SPACE, "{vcpus} vCPUs: {} bytes", t.len());
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let phys = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            let table = &t[(phys - MPTABLE_START) as usize..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(&table[..len]), 0, "configuration table checksum");
            assert_eq!(u32::from_le_bytes(table[36..40].try_into().unwrap()), LAPIC_ADDR);
            let count = u16::from_le_bytes([table[34], table[35]]);
            // Walk the entries by type, as the kernel does.
            let (mut at, mut cpus, mut ioapics, mut irqs, mut lints) = (44, 0, 0, 0, 0);
            for _ in 0..count {
                match table[at] {
                    ENTRY_PROCESSOR => {
                        assert_eq!(table[at + 1], cpus, "APIC ids in order");
                        assert_eq!(table[at + 3] & CPU_BOOTSTRAP != 0, cpus == 0, "only vCPU 0 boots");
                        cpus += 1;
                        at += 20;
                    }
                    ENTRY_BUS => {
                        assert_eq!(&table[at + 2..at + 8], b"ISA   ");
                        at += 8;
                    }
                    ENTRY_IOAPIC => {
                        assert_eq!(table[at + 1], vcpus, "IO-APIC id after the vCPUs'");
                        assert_eq!(u32::from_le_bytes(table[at + 4..at + 8].try_into().unwrap()), IOAPIC_ADDR);
                        ioapics += 1;
                        at += 8;
                    }
                    ENTRY_IO_INTERRUPT => {
                        assert_eq!(table[at + 5], table[at + 7], "ISA IRQ n on pin n");
                        irqs += 1;
                        at += 8;
                    }
                    ENTRY_LOCAL_INTERRUPT => {
                        lints += 1;
                        at += 8;
                    }
                    other => panic!("unknown entry type {other}"),
                }
            }
            assert_eq!(at, len, "entries fill the table exactly");
            assert_eq!((cpus, ioapics, irqs, lints), (vcpus, 1, IOAPIC_PINS, 2));
        }
    }

    #[test]
    fn vcpu_counts_outside_the_table_are_refused() {
        assert!(matches!(build(0), Err(MpTableError::VcpuCount(0))));
        assert!(matches!(build(MAX_VCPUS + 1), Err(MpTableError::VcpuCount(_))));
    }

    #[test]
    fn written_where_the_kernel_scans() {
        let mem = crate::vmm::memory::anonymous(2 << 20).unwrap();
        write(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
        assert!(MPTABLE_START >= 0x9fc00 && MPTABLE_START + MPTABLE_SPACE as u64 <= 0xa0000);
    }
}

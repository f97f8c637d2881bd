//! Snapshot state files for the `snapshot_state` target: the metadata the
//! target expects, a real state file built from live devices (the seed),
//! the frame around an arbitrary payload, and the device half of a restore
//! (everything `DeviceManager::build` does with saved state except KVM).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use podflare_hostd::devices::serial::{ConsoleLog, SerialDevice};
use podflare_hostd::vmm::device_manager::{DeviceSnapshot, DevicesState};
use podflare_hostd::vmm::snapshot::{SnapshotFile, SnapshotMeta, FORMAT_VERSION};
use podflare_hostd::vmm::Backend;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{Kind, Rig};

/// First bytes of every state file.
pub const MAGIC: &[u8; 8] = b"PFSNAP\r\n";

/// What the target's "host" expects (the seed was taken on it).
pub fn expect_meta() -> SnapshotMeta {
    SnapshotMeta {
        backend: Backend::Hardware,
        cpu_model: "fuzz CPU".into(),
        kernel_id: "vmlinux-fuzz".into(),
        rootfs_id: "rootfs-fuzz".into(),
        ram_bytes: crate::virtio::MEM_SIZE,
        taken_unix: 0,
    }
}

/// `payload` in the state file's frame (magic, version, length, sha256).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(52 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

fn v<T: serde::Serialize>(x: T) -> Value {
    serde_json::to_value(x).expect("serialize")
}

/// A one-vCPU machine state (zeroed KVM registers: they are only decoded
/// here) with the live state of the three devices, as a VM after a
/// request on each virtio device would have it.
pub fn payload(devices: DevicesState) -> Value {
    let vcpu = json!({
        "cpuid": [v(kvm_cpuid_entry2 { function: 1, eax: 0x806f8, ..Default::default() })],
        "mp_state": v(kvm_mp_state::default()),
        "regs": v(kvm_regs { rip: 0x100_0000, rflags: 2, ..Default::default() }),
        "sregs": v(kvm_sregs::default()),
        "xsave": v(kvm_xsave::default()),
        "fpu": null,
        "xcrs": v(kvm_xcrs::default()),
        "debug_regs": v(kvm_debugregs::default()),
        "lapic": v(kvm_lapic_state::default()),
        "msrs": [v(kvm_msr_entry { index: 0x10, data: 12345, ..Default::default() })],
        "events": v(kvm_vcpu_events::default()),
        "tsc_khz": 2_000_000,
    });
    let vm = json!({
        "pic_master": v(kvm_irqchip::default()),
        "pic_slave": v(kvm_irqchip { chip_id: 1, ..Default::default() }),
        "ioapic": v(kvm_irqchip { chip_id: 2, ..Default::default() }),
        "pit": v(kvm_pit_state2::default()),
        "clock": v(kvm_clock_data::default()),
        "saved_at_realtime_ns": 1u64,
    });
    json!({ "meta": v(expect_meta()), "machine": { "vm": vm, "vcpus": [vcpu], "devices": v(devices) } })
}

/// Restores every device state of `snap` as the VMM would (by table name),
/// then lets each restored virtio device look at its queues.
pub fn restore_devices(snap: &SnapshotFile) {
    let devices = &snap.machine.devices.devices;
    let find = |name: &str| devices.iter().find(|(n, _)| n == name).map(|(_, s)| s);
    if let Some(DeviceSnapshot::Serial(s)) = find("serial") {
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let _ = SerialDevice::restore(s, irq, ConsoleLog::new(1024));
    }
    for (name, kind) in [("block", Kind::Block), ("console", Kind::Console)] {
        let Some(DeviceSnapshot::Virtio(st)) = find(name) else { continue };
        let mut rig = Rig::new(kind);
        if rig.restore(st) {
            for q in 0..rig.transport.num_queues() {
                rig.transport.queue_notify(q);
            }
            if let Some(c) = &rig.console {
                c.model.lock().unwrap_or_else(|e| e.into_inner()).process_host_output();
            }
        }
    }
}

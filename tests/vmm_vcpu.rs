//! The vCPU thread state machine seen from outside, with hand-made guests (a
//! few instructions, no Linux): pause/resume through `Vm`, Save refused while
//! running, Resume refused once the guest has stopped; and, on `VcpuHandle`s
//! driven directly, the thread-start hook and a device panic on a running
//! vCPU thread (contained, and no later kick writes through a stale pointer).
//!
//! Needs `/dev/kvm`; where it exists a broken VM fails the test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use podflare_hostd::devices::bus::{Bus, BusDevice};
use podflare_hostd::devices::GuestMemory;
use podflare_hostd::vmm::vcpu::{self, VcpuCommand, VcpuContext, VcpuHandle, VcpuReply};
use podflare_hostd::vmm::vm::{Vm, VmSpec};
use podflare_hostd::vmm::{boot, memory, Backend};
use vm_memory::{Bytes, GuestAddress};

/// 64-bit code: write "OK" to the serial port, then halt forever.
const OK_THEN_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
];

/// 64-bit code: write to port 0x80, then halt forever.
const OUT_0X80_THEN_HALT: &[u8] = &[
    0xe6, 0x80, // out 0x80, al
    0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
];

/// 64-bit code: 0xfe to the i8042 command port (reset), then halt forever.
const RESET: &[u8] = &[
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
];

fn spec(rootfs: &std::path::Path) -> VmSpec {
    common::tiny_spec(rootfs)
}

/// Polls `done` for up to 30 s (the guest runs on its own thread).
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn pause_resume_pause_and_save_only_while_paused() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    let rootfs = common::temp_file("vcpu-rootfs1", &[0u8; 4096]);
    let vm = Vm::boot_code(&kvm, "vcpu-prp", &spec(&rootfs), OK_THEN_HALT).expect("boot tiny guest");
    wait_for("OK on the serial port", || vm.console_log().contains(b"OK"));

    vm.pause().expect("pause a running guest");
    vm.resume().expect("resume a paused guest");
    vm.pause().expect("pause it again");
    let saved = vm.save_state().expect("save while paused");
    assert_eq!(saved.vcpus.len(), 1);

    vm.resume().expect("resume after saving");
    let err = vm.save_state().err().expect("save while running must be refused").to_string();
    assert!(err.contains("pause the vCPU before saving"), "{err}");
    // The refusal left the vCPU running and answering.
    vm.pause().expect("pause after a refused save");
    assert_eq!(vm.status().stopped(), None);
}

#[test]
fn a_stopped_guest_refuses_resume_but_answers_pause_and_save() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    let rootfs = common::temp_file("vcpu-rootfs2", &[0u8; 4096]);
    let vm = Vm::boot_code(&kvm, "vcpu-reset", &spec(&rootfs), RESET).expect("boot tiny guest");
    wait_for("the guest's reset", || vm.status().stopped().is_some());
    assert_eq!(vm.status().stopped().as_deref(), Some("guest reset the machine"));

    let err = vm.resume().expect_err("resume of a stopped guest must be refused").to_string();
    assert!(err.contains("the guest has stopped"), "{err}");
    vm.pause().expect("pause is still answered");
    vm.save_state().expect("save is still answered");
}

const ANSWER: Duration = Duration::from_secs(5);

/// A vCPU index and the name of the thread the hook ran on.
type HookCall = (u8, Option<String>);

#[test]
fn the_thread_start_hook_runs_once_on_each_vcpu_thread_before_its_loop() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    vcpu::install_kick_handler().expect("kick handler");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let calls: Arc<Mutex<Vec<HookCall>>> = Arc::default();
    let seen = calls.clone();
    let hook: vcpu::ThreadStartHook = Arc::new(move |index| {
        let thread = std::thread::current().name().map(str::to_string);
        seen.lock().unwrap().push((index, thread));
        Ok(())
    });
    let ctx = Arc::new(VcpuContext { on_thread_start: Some(hook), ..VcpuContext::standalone() });
    let mut handles: Vec<VcpuHandle> = (0..2u8)
        .map(|i| {
            let fd = vm.create_vcpu(u64::from(i)).expect("KVM_CREATE_VCPU");
            VcpuHandle::spawn("hooked", i, fd, ctx.clone()).expect("spawn vCPU thread")
        })
        .collect();
    // A reply comes from the loop, which starts only after the hook returned.
    for h in &handles {
        let reply = h.command(VcpuCommand::Pause, ANSWER).expect("reply");
        assert!(matches!(reply, VcpuReply::Paused), "{reply:?}");
    }
    for h in &mut handles {
        h.stop(ANSWER);
    }
    let mut calls = calls.lock().unwrap().clone();
    calls.sort();
    let want = [(0, Some("hooked-vcpu0".to_string())), (1, Some("hooked-vcpu1".to_string()))];
    assert_eq!(calls, want, "one call per vCPU, on that vCPU's own thread");
    assert_eq!(ctx.status.stopped(), None);
}

#[test]
fn a_failing_thread_start_hook_fails_the_vm_instead_of_running_the_vcpu() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    vcpu::install_kick_handler().expect("kick handler");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let hook: vcpu::ThreadStartHook = Arc::new(|_| Err("no seccomp filter".into()));
    let ctx = Arc::new(VcpuContext { on_thread_start: Some(hook), ..VcpuContext::standalone() });
    let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut h = VcpuHandle::spawn("unhooked", 0, fd, ctx.clone()).expect("spawn vCPU thread");
    let reply = h.command(VcpuCommand::Resume, ANSWER).expect("reply");
    assert!(matches!(&reply, VcpuReply::Error(e) if e.contains("no seccomp filter")), "{reply:?}");
    let why = ctx.status.stopped().expect("the VM is failed");
    assert!(why.contains("vCPU 0 thread start: no seccomp filter"), "{why}");
    h.stop(ANSWER);
}

/// A VM fd with guest RAM, without a `Vm`, so the test owns its vCPU threads.
/// Field order is drop order: the VM fd (and its memory slot) goes before the
/// memory it points at.
struct BareVm {
    _fd: VmFd,
    _mem: GuestMemory,
}

/// One vCPU set up as `Vm::boot_code` does: `code` at 0x1000 in 64-bit mode.
fn bare_vm(kvm: &Kvm, code: &[u8]) -> (BareVm, VcpuFd) {
    let mem = memory::anonymous(32 << 20).expect("guest RAM");
    let fd = kvm.create_vm().expect("KVM_CREATE_VM");
    fd.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    memory::register_slots(&fd, &mem).expect("memory slot");
    fd.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    boot::write_boot_structures(&mem, "", 1).expect("page tables, GDT");
    mem.write_slice(code, GuestAddress(0x1000)).expect("guest code");
    let vcpu = fd.create_vcpu(0).expect("KVM_CREATE_VCPU");
    vcpu.set_cpuid2(&boot::cpuid_for(kvm, Backend::detect(), 0, 1).expect("CPUID")).expect("KVM_SET_CPUID2");
    boot::setup_msrs(&vcpu, &boot::supported_msrs(kvm).expect("MSR list")).expect("MSRs");
    boot::setup_registers(&vcpu, GuestAddress(0x1000)).expect("registers");
    boot::setup_lapic(&vcpu).expect("LAPIC");
    (BareVm { _fd: fd, _mem: mem }, vcpu)
}

/// Device code with a bug: panics on the first write, on the vCPU thread.
struct PanickingDevice;

impl BusDevice for PanickingDevice {
    fn read(&mut self, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: u64, _: &[u8]) {
        panic!("device bug (this panic is expected)");
    }
}

#[test]
fn a_panic_on_a_running_vcpu_thread_fails_the_vm_and_later_kicks_are_harmless() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    vcpu::install_kick_handler().expect("kick handler");
    let (bare, fd) = bare_vm(&kvm, OUT_0X80_THEN_HALT);
    let mut pio = Bus::new();
    pio.insert(0x80, 1, Arc::new(Mutex::new(PanickingDevice))).expect("device on port 0x80");
    let ctx = Arc::new(VcpuContext { pio: Arc::new(pio), ..VcpuContext::standalone() });
    let mut h = VcpuHandle::spawn("panicky", 0, fd, ctx.clone()).expect("spawn vCPU thread");
    let reply = h.command(VcpuCommand::Resume, ANSWER).expect("reply");
    assert!(matches!(reply, VcpuReply::Resumed), "{reply:?}");

    // The guest's first instruction makes the device panic inside the running
    // state. The status is set once the unwinding is over, when the VcpuFd and
    // its kvm_run mapping are gone.
    wait_for("the VM to be marked failed", || ctx.status.stopped().is_some());
    assert_eq!(ctx.status.stopped().as_deref(), Some("vCPU 0 thread panicked"));

    // Every command kicks the thread (each retry sends another signal). Had
    // the handler kept the old kvm_run pointer, it would write to unmapped
    // memory now and kill this process.
    for cmd in [VcpuCommand::Pause, VcpuCommand::Resume, VcpuCommand::Save, VcpuCommand::Pause] {
        let reply = h.command(cmd, ANSWER).expect("reply");
        assert!(matches!(&reply, VcpuReply::Error(e) if e == "vCPU thread panicked"), "{reply:?}");
    }
    h.stop(ANSWER);
    drop(bare);
}

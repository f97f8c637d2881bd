//! The vCPU thread state machine seen from outside, with hand-made guests (a
//! few instructions, no Linux): pause/resume through `Vm`, Save refused while
//! running, Resume refused once the guest has stopped; and, on `VcpuHandle`s
//! driven directly, the thread-start hook.
//!
//! Needs `/dev/kvm`; where it exists a broken VM fails the test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podflare_hostd::vmm::vcpu::{self, VcpuCommand, VcpuContext, VcpuHandle, VcpuReply};
use podflare_hostd::vmm::vm::{Vm, VmSpec};
use podflare_hostd::vmm::Backend;

/// 64-bit code: write "OK" to the serial port, then halt forever.
const OK_THEN_HALT: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
];

/// 64-bit code: 0xfe to the i8042 command port (reset), then halt forever.
const RESET: &[u8] = &[
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp back to hlt
];

fn spec(rootfs: &std::path::Path) -> VmSpec {
    VmSpec {
        kernel: "/nonexistent".into(),
        rootfs: rootfs.to_path_buf(),
        ram_bytes: 32 << 20,
        vcpus: 1,
        backend: Backend::detect(),
        extra_cmdline: String::new(),
    }
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

    let err = vm.resume().err().expect("resume of a stopped guest must be refused").to_string();
    assert!(err.contains("the guest has stopped"), "{err}");
    vm.pause().expect("pause is still answered");
    vm.save_state().expect("save is still answered");
}

const ANSWER: Duration = Duration::from_secs(5);

#[test]
fn the_thread_start_hook_runs_once_on_each_vcpu_thread_before_its_loop() {
    let Some(kvm) = common::kvm_or_skip() else { return };
    vcpu::install_kick_handler().expect("kick handler");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let calls: Arc<Mutex<Vec<(u8, Option<String>)>>> = Arc::default();
    let seen = calls.clone();
    let hook: vcpu::ThreadStartHook = Arc::new(move |index| {
        let thread = std::thread::current().name().map(str::to_string);
        seen.lock().unwrap().push((index, thread));
        Ok(())
    });
    let ctx = Arc::new(VcpuContext::standalone(Vec::new(), Some(hook)));
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
    let ctx = Arc::new(VcpuContext::standalone(Vec::new(), Some(hook)));
    let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut h = VcpuHandle::spawn("unhooked", 0, fd, ctx.clone()).expect("spawn vCPU thread");
    let reply = h.command(VcpuCommand::Resume, ANSWER).expect("reply");
    assert!(matches!(&reply, VcpuReply::Error(e) if e.contains("no seccomp filter")), "{reply:?}");
    let why = ctx.status.stopped().expect("the VM is failed");
    assert!(why.contains("vCPU 0 thread start: no seccomp filter"), "{why}");
    h.stop(ANSWER);
}

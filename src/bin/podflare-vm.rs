//! podflare-vm: cold-boot one guest in hostd's VMM and show its console.
//!
//! `podflare-vm KERNEL IMAGE [EXTRA_CMDLINE...]` prints the serial console as
//! it arrives and exits when the guest stops (0 on a clean stop). With
//! `PODFLARE_VM_WAIT_READY=1` it instead waits for the guest agent and the
//! REPL to announce themselves on the channel, prints the time taken, and
//! exits: the cold-boot figure `scripts/bench` compares with QEMU.
//! Env: `PODFLARE_GUEST_RAM_MIB` (512), `PODFLARE_BOOT_TIMEOUT_SECS` (900),
//! `PODFLARE_VM_VCPUS` (1; a 2-vCPU guest boots through its selftest on
//! PVM, while hostd itself still refuses more than 1),
//! `PODFLARE_VM_SAMPLE_SECS` (0: off; else print every vCPU's RIP and run
//! state that often, pausing the guest for a moment each time).

use std::io::Write;
use std::time::{Duration, Instant};

use podflare_hostd::vmm::vm::{Vm, VmSpec};
use podflare_hostd::vmm::Backend;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: podflare-vm KERNEL IMAGE [EXTRA_CMDLINE...]");
        std::process::exit(64);
    }
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("podflare-vm: cannot open /dev/kvm: {e}");
            std::process::exit(1);
        }
    };
    let backend = Backend::detect();
    let spec = VmSpec {
        kernel: args[0].clone().into(),
        rootfs: args[1].clone().into(),
        ram_bytes: env_u64("PODFLARE_GUEST_RAM_MIB", 512) << 20,
        vcpus: env_u64("PODFLARE_VM_VCPUS", 1).clamp(1, 8) as u8,
        backend,
        extra_cmdline: args[2..].join(" "),
        disk: None,
    };
    let timeout = Duration::from_secs(env_u64("PODFLARE_BOOT_TIMEOUT_SECS", 900));
    let wait_ready = std::env::var("PODFLARE_VM_WAIT_READY").as_deref() == Ok("1");
    let started = Instant::now();
    let vm = match Vm::boot(&kvm, "vm", &spec) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("podflare-vm: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("podflare-vm: {} KVM, VM created in {:.1} ms", backend.name(), started.elapsed().as_secs_f64() * 1e3);
    if wait_ready {
        for port in 0..2 {
            if let Err(e) = vm.channel().wait_ready(port, 0, timeout) {
                eprintln!("podflare-vm: port {port}: {e}");
                let _ = std::io::stdout().write_all(&vm.console_log().contents());
                std::process::exit(1);
            }
        }
        println!("ready_ms {:.1}", started.elapsed().as_secs_f64() * 1e3);
        return;
    }
    let sample_every = Duration::from_secs(env_u64("PODFLARE_VM_SAMPLE_SECS", 0));
    let mut next_sample = started + sample_every;
    let mut shown = 0u64;
    let mut out = std::io::stdout();
    loop {
        let total = vm.console_log().total_written();
        if total > shown {
            let contents = vm.console_log().contents();
            let new = (total - shown).min(contents.len() as u64) as usize;
            let _ = out.write_all(&contents[contents.len() - new..]);
            let _ = out.flush();
            shown = total;
        }
        if let Some(why) = vm.status().stopped() {
            eprintln!("podflare-vm: guest stopped after {:.1} s: {why}", started.elapsed().as_secs_f64());
            std::process::exit(if why.contains("failed") || why.contains("exit") { 2 } else { 0 });
        }
        if !sample_every.is_zero() && Instant::now() >= next_sample {
            next_sample += sample_every;
            let at = vm.pause().and_then(|()| vm.save_state());
            let _ = vm.resume();
            match at {
                Ok(state) => {
                    let cpus: Vec<String> = state
                        .vcpus
                        .iter()
                        .map(|v| {
                            let (rip, mp) = v.where_at();
                            format!("rip={rip:#x} mp_state={mp}")
                        })
                        .collect();
                    eprintln!("podflare-vm: at {:.1} s: {}", started.elapsed().as_secs_f64(), cpus.join("; "));
                }
                Err(e) => eprintln!("podflare-vm: sample failed: {e}"),
            }
        }
        if started.elapsed() > timeout {
            eprintln!("podflare-vm: timed out after {timeout:?}");
            std::process::exit(124);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

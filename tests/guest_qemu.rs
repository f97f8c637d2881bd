//! The guest side end to end under a reference VMM: QEMU (microvm) boots the
//! guest kernel and the `default` rootfs image with `podflare.selftest=1`;
//! the agent (PID 1) builds its overlay root, runs `python3 -c 'print(6*7)'`,
//! `bash -c 'echo hi'` and a Python exec through the REPL's wire protocol,
//! prints the results on the serial console and powers off.
//!
//! Where /dev/kvm exists this test fails if the guest does not work; without
//! it, it skips and says why. Needs the kernel (`scripts/build-kernel`) and
//! QEMU 10 (`scripts/install-qemu`); builds the image if it is not cached.
//! Run with `--nocapture` to see the boot log and timings.
//!
//! Env: PODFLARE_QEMU_TEST_TIMEOUT_SECS (default 600), PODFLARE_CACHE.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cache() -> PathBuf {
    std::env::var_os("PODFLARE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/podflare".into())
}

/// The cached kernel: `kernel/current` is the vmlinux itself or its directory.
fn kernel() -> PathBuf {
    let current = cache().join("kernel/current");
    let path = if current.is_dir() {
        current.join("vmlinux")
    } else {
        current
    };
    assert!(
        path.is_file(),
        "no guest kernel at {}: run scripts/build-kernel",
        path.display()
    );
    path
}

/// Builds (or finds, in well under a second) the `default` image.
fn image() -> PathBuf {
    let out = Command::new(repo().join("scripts/build-rootfs"))
        .arg("default")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-rootfs");
    assert!(
        out.status.success(),
        "scripts/build-rootfs default failed: {}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        path.is_file(),
        "build-rootfs printed {path:?}, not an image"
    );
    path
}

fn kill_group(pid: u32) {
    // SAFETY: plain syscall; the group was created by process_group(0) below
    // and holds only qemu-boot and its children.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

#[test]
fn qemu_boots_default_image_and_selftest_passes() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: /dev/kvm does not exist on this machine; the QEMU guest test needs KVM");
        return;
    }
    let timeout = Duration::from_secs(
        std::env::var("PODFLARE_QEMU_TEST_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600),
    );
    let (kernel, image) = (kernel(), image());
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let t0 = Instant::now();
    let mut child = Command::new(repo().join("scripts/qemu-boot"))
        .arg(&kernel)
        .arg(&image)
        .arg("podflare.selftest=1")
        .arg(format!("podflare.pvm={}", u8::from(pvm)))
        .env("QEMU_TIMEOUT", (timeout.as_secs() + 30).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("run scripts/qemu-boot (QEMU installed? scripts/install-qemu)");
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((t0.elapsed(), line)).is_err() {
                break;
            }
        }
    });

    let mut log: Vec<(Duration, String)> = Vec::new();
    let mut done = false;
    while !done {
        let left = timeout.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                println!("[{:7.2}] {line}", at.as_secs_f64());
                done = line.contains("podflare-selftest: done");
                let fatal = line.contains("Kernel panic") || line.contains("KVM internal error");
                log.push((at, line));
                if fatal {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                kill_group(pid);
                let _ = child.wait();
                panic!(
                    "no 'podflare-selftest: done' within {timeout:?}; QEMU killed. Console:\n{}",
                    tail(&log)
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // qemu-boot stops QEMU itself once the guest powers off; do not wait long.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_group(pid);
    let _ = child.wait();

    let find = |needle: &str| log.iter().find(|(_, l)| l.contains(needle)).cloned();
    assert!(
        done,
        "the guest did not finish its selftest. Console:\n{}",
        tail(&log)
    );
    let up = find("podflare-selftest: userspace up").expect("agent start line");
    for expect in [
        "podflare-selftest: python: 42",
        "podflare-selftest: bash: hi",
        "podflare-selftest: repl: 42",
    ] {
        assert!(
            log.iter()
                .any(|(_, l)| l.trim_end() == expect || l.ends_with(expect)),
            "missing '{expect}' on the console:\n{}",
            tail(&log)
        );
    }
    for failure in [
        "podflare-agent: panic",
        "overlay root failed",
        "spawn failed",
    ] {
        assert!(
            find(failure).is_none(),
            "'{failure}' on the console:\n{}",
            tail(&log)
        );
    }
    println!(
        "QEMU: agent running {:.1} s after QEMU start",
        up.0.as_secs_f64()
    );
    for (_, line) in log
        .iter()
        .filter(|(_, l)| l.contains(" in ") && l.contains("podflare-selftest"))
    {
        println!("QEMU: {line}");
    }
    println!(
        "QEMU: selftest done {:.1} s after QEMU start (pvm={pvm})",
        find("podflare-selftest: done").map_or(0.0, |d| d.0.as_secs_f64())
    );
}

fn tail(log: &[(Duration, String)]) -> String {
    let start = log.len().saturating_sub(60);
    log[start..]
        .iter()
        .map(|(t, l)| format!("[{:7.2}] {l}\n", t.as_secs_f64()))
        .collect()
}

//! hostd as a systemd service (`scripts/deploy/podflare-hostd.service`):
//! the unit file passes `systemd-analyze verify` with nothing to say, and
//! readiness is truthful: the real binary, started with `NOTIFY_SOCKET` on a
//! datagram socket of this test, sends `READY=1` only once `/v1/healthz`
//! answers, `STOPPING=1` on SIGTERM, and a socket nobody listens on costs a
//! warning, not the start. Where systemd is PID 1 (and the test is root) the
//! unit's own settings run hostd under `systemd-run`, which must reach
//! `active` and serve.
//!
//! hostd runs with no templates and an empty cache of its own: it opens
//! `/dev/kvm` and serves, but boots no guest. Needs `/dev/kvm` for the
//! runs (skipped, and said so, where it does not exist).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::request;
use common::process::wait_exit;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const HOSTD: &str = env!("CARGO_BIN_EXE_podflare-hostd");

/// Start-up with no template to build takes about a second; this is slack
/// for a loaded machine.
const START_BOUND: Duration = Duration::from_secs(60);

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deploy/podflare-hostd.service")
}

fn unit_text() -> String {
    std::fs::read_to_string(unit_path()).expect("scripts/deploy/podflare-hostd.service")
}

/// `key=value` settings of the unit's `[Service]` section, in order.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') && !line.starts_with(';') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A private directory (hostd refuses a cache others can write) for one
/// run: the cache, a stand-in kernel file (never booted: no templates),
/// the notify socket and hostd's log.
fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podflare-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("cache/kernel")).unwrap();
    for d in [dir.clone(), dir.join("cache"), dir.join("cache/kernel")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::write(dir.join("cache/kernel/vmlinux"), b"not booted").unwrap();
    dir
}

/// The environment of a hostd that serves without building anything.
/// `PODFLARE_TEMPLATES` must be non-blank to count as set; "," is the
/// empty list.
fn quiet_env(dir: &Path, addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("PODFLARE_HOSTD_ADDR", addr.to_string()),
        ("PODFLARE_CACHE", dir.join("cache").display().to_string()),
        ("PODFLARE_KERNEL", dir.join("cache/kernel/vmlinux").display().to_string()),
        ("PODFLARE_TEMPLATES", ",".into()),
        ("PODFLARE_LOG_FORMAT", "json".into()),
    ]
}

fn start(dir: &Path, addr: SocketAddr, notify_socket: &Path) -> Child {
    let log = std::fs::File::create(dir.join("hostd.log")).unwrap();
    Command::new(HOSTD)
        .envs(quiet_env(dir, addr))
        .env("NOTIFY_SOCKET", notify_socket)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start hostd")
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("hostd.log")).unwrap_or_default()
}

fn recv(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn kvm_or_skip() -> bool {
    let there = Path::new("/dev/kvm").exists();
    if !there {
        eprintln!("SKIP: /dev/kvm does not exist on this machine; hostd cannot start here");
    }
    there
}

#[test]
fn the_unit_file_says_what_hostd_needs() {
    let unit = unit_text();
    let settings = service_settings(&unit);
    let get = |k: &str| settings.iter().filter(|(key, _)| key == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("ExecStart"), ["/usr/local/bin/podflare-hostd"]);
    assert_eq!(get("NoNewPrivileges"), ["yes"]);
    assert_eq!(get("DevicePolicy"), ["closed"]);
    assert_eq!(get("DeviceAllow"), ["/dev/kvm rw", "/dev/net/tun rw"]);
    // Sandbox networking keeps its lock and saved setting there.
    assert_eq!(get("RuntimeDirectory"), ["podflare"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    // What hostd writes must be what it is told to use.
    let cache = get("Environment").iter().find_map(|e| e.strip_prefix("PODFLARE_CACHE=")).map(str::to_string);
    assert_eq!(get("ReadWritePaths"), [cache.expect("PODFLARE_CACHE set in the unit").as_str()]);
    // hostd installs its own seccomp filters; a unit filter would stack on
    // them and refuse what a thread kind needs.
    assert!(get("SystemCallFilter").is_empty(), "the unit must not filter syscalls itself");
    // hostd writes vm.max_map_count at start.
    assert!(get("ProtectKernelTunables").iter().all(|v| *v == "no"));
}

#[test]
fn the_unit_file_verifies_cleanly() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is not installed (scripts/setup installs the `systemd` package)");
    };
    assert!(out.status.success());
    // verify wants ExecStart= to exist: a copy that runs the binary under test.
    let dir = std::env::temp_dir().join(format!("podflare-ops-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("podflare-hostd.service");
    let text: String = unit_text()
        .lines()
        .map(|l| if l.starts_with("ExecStart=") { format!("ExecStart={HOSTD}\n") } else { format!("{l}\n") })
        .collect();
    assert!(text.contains(&format!("ExecStart={HOSTD}\n")));
    std::fs::write(&copy, text).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("systemd-analyze verify");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    // Unknown keys and unparsable values are only warnings ("..., ignoring")
    // with exit status 0: any line about this unit is a fault.
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains("podflare-hostd")).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify complains:\n{}", about_unit.join("\n"));
}

#[test]
fn ready_is_sent_once_it_serves_and_stopping_on_sigterm() {
    if !kvm_or_skip() {
        return;
    }
    let dir = run_dir("ready");
    let sock_path = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&sock_path).unwrap();
    let addr = free_port();
    let mut child = start(&dir, addr, &sock_path);
    let ready = recv(&manager, START_BOUND);
    let ready = ready.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("no READY=1 within {START_BOUND:?}; hostd log:\n{}", log_of(&dir))
    });
    // Truthful: the moment READY=1 is out, requests are answered (one try).
    let (status, body) = request(addr, "GET", "/v1/healthz", "");
    assert_eq!(status, 200, "healthz right after READY=1: {body}");
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(lines.first(), Some(&"READY=1"), "{ready:?}");
    assert!(lines.contains(&format!("STATUS=serving on {addr}").as_str()), "{ready:?}");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let stopping = recv(&manager, Duration::from_secs(20));
    let status = wait_exit(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
    }
    let log = log_of(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stopping.as_deref().is_some_and(|s| s.lines().next() == Some("STOPPING=1")), "{stopping:?}\n{log}");
    assert!(status.is_some_and(|s| s.success()), "exit {status:?}:\n{log}");
    // The sends ran under the process's real seccomp set-up: no warning.
    assert!(!log.contains("cannot notify"), "{log}");
}

#[test]
fn a_notify_socket_nobody_listens_on_is_a_warning_not_a_failure() {
    if !kvm_or_skip() {
        return;
    }
    let dir = run_dir("deaf");
    let sock_path = dir.join("nobody.sock");
    let addr = free_port();
    let mut child = start(&dir, addr, &sock_path);
    let t = Instant::now();
    while !log_of(&dir).contains("\"serving\"") {
        if t.elapsed() > START_BOUND || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("hostd did not serve:\n{}", log_of(&dir));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = request(addr, "GET", "/v1/healthz", "");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let exit = wait_exit(&mut child, Duration::from_secs(20));
    if exit.is_none() {
        let _ = child.kill();
    }
    let log = log_of(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status, 200, "{log}");
    assert!(exit.is_some_and(|s| s.success()), "exit {exit:?}:\n{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("cannot notify the service manager"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(warning).expect("json log line");
    assert_eq!(v["level"], "warn", "{warning}");
    let cause = v["cause"].as_str().unwrap_or_default();
    assert!(cause.contains("READY=1") && cause.contains(&sock_path.display().to_string()), "{warning}");
}

/// Where systemd runs this machine: the unit's settings, as a transient
/// service, reach `active` only once hostd serves.
#[test]
fn under_systemd_the_units_settings_reach_active_and_serve() {
    if !Path::new("/run/systemd/system").exists() {
        eprintln!("SKIP: systemd is not PID 1 here (no /run/systemd/system); the unit is checked by verify and NOTIFY_SOCKET above");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: starting a system service needs root");
        return;
    }
    if !kvm_or_skip() {
        return;
    }
    let dir = run_dir("systemd");
    let addr = free_port();
    let name = format!("podflare-hostd-test-{}", std::process::id());
    let mut cmd = Command::new("systemd-run");
    cmd.args(["--no-ask-password", "--collect", "--quiet"]).arg(format!("--unit={name}"));
    // The unit's own sandboxing and limits. Its paths and settings point at
    // this run's private cache instead, a failure must show rather than
    // restart, and with nothing to build a start that takes longer than
    // START_BOUND has failed (the unit allows minutes for template builds).
    const TAKEN: [&str; 9] = [
        "Type",
        "NotifyAccess",
        "NoNewPrivileges",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectSystem",
        "LimitNOFILE",
        "TimeoutStopSec",
        "OOMScoreAdjust",
    ];
    for (k, v) in service_settings(&unit_text()) {
        if TAKEN.contains(&k.as_str()) {
            cmd.arg(format!("--property={k}={v}"));
        }
    }
    cmd.arg(format!("--property=ReadWritePaths={}", dir.join("cache").display()));
    cmd.arg(format!("--property=TimeoutStartSec={}s", START_BOUND.as_secs()));
    for (k, v) in quiet_env(&dir, addr) {
        cmd.arg(format!("--setenv={k}={v}"));
    }
    cmd.arg(HOSTD);
    let t = Instant::now();
    // Type=notify: systemd-run returns once the start job is done, that is
    // once hostd sent READY=1 (or failed).
    let out = cmd.output().expect("systemd-run");
    let journal = || {
        Command::new("journalctl")
            .args(["--no-pager", "-n", "50", "-u", &name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let active = Command::new("systemctl")
        .args(["is-active", &name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let healthz = if active == "active" { request(addr, "GET", "/v1/healthz", "").0 } else { 0 };
    let why = format!("systemd-run: {}\n{}", String::from_utf8_lossy(&out.stderr), journal());
    let stopped = Command::new("systemctl").args(["stop", &name]).status();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{why}");
    assert_eq!(active, "active", "{why}");
    assert_eq!(healthz, 200, "healthz once active: {why}");
    assert!(t.elapsed() < START_BOUND, "start took {:?}", t.elapsed());
    assert!(stopped.is_ok_and(|s| s.success()), "systemctl stop {name}");
}

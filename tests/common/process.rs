//! hostd as a child process of a test: a free port, start and wait until it
//! serves, wait for its exit.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::request;

/// A loopback port nobody listens on now.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Starts the hostd binary on `addr` serving the `default` template (JSON
/// log lines appended to `log`, plus `env`), and waits until it serves.
pub fn start_hostd(addr: SocketAddr, log: &Path, env: &[(&str, &str)]) -> Child {
    start(Command::new(env!("CARGO_BIN_EXE_podflare-hostd")), addr, log, env)
}

/// As [`start_hostd`], with `shell` (`sh` commands: limits, signal
/// dispositions) run first in the process that then becomes hostd.
pub fn start_hostd_under(shell: &str, addr: SocketAddr, log: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("{shell}; exec \"$0\"")).arg(env!("CARGO_BIN_EXE_podflare-hostd"));
    start(cmd, addr, log, env)
}

fn start(mut cmd: Command, addr: SocketAddr, log: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    cmd.env("PODFLARE_HOSTD_ADDR", addr.to_string())
        .env("PODFLARE_TEMPLATES", "default")
        .env("PODFLARE_LOG_FORMAT", "json")
        // Tests send nothing off this machine: no resolver unless a test
        // names its own.
        .env("PODFLARE_NET_DNS", "none")
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start hostd");
    // The snapshot is cached by scripts/setup's first hostd; a cold build
    // would take minutes here, so wait generously.
    let t = Instant::now();
    while !serves(addr) {
        assert!(t.elapsed() < Duration::from_secs(900), "hostd not serving");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

fn serves(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_ok() && request(addr, "GET", "/v1/healthz", "").0 == 200
}

/// The child's exit status, if it exits `within`.
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

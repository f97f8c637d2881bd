//! podflare-agent: PID 1 of a podflare guest.
//!
//! Boots the sandbox's user space, keeps the Python REPL running (it serves
//! port 1 itself) and serves hostd on port 0 of the virtio console: bash
//! execs, terminal sessions, Hello (clock + entropy after every restore), Ping.
//!
//! Every guest syscall costs ~0.4 ms and a process spawn ~1 s on PVM (guest
//! kernel code is emulated there), so the agent does its work with as few
//! system calls as it can and starts no helper processes.

mod boot;
mod cmdline;
mod console;
mod env;
mod exec;
mod frames;
mod port;
mod prepared;
mod pty;
mod repl;
mod selftest;
mod serve;
mod spawn;
mod sys;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long to wait for the port-0 device node before saying so on the console
/// (then keep waiting: without a channel there is nothing else to do).
const PORT_WAIT: Duration = Duration::from_secs(60);

/// How long the boot Ready waits for the prepared bash shells (a bash
/// start-up takes seconds on PVM; a pool still filling only costs the
/// first execs the spawn path).
const POOL_WAIT: Duration = Duration::from_secs(60);

/// Test harness switch: serve port-0 frames on this inherited fd, skipping
/// everything PID 1 does to the machine (mounts, hostname, clock, entropy,
/// the REPL). Lets `cargo test` drive the port-0 services on the host.
const TEST_PORT_FD_ENV: &str = "PODFLARE_AGENT_TEST_PORT_FD";

fn main() {
    let t0 = Instant::now();
    std::panic::set_hook(Box::new(|info| {
        console::line(&format!("podflare-agent: panic: {info}"))
    }));
    if let Some(fd) = std::env::var(TEST_PORT_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        serve_test_fd(fd);
    }

    // 1. Root file system: read-only base image + RAM overlay.
    let overlay = boot::overlay_root();
    boot::pseudo_filesystems();
    boot::memory_settings();
    let flags = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Err(e) = overlay {
        console::line(&format!(
            "podflare-agent: overlay root failed ({e}); running on the read-only base image"
        ));
    }
    let _ = sys::sethostname("sandbox");
    let lo = sys::loopback_up();
    let env = env::child_env(flags.pvm);
    if flags.debug {
        console::line(&format!(
            "podflare-agent: {flags:?} lo={lo:?} boot {:?}",
            t0.elapsed()
        ));
    }

    // 2. PID 1 duties: reap every process that ends up ours.
    spawn_named("reaper", || spawn::reap_forever());

    if flags.selftest {
        selftest::run(&env, t0);
    }

    // 3. Prepared bash shells start filling now, at idle priority.
    let pool = prepared::Pool::start(env.clone(), prepared::POOL_TARGET);

    // 4. The Python REPL starts now (it takes seconds) while we open port 0.
    let (ready_tx, ready_rx) = mpsc::channel();
    let repl_env = env.clone();
    spawn_named("repl", move || repl::supervise(repl_env, ready_tx));

    // 5. Port 0.
    let port = open_port();
    let execs = loop {
        match exec::Execs::new(port.clone(), env.clone(), Some(pool.clone())) {
            Ok(e) => break e,
            Err(e) => {
                console::line(&format!("podflare-agent: exec service: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let server = serve::Server {
        port: port.clone(),
        execs,
        ptys: pty::Ptys::new(port.clone(), env.clone()),
        urandom: sys::open("/dev/urandom", libc::O_WRONLY).ok(),
        set_clock: true,
    };
    spawn_named("port0", move || server.serve());

    // 6. Ready once the REPL serves its port too, and the bash pool is
    // full: the template snapshot is taken after this, and every sandbox
    // restored from it should find its prepared shells.
    let _ = ready_rx.recv();
    let shells = pool.wait_full(POOL_WAIT);
    if shells < prepared::POOL_TARGET {
        console::line(&format!(
            "podflare-agent: {shells} of {} prepared bash shells ready",
            prepared::POOL_TARGET
        ));
    }
    console::line("podflare-agent: ready");
    if flags.debug {
        console::line(&format!(
            "podflare-agent: ready after {:.2} s",
            t0.elapsed().as_secs_f64()
        ));
    }
    // Announce ourselves unprompted (blocks until the host side is connected).
    let _ = port.send(podflare_proto::Kind::Ready, 0, &serve::ready_payload());
    loop {
        std::thread::park();
    }
}

fn serve_test_fd(fd: std::os::fd::RawFd) -> ! {
    use std::os::fd::FromRawFd;
    spawn_named("reaper", || spawn::reap_forever());
    // SAFETY: the harness handed us this descriptor; nothing else owns it.
    let port = Arc::new(port::Port::new(unsafe {
        std::os::fd::OwnedFd::from_raw_fd(fd)
    }));
    let pool = prepared::Pool::start(env::child_env(false), prepared::POOL_TARGET);
    let execs = exec::Execs::new(port.clone(), env::child_env(false), Some(pool.clone()))
        .expect("/dev/null");
    // Like the boot Ready: tests start with a full pool.
    pool.wait_full(POOL_WAIT);
    let server = serve::Server {
        port: port.clone(),
        execs,
        ptys: pty::Ptys::new(port.clone(), env::child_env(false)),
        urandom: None,
        set_clock: false,
    };
    let _ = port.send(podflare_proto::Kind::Ready, 0, &serve::ready_payload());
    server.serve()
}

fn open_port() -> Arc<port::Port> {
    let mut warned = false;
    loop {
        if let Some(path) = port::find(podflare_proto::AGENT_PORT, PORT_WAIT) {
            match sys::open(&path, libc::O_RDWR) {
                Ok(fd) => return Arc::new(port::Port::new(fd)),
                Err(e) => console::line(&format!("podflare-agent: open {path}: {e}")),
            }
            std::thread::sleep(Duration::from_secs(1));
        } else if !warned {
            console::line(
                "podflare-agent: no /dev/vport*p0 (virtio console port 0); still waiting",
            );
            warned = true;
        }
    }
}

/// Starts a service thread. Failing to start one leaves the agent unable to
/// serve; PID 1 must not exit, so it says so on the console and carries on.
fn spawn_named<F: FnOnce() + Send + 'static>(name: &str, f: F) {
    if let Err(e) = std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 << 10)
        .spawn(f)
    {
        console::line(&format!("podflare-agent: cannot start thread {name}: {e}"));
    }
}

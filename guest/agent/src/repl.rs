//! Keeps the Python REPL (port 1's server) running.

use crate::console;
use crate::spawn::{self, Command};
use crate::sys;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The REPL driver installed by the rootfs recipe.
pub const REPL_PATH: &str = "/usr/lib/podflare/repl.py";
/// Modules the image wants imported before the snapshot (comma list), written
/// by the template's rootfs recipe.
const WARMUP_FILE: &str = "/etc/podflare/warmup";

/// Starts the REPL and restarts it whenever it dies. `ready` gets one message
/// the first time a REPL reports (one byte on the pipe named by
/// `PODFLARE_READY_FD`) that it serves its port.
///
/// Every REPL runs with Python's object allocator off (`PYTHONMALLOC=malloc`:
/// its arenas would be fresh `mmap`s, each page a first-touch fault), so all
/// its memory comes from the one glibc heap `repl.py` sets up. The first
/// one, whose memory the template snapshot keeps, also prepares that heap
/// (`PODFLARE_PREPARE_HEAP`); a REPL restarted later grows it as it goes.
pub fn supervise(mut env: Vec<String>, ready: mpsc::Sender<()>) -> ! {
    env.push("PODFLARE_READY_FD=3".into());
    env.push("PYTHONMALLOC=malloc".into());
    if let Ok(list) = std::fs::read_to_string(WARMUP_FILE) {
        let list = list
            .split([',', ' ', '\n', '\t'])
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        if !list.is_empty() {
            env.push(format!("PODFLARE_WARMUP={list}"));
        }
    }
    let mut quick_deaths: u32 = 0;
    let mut first = env.clone();
    first.push("PODFLARE_PREPARE_HEAP=1".into());
    let mut starts: u64 = 0;
    loop {
        let started = Instant::now();
        starts += 1;
        match run_once(if starts == 1 { &first } else { &env }, &ready) {
            Ok((true, _)) => {}
            Ok((false, code)) => console::line(&format!(
                "podflare-agent: python REPL exited with status {code} before it was ready"
            )),
            Err(e) => console::line(&format!(
                "podflare-agent: cannot start the python REPL: {e}"
            )),
        }
        // Back off when it keeps dying young, so a broken image does not spend
        // the (emulated, slow) guest kernel on restarts.
        quick_deaths = if started.elapsed() < Duration::from_secs(30) {
            quick_deaths.saturating_add(1)
        } else {
            0
        };
        std::thread::sleep(Duration::from_secs(u64::from(quick_deaths.min(5)).pow(2)));
    }
}

/// Runs one REPL to its death: (did it report ready, exit code).
fn run_once(env: &[String], ready: &mpsc::Sender<()>) -> std::io::Result<(bool, i32)> {
    let (ready_r, ready_w) = sys::pipe()?;
    let devnull = sys::open("/dev/null", libc::O_RDWR)?;
    let (tx, rx) = mpsc::channel();
    spawn::spawn(
        &Command {
            program: "/usr/bin/python3",
            args: &["python3", "-u", REPL_PATH],
            env,
            cwd: "/root",
            // stderr stays the console until the REPL swaps in its own pipe,
            // so a REPL that cannot start leaves its traceback on the console.
            fds: &[
                devnull.as_raw_fd(),
                devnull.as_raw_fd(),
                2,
                ready_w.as_raw_fd(),
            ],
            new_group: true,
            terminal: None,
            idle: false,
        },
        Box::new(move |code| {
            let _ = tx.send(code);
        }),
    )?;
    drop((ready_w, devnull));
    let mut b = [0u8; 1];
    // One byte: ready. EOF: it died (or closed the fd) without saying so.
    let was_ready = matches!(sys::read(ready_r.as_raw_fd(), &mut b), Ok(1));
    if was_ready {
        let _ = ready.send(());
    }
    let code = rx.recv().unwrap_or(-1);
    Ok((was_ready, code))
}

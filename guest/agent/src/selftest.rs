//! `podflare.selftest=1`: prove the image works (python, bash) and power off.

use crate::console;
use crate::spawn::{self, Command};
use crate::sys;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Instant;

/// Runs `args`, returns (stdout+stderr, exit code).
fn capture(program: &str, args: &[&str], env: &[String]) -> io::Result<(String, i32)> {
    let (r, w) = sys::pipe()?;
    let devnull = sys::open("/dev/null", libc::O_RDWR)?;
    let (tx, rx) = mpsc::channel();
    spawn::spawn(
        &Command {
            program,
            args,
            env,
            cwd: "/root",
            fds: &[devnull.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()],
            new_group: true,
        },
        Box::new(move |code| {
            let _ = tx.send(code);
        }),
    )?;
    drop(w);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = sys::read(r.as_raw_fd(), &mut buf) {
        out.extend_from_slice(&buf[..n]);
    }
    let code = rx.recv().unwrap_or(-1);
    Ok((String::from_utf8_lossy(&out).trim_end().replace('\n', " | "), code))
}

/// Runs the selftest, prints its lines, powers off.
pub fn run(env: &[String], boot: Instant) -> ! {
    console::line(&format!("podflare-selftest: userspace up after {:.1} s", boot.elapsed().as_secs_f64()));
    let cases: [(&str, &str, &[&str]); 2] = [
        ("python", "/usr/bin/python3", &["python3", "-c", "print(6*7)"]),
        ("bash", "/bin/bash", &["bash", "-c", "echo hi"]),
    ];
    for (name, program, args) in cases {
        let t = Instant::now();
        match capture(program, args, env) {
            Ok((out, code)) => {
                console::line(&format!("podflare-selftest: {name}: {out}"));
                console::line(&format!(
                    "podflare-selftest: {name} exit {code} in {:.2} s",
                    t.elapsed().as_secs_f64()
                ));
            }
            Err(e) => console::line(&format!("podflare-selftest: {name}: spawn failed: {e}")),
        }
    }
    console::line("podflare-selftest: done");
    sys::power_off()
}

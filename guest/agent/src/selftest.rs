//! `podflare.selftest=1`: prove the image works (python, bash) and power off.

use crate::console;
use crate::frames::FrameReader;
use crate::spawn::{self, Command};
use crate::sys;
use podflare_proto::{encode, exit_code, Kind};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
            terminal: None,
            idle: false,
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
    Ok((
        String::from_utf8_lossy(&out)
            .trim_end()
            .replace('\n', " | "),
        code,
    ))
}

/// Starts the REPL on one end of a socket pair (instead of its virtio port),
/// waits for its Ready, runs `print(6*7)` through the wire protocol.
/// Returns (stdout, exit code, time to ready, exec round trips).
fn repl_roundtrip(env: &[String]) -> io::Result<(String, i32, Duration, Vec<Duration>)> {
    let mut sv = [0 as libc::c_int; 2];
    // SAFETY: `sv` has room for the two descriptors socketpair writes.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    let (ready_r, ready_w) = sys::pipe()?;
    let devnull = sys::open("/dev/null", libc::O_RDWR)?;
    let mut env = env.to_vec();
    env.push("PODFLARE_READY_FD=3".into());
    env.push("PODFLARE_REPL_PORT_FD=4".into());
    let t = Instant::now();
    let pid = spawn::spawn(
        &Command {
            program: "/usr/bin/python3",
            args: &["python3", "-u", crate::repl::REPL_PATH],
            env: &env,
            cwd: "/root",
            fds: &[
                devnull.as_raw_fd(),
                devnull.as_raw_fd(),
                2,
                ready_w.as_raw_fd(),
                theirs.as_raw_fd(),
            ],
            new_group: true,
            terminal: None,
            idle: false,
        },
        Box::new(|_| {}),
    )?;
    drop((ready_w, theirs));
    let mut b = [0u8; 1];
    if sys::read(ready_r.as_raw_fd(), &mut b)? != 1 {
        return Err(io::Error::other("the REPL exited before it was ready"));
    }
    let mut reader = FrameReader::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut next = |reader: &mut FrameReader| -> io::Result<crate::frames::InFrame> {
        loop {
            if let Some(f) = reader.next_frame() {
                return Ok(f);
            }
            let n = sys::read(ours.as_raw_fd(), &mut buf)?;
            if n == 0 {
                return Err(io::Error::other("the REPL closed its port"));
            }
            reader.push(&buf[..n]);
        }
    };
    while next(&mut reader)?.kind != Kind::Ready {}
    let to_ready = t.elapsed();
    // The same exec three times: the first pays for anything not yet warm.
    let mut results = Vec::new();
    for stream in 1..=3 {
        let t = Instant::now();
        let mut wire = Vec::new();
        encode(
            &mut wire,
            Kind::Exec,
            stream,
            br#"{"language":"python","code":"print(6*7)"}"#,
        );
        sys::write_all(ours.as_raw_fd(), &wire)?;
        let mut out = Vec::new();
        let code = loop {
            let f = next(&mut reader)?;
            match f.kind {
                Kind::Stdout | Kind::Stderr if f.stream == stream => {
                    out.extend_from_slice(&f.payload)
                }
                Kind::Exit if f.stream == stream => break exit_code(&f.payload),
                _ => {}
            }
        };
        results.push((out, code, t.elapsed()));
    }
    sys::kill_group(pid, libc::SIGKILL);
    let (out, code, _) = &results[0];
    let times = results.iter().map(|r| r.2).collect();
    Ok((
        String::from_utf8_lossy(out).trim_end().replace('\n', " | "),
        *code,
        to_ready,
        times,
    ))
}

/// Runs the selftest, prints its lines, powers off.
pub fn run(env: &[String], boot: Instant) -> ! {
    console::line(&format!(
        "podflare-selftest: userspace up after {:.1} s",
        boot.elapsed().as_secs_f64()
    ));
    let cases: [(&str, &str, &[&str]); 2] = [
        (
            "python",
            "/usr/bin/python3",
            &["python3", "-c", "print(6*7)"],
        ),
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
    // Images with warm-up modules (python-datasci): they must import
    // cleanly, with no warning, under this environment (PVM masks included).
    if let Ok(list) = std::fs::read_to_string("/etc/podflare/warmup") {
        let modules = list
            .split([',', ' ', '\n'])
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join(", ");
        let code = format!("import {modules}; print('ok')");
        let t = Instant::now();
        match capture("/usr/bin/python3", &["python3", "-c", &code], env) {
            Ok((out, code)) => {
                console::line(&format!("podflare-selftest: warmup: {out}"));
                console::line(&format!(
                    "podflare-selftest: warmup exit {code} in {:.2} s",
                    t.elapsed().as_secs_f64()
                ));
            }
            Err(e) => console::line(&format!("podflare-selftest: warmup: spawn failed: {e}")),
        }
    }
    if let Some(npy) = env
        .iter()
        .find(|v| v.starts_with("NPY_DISABLE_CPU_FEATURES="))
    {
        console::line(&format!("podflare-selftest: env {npy}"));
    }
    match repl_roundtrip(env) {
        Ok((out, code, ready, rts)) => {
            console::line(&format!("podflare-selftest: repl: {out}"));
            let rts: Vec<String> = rts
                .iter()
                .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
                .collect();
            console::line(&format!(
                "podflare-selftest: repl exit {code}, ready in {:.2} s, exec round trips {} ms",
                ready.as_secs_f64(),
                rts.join(" / ")
            ));
        }
        Err(e) => console::line(&format!("podflare-selftest: repl: failed: {e}")),
    }
    console::line("podflare-selftest: done");
    sys::power_off()
}

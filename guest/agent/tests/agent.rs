//! Drives the agent's port-0 service (bash execs, Cancel, Stdin, Ping,
//! Hello) on the host through the wire protocol: the agent binary serves one
//! end of a Unix socket pair (PODFLARE_AGENT_TEST_PORT_FD), which skips its
//! PID-1 boot work. Needs /bin/bash and /root (run as root, as in CI).

use podflare_proto::{encode, exit_code, Decoder, Frame, Kind};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    sock: UnixStream,
    dec: Decoder,
}

impl Agent {
    fn start() -> Agent {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_podflare-agent"));
        cmd.env("PODFLARE_AGENT_TEST_PORT_FD", "3")
            .stdin(Stdio::null());
        // SAFETY: only dup2 (async-signal-safe) runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut a = Agent {
            child,
            sock: ours,
            dec: Decoder::new(),
        };
        let ready = a.next();
        assert_eq!(ready.kind, Kind::Ready);
        let v: serde_json::Value = serde_json::from_slice(&ready.payload).unwrap();
        assert_eq!(v["role"], "agent");
        a
    }

    fn send(&mut self, kind: Kind, stream: u32, payload: &[u8]) {
        let mut wire = Vec::new();
        encode(&mut wire, kind, stream, payload);
        self.sock.write_all(&wire).unwrap();
    }

    fn next(&mut self) -> Frame {
        loop {
            if let Some(f) = self
                .dec
                .next_frame()
                .expect("the agent sent a malformed frame")
            {
                return f;
            }
            let mut buf = [0u8; 65536];
            let n = self
                .sock
                .read(&mut buf)
                .expect("read from the agent (timed out?)");
            assert!(n > 0, "the agent closed its port");
            self.dec.push(&buf[..n]);
        }
    }

    fn bash(&mut self, stream: u32, code: &str) {
        let req = serde_json::json!({ "language": "bash", "code": code });
        self.send(Kind::Exec, stream, req.to_string().as_bytes());
    }

    /// (stdout, stderr, exit) of each of `streams`, frames of several
    /// streams arriving interleaved.
    fn wait_all(&mut self, streams: &[u32]) -> Vec<(String, String, i32)> {
        let mut res: Vec<(Vec<u8>, Vec<u8>, Option<i32>)> = vec![Default::default(); streams.len()];
        while res.iter().any(|r| r.2.is_none()) {
            let f = self.next();
            let i = streams
                .iter()
                .position(|&s| s == f.stream)
                .unwrap_or_else(|| panic!("stray frame {f:?}"));
            assert!(res[i].2.is_none(), "frame after Exit: {f:?}");
            match f.kind {
                Kind::Stdout => res[i].0.extend_from_slice(&f.payload),
                Kind::Stderr => res[i].1.extend_from_slice(&f.payload),
                Kind::Exit => res[i].2 = Some(exit_code(&f.payload)),
                other => panic!(
                    "unexpected {other:?}: {}",
                    String::from_utf8_lossy(&f.payload)
                ),
            }
        }
        res.into_iter()
            .map(|(o, e, c)| {
                (
                    String::from_utf8_lossy(&o).into_owned(),
                    String::from_utf8_lossy(&e).into_owned(),
                    c.unwrap(),
                )
            })
            .collect()
    }

    fn run(&mut self, stream: u32, code: &str) -> (String, String, i32) {
        self.bash(stream, code);
        self.wait_all(&[stream]).remove(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bash_exec_output_and_status() {
    let mut a = Agent::start();
    assert_eq!(a.run(1, "echo hi"), ("hi\n".into(), String::new(), 0));
    assert_eq!(
        a.run(2, "echo oops >&2; exit 3"),
        (String::new(), "oops\n".into(), 3)
    );
    assert_eq!(
        a.run(3, "pwd; echo $HOME; echo $TERM").0,
        "/root\n/root\nxterm\n"
    );
    // A signal death reports 128 + signal.
    assert_eq!(a.run(4, "kill -9 $$").2, 137);
    // stdin is /dev/null unless asked for: a reader ends at once.
    assert_eq!(a.run(5, "cat; echo done").0, "done\n");
    // Output is raw bytes, not split on lines.
    assert_eq!(a.run(6, "printf 'a\\nb'").0, "a\nb");
    // Output written before exit arrives before Exit, even in bulk.
    let (out, _, code) = a.run(7, "head -c 3000000 /dev/zero | tr '\\0' x");
    assert_eq!((out.len(), code), (3_000_000, 0));
}

#[test]
fn background_process_does_not_hold_exit() {
    let mut a = Agent::start();
    let t = Instant::now();
    let (out, _, code) = a.run(1, "sleep 30 & echo started");
    assert_eq!((out.as_str(), code), ("started\n", 0));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "Exit waited for the background job"
    );
}

#[test]
fn execs_run_concurrently_and_cancel_kills_the_group() {
    let mut a = Agent::start();
    let t = Instant::now();
    for s in 1..=3 {
        a.bash(s, &format!("sleep 1; echo {s}"));
    }
    let res = a.wait_all(&[1, 2, 3]);
    assert!(
        t.elapsed() < Duration::from_millis(2800),
        "execs ran one after another: {:?}",
        t.elapsed()
    );
    for (i, r) in res.iter().enumerate() {
        assert_eq!(r, &(format!("{}\n", i + 1), String::new(), 0));
    }
    // Cancel kills bash and its children (same process group).
    a.bash(9, "sleep 60 | cat; echo not-reached");
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    a.send(Kind::Cancel, 9, b"");
    let (out, _, code) = a.wait_all(&[9]).remove(0);
    assert_eq!((out.as_str(), code), ("", 137));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn stdin_when_asked_for() {
    let mut a = Agent::start();
    let req = serde_json::json!({ "language": "bash", "code": "tr a-z A-Z", "stdin": true });
    a.send(Kind::Exec, 1, req.to_string().as_bytes());
    a.send(Kind::Stdin, 1, b"hello ");
    a.send(Kind::Stdin, 1, b"world\n");
    a.send(Kind::CloseStdin, 1, b"");
    assert_eq!(
        a.wait_all(&[1]).remove(0),
        ("HELLO WORLD\n".into(), String::new(), 0)
    );
}

#[test]
fn control_frames_and_bad_input() {
    let mut a = Agent::start();
    a.send(Kind::Ping, 5, b"xyz");
    let f = a.next();
    assert_eq!(
        (f.kind, f.stream, f.payload.as_slice()),
        (Kind::Pong, 5, &b"xyz"[..])
    );
    a.send(Kind::Hello, 0, br#"{"wall_clock_ns":0,"entropy_hex":""}"#);
    assert_eq!(a.next().kind, Kind::Ready);
    // Garbage, an unknown kind, bad JSON, python on the agent's port.
    a.sock.write_all(&[1, 2, 3, 0xF1, 0xF1, 9]).unwrap();
    a.sock
        .write_all(&[0xF1, 1, 0xE7, 0x03, 1, 0, 0, 0, 2, 0, 0, 0, 7, 7])
        .unwrap();
    a.send(Kind::Exec, 6, b"{");
    assert_eq!((a.next().kind, 6), (Kind::Error, 6));
    a.send(Kind::Exec, 7, br#"{"language":"python","code":"1"}"#);
    let f = a.next();
    assert_eq!((f.kind, f.stream), (Kind::Error, 7));
    // Frames for streams that do not exist are ignored.
    a.send(Kind::Cancel, 77, b"");
    a.send(Kind::Stdin, 77, b"x");
    assert_eq!(a.run(8, "echo alive").0, "alive\n");
}

impl Agent {
    /// Frames of a terminal session until its Exit or Error:
    /// (kinds in order, output, exit code or -1).
    fn session(&mut self, stream: u32) -> (Vec<Kind>, String, i32) {
        let (mut kinds, mut out) = (Vec::new(), Vec::new());
        loop {
            let f = self.next();
            assert_eq!(f.stream, stream, "stray frame {f:?}");
            kinds.push(f.kind);
            match f.kind {
                Kind::Started => {}
                Kind::Stdout => out.extend_from_slice(&f.payload),
                Kind::Exit | Kind::Error => {
                    let code = if f.kind == Kind::Exit {
                        exit_code(&f.payload)
                    } else {
                        out = f.payload;
                        -1
                    };
                    return (kinds, String::from_utf8_lossy(&out).into_owned(), code);
                }
                other => panic!("unexpected {other:?} on a terminal session"),
            }
        }
    }

    fn pty(&mut self, stream: u32, req: serde_json::Value) {
        self.send(Kind::Pty, stream, req.to_string().as_bytes());
    }
}

#[test]
fn terminal_sessions_through_the_port() {
    let mut a = Agent::start();
    // An interactive shell with job control: it owns its terminal.
    a.pty(
        1,
        serde_json::json!({
            "argv": ["bash", "--norc", "--noprofile", "-i"],
            "size": { "cols": 100, "rows": 30 },
            "env": [["PS1", "$ "]],
        }),
    );
    assert_eq!(a.next().kind, Kind::Started);
    a.send(Kind::Stdin, 1, b"echo $((6*7)) $TERM; stty size\n");
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).contains("30 100\r\n") {
        let f = a.next();
        assert_eq!((f.kind, f.stream), (Kind::Stdout, 1), "{f:?}");
        first.extend_from_slice(&f.payload);
    }
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.contains("42 xterm-256color\r\n"), "{first}");
    assert!(!first.contains("no job control"), "{first}");
    a.send(Kind::Resize, 1, br#"{"cols":50,"rows":20}"#);
    a.send(Kind::Resize, 1, b"not a size");
    a.send(Kind::Stdin, 1, b"stty size; pwd; exit 5\n");
    let (kinds, out, code) = a.session(1);
    assert_eq!(code, 5, "{out}");
    assert_eq!(kinds.last(), Some(&Kind::Exit));
    assert!(out.contains("20 50\r\n/root\r\n"), "{out}");

    // Output written just before exit is all there before Exit.
    a.pty(
        2,
        serde_json::json!({
            "argv": ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"],
            "size": { "cols": 80, "rows": 24 },
        }),
    );
    let (kinds, out, code) = a.session(2);
    assert_eq!((kinds[0], out.len(), code), (Kind::Started, 3_000_000, 0));

    // A start failure is one Error frame; a bad request too.
    a.pty(
        3,
        serde_json::json!({ "argv": ["no-such-program"], "size": { "cols": 80, "rows": 24 } }),
    );
    assert_eq!(
        a.session(3),
        (
            vec![Kind::Error],
            "spawn failed: No such file or directory (no-such-program)".into(),
            -1
        )
    );
    a.send(Kind::Pty, 4, b"{");
    assert_eq!(a.session(4).0, [Kind::Error]);

    // Sessions and execs side by side; Cancel reaches the session.
    a.pty(
        5,
        serde_json::json!({ "argv": ["sleep", "60"], "size": { "cols": 80, "rows": 24 } }),
    );
    assert_eq!(a.next().kind, Kind::Started);
    assert_eq!(a.run(6, "echo exec").0, "exec\n");
    a.send(Kind::Cancel, 5, b"");
    assert_eq!(a.session(5), (vec![Kind::Exit], String::new(), 137));
}

/// Which bash served an exec: a prepared shell's command line carries the
/// agent's marker, a spawned `bash -c` has the user's code there (so the
/// marker is not spelled out in it).
const SERVED_BY: &str =
    "m=prepared; case $(tr -d '\\0' < /proc/$$/cmdline) in *\"podflare-agent $m shell\"*) echo prepared;; *) echo spawned;; esac";

#[test]
fn prepared_shells_serve_execs_without_carrying_state() {
    // The test harness answers Ready once its pool is full.
    let mut a = Agent::start();
    assert_eq!(a.run(1, SERVED_BY).0, "prepared\n");
    assert_eq!(a.run(2, &format!("X=1; {SERVED_BY}")).0, "prepared\n");
    // A used shell is never reused: nothing carries over.
    assert_eq!(a.run(3, "echo ${X:-unset}").0, "unset\n");
    // `bash -c` semantics the bootstrap keeps: $0, LINENO, SECONDS, the
    // execution string, no helper variables, no extra descriptors but 3.
    assert_eq!(
        a.run(
            4,
            "echo $0 $LINENO $SECONDS; echo \"$BASH_EXECUTION_STRING\""
        )
        .0,
        "bash 1 0\necho $0 $LINENO $SECONDS; echo \"$BASH_EXECUTION_STRING\"\n"
    );
    assert_eq!(a.run(5, "set | grep -c '^__'").0, "0\n");
    // The bootstrap's go pipe, stdin pipe and code file are closed.
    assert_eq!(
        a.run(
            6,
            "for f in 4 5 6; do [ -e /proc/$$/fd/$f ] && echo open $f; done; echo checked"
        )
        .0,
        "checked\n"
    );
    assert_eq!(a.run(7, "pwd; echo $HOME").0, "/root\n/root\n");
    // Exit statuses: normal end, exit N, a function's return, set -e, a
    // syntax error (the message names `eval` where bash -c says `-c`).
    assert_eq!(a.run(8, "false").2, 1);
    assert_eq!(
        a.run(9, "echo a; exit 3; echo b"),
        ("a\n".into(), String::new(), 3)
    );
    assert_eq!(a.run(10, "f() { return 5; }; f").2, 5);
    assert_eq!(a.run(11, "set -e; false; echo no").2, 1);
    let (out, err, code) = a.run(12, "echo a\nfi");
    assert_eq!((out.as_str(), code), ("a\n", 2));
    assert!(
        err.contains("line 2: syntax error near unexpected token `fi'"),
        "{err}"
    );
    // The user's own EXIT trap replaces ours: the reaper's status counts.
    assert_eq!(
        a.run(13, "trap 'echo bye' EXIT; exit 4"),
        ("bye\n".into(), String::new(), 4)
    );
    // So does closing fd 3, and replacing the shell with exec.
    assert_eq!(
        a.run(14, "exec 3>&-; echo x; exit 6"),
        ("x\n".into(), String::new(), 6)
    );
    assert_eq!(a.run(15, "exec sh -c 'exit 7'").2, 7);
    assert_eq!(a.run(16, "kill -9 $$").2, 137);
    // A catchable signal it sends itself: 128+N, as with `bash -c`.
    assert_eq!(a.run(19, "kill $$").2, 143);
    assert_eq!(a.run(20, "echo x; kill -HUP $$; echo never"), ("x\n".into(), String::new(), 129));
    // Writing garbage to fd 3 does not fake a status.
    assert_eq!(a.run(17, "echo junk >&3; exit 2").2, 2);
    // A partial line there garbles the trap's own report: the agent hangs
    // up, the trap's wait ends, the reaper's status counts.
    assert_eq!(a.run(18, "printf x >&3; exit 5").2, 5);
}

#[test]
fn prepared_shells_get_stdin_and_fresh_random() {
    let mut a = Agent::start();
    let req = serde_json::json!({ "language": "bash", "code": format!("{SERVED_BY}; tr a-z A-Z"), "stdin": true });
    a.send(Kind::Exec, 1, req.to_string().as_bytes());
    a.send(Kind::Stdin, 1, b"hello\n");
    a.send(Kind::CloseStdin, 1, b"");
    assert_eq!(
        a.wait_all(&[1]).remove(0),
        ("prepared\nHELLO\n".into(), String::new(), 0)
    );
    // No stdin asked for: /dev/null, as for a spawned bash.
    assert_eq!(
        a.run(
            2,
            &format!("{SERVED_BY}; readlink /proc/$$/fd/0; cat; echo done")
        )
        .0,
        "prepared\n/dev/null\ndone\n"
    );
    // Every exec seeds RANDOM afresh (the pool refills in the background;
    // whichever bash serves, the values differ).
    let mut seen = std::collections::HashSet::new();
    for s in 3..8 {
        let out = a.run(s, "echo $RANDOM$RANDOM").0;
        assert!(seen.insert(out.clone()), "RANDOM repeated: {out}");
    }
}

#[test]
fn execs_fall_back_to_a_spawn_when_the_pool_is_empty() {
    let mut a = Agent::start();
    // Four at once: two prepared shells, then the spawn path (the
    // refills wait until these have finished).
    for s in 1..=4 {
        a.bash(s, &format!("sleep 0.5; {SERVED_BY}"));
    }
    let mut served: Vec<String> = a
        .wait_all(&[1, 2, 3, 4])
        .into_iter()
        .map(|r| {
            assert_eq!(r.2, 0);
            r.0
        })
        .collect();
    served.sort();
    assert_eq!(
        served,
        ["prepared\n", "prepared\n", "spawned\n", "spawned\n"]
    );
    // Code with a NUL byte cannot go through a prepared shell: the spawn
    // path reports it as before.
    let req = serde_json::json!({ "language": "bash", "code": "echo a\u{0}b" });
    a.send(Kind::Exec, 5, req.to_string().as_bytes());
    let f = a.next();
    assert_eq!((f.kind, f.stream), (Kind::Error, 5), "{f:?}");
    // Shells killed while they wait are replaced, never handed out (only
    // this agent's: tests run side by side).
    let kill_waiting = "m=prepared; for p in $(pgrep -P $PPID -f \"podflare-agent $m shell\"); do [ $p = $$ ] || kill -9 $p; done";
    assert_eq!(a.run(6, kill_waiting).2, 0);
    assert_eq!(a.run(7, "echo still"), ("still\n".into(), String::new(), 0));
}

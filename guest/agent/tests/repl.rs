//! Drives `guest/repl.py` (the in-guest Python REPL) through the wire protocol
//! on the host: the REPL serves one end of a Unix socket pair instead of its
//! virtio-console port (PODFLARE_REPL_PORT_FD). Proves the Python framing
//! matches podflare-proto and the exec semantics of the HTTP contract.

use podflare_proto::{encode, exit_code, Decoder, Frame, Kind};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Repl {
    child: Child,
    sock: UnixStream,
    dec: Decoder,
}

impl Repl {
    fn start() -> Repl {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../repl.py");
        let mut cmd = Command::new("python3");
        cmd.args(["-u", script])
            .env("PODFLARE_REPL_PORT_FD", "3")
            .env_remove("PODFLARE_READY_FD")
            .stdin(Stdio::null())
            .current_dir(std::env::temp_dir());
        // SAFETY: only dup2 (async-signal-safe) runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("python3 must be installed to test the REPL");
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut r = Repl {
            child,
            sock: ours,
            dec: Decoder::new(),
        };
        let ready = r.next();
        assert_eq!(ready.kind, Kind::Ready);
        let v: serde_json::Value = serde_json::from_slice(&ready.payload).unwrap();
        assert_eq!(v["role"], "repl");
        assert_eq!(v["protocol"], 1);
        r
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
                .expect("the REPL sent a malformed frame")
            {
                return f;
            }
            let mut buf = [0u8; 65536];
            let n = self
                .sock
                .read(&mut buf)
                .expect("read from the REPL (timed out?)");
            assert!(n > 0, "the REPL closed its port");
            self.dec.push(&buf[..n]);
        }
    }

    fn exec_async(&mut self, stream: u32, code: &str) {
        let req = serde_json::json!({ "language": "python", "code": code });
        self.send(Kind::Exec, stream, req.to_string().as_bytes());
    }

    /// Collects (stdout, stderr, exit) of `stream`.
    fn wait(&mut self, stream: u32) -> (Vec<u8>, String, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            let f = self.next();
            assert_eq!(f.stream, stream, "frame of another stream: {f:?}");
            match f.kind {
                Kind::Stdout => out.extend_from_slice(&f.payload),
                Kind::Stderr => err.extend_from_slice(&f.payload),
                Kind::Exit => {
                    return (
                        out,
                        String::from_utf8_lossy(&err).into_owned(),
                        exit_code(&f.payload),
                    )
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn exec(&mut self, stream: u32, code: &str) -> (String, String, i32) {
        self.exec_async(stream, code);
        let (out, err, code) = self.wait(stream);
        (String::from_utf8_lossy(&out).into_owned(), err, code)
    }
}

impl Drop for Repl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn print_state_and_errors() {
    let mut r = Repl::start();
    assert_eq!(r.exec(1, "print(6*7)"), ("42\n".into(), String::new(), 0));
    // Plain exec: no echo of a last expression.
    assert_eq!(
        r.exec(2, "x = 41\nx + 1"),
        (String::new(), String::new(), 0)
    );
    assert_eq!(r.exec(3, "x += 1; print(x, __name__)").0, "42 __main__\n");
    assert_eq!(
        r.exec(4, "import os; os.chdir('/'); f = open('/dev/null')")
            .2,
        0
    );
    assert_eq!(r.exec(5, "print(os.getcwd(), f.closed)").0, "/ False\n");

    let (_, err, code) = r.exec(6, "def f():\n    return 1/0\nf()");
    assert_eq!(code, 1);
    assert!(
        err.starts_with("Traceback (most recent call last):\n  File \"<exec>\""),
        "{err}"
    );
    assert!(err.contains("return 1/0"), "{err}");
    assert!(
        err.ends_with("ZeroDivisionError: division by zero\n"),
        "{err}"
    );
    assert!(
        !err.contains("repl.py"),
        "REPL frames leak into tracebacks: {err}"
    );

    let (_, err, code) = r.exec(7, "def broken(:\n  pass");
    assert_eq!(code, 1);
    assert!(err.contains("SyntaxError"), "{err}");

    assert_eq!(r.exec(8, "raise SystemExit").2, 0);
    assert_eq!(r.exec(9, "raise SystemExit(3)").2, 3);
    assert_eq!(
        r.exec(10, "import sys; sys.exit('bye')"),
        (String::new(), "bye\n".into(), 1)
    );
    assert_eq!(r.exec(11, "raise KeyboardInterrupt").2, 130);
    // The REPL survived all of it, with its state.
    assert_eq!(r.exec(12, "print(x)").0, "42\n");
}

#[test]
fn output_of_child_processes_precedes_exit() {
    let mut r = Repl::start();
    for i in 0..5 {
        let (out, err, code) =
            r.exec(i, "import os, subprocess\nos.system('echo from-shell; echo to-err >&2')\nsubprocess.run(['echo', 'from-run'])\nos.write(1, b'raw\\n')");
        assert_eq!(code, 0);
        assert_eq!(out, "from-shell\nfrom-run\nraw\n");
        assert_eq!(err, "to-err\n");
    }
}

#[test]
fn output_streams_while_code_runs() {
    let mut r = Repl::start();
    r.exec_async(
        1,
        "import time\nprint('early')\ntime.sleep(1.5)\nprint('late')",
    );
    let t = Instant::now();
    let f = r.next();
    assert_eq!(
        (f.kind, f.payload.as_slice()),
        (Kind::Stdout, &b"early\n"[..])
    );
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "first output after {:?}",
        t.elapsed()
    );
    let (out, _, code) = r.wait(1);
    assert_eq!((out.as_slice(), code), (&b"late\n"[..], 0));
}

#[test]
fn cancel_running_and_queued() {
    let mut r = Repl::start();
    r.exec_async(1, "import time\nprint('sleeping')\ntime.sleep(60)");
    r.exec_async(2, "print('never')");
    r.exec_async(3, "print('after')");
    let f = r.next();
    assert_eq!(f.payload, b"sleeping\n");
    let t = Instant::now();
    r.send(Kind::Cancel, 2, b"");
    r.send(Kind::Cancel, 1, b"");
    let (_, err, code) = r.wait(1);
    assert_eq!(code, 130);
    assert!(err.ends_with("KeyboardInterrupt\n"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(r.wait(2), (Vec::new(), String::new(), 130));
    assert_eq!(r.wait(3).0, b"after\n");
    // Execs run one at a time, in arrival order.
    for s in 10..20 {
        r.exec_async(s, &format!("print({s})"));
    }
    for s in 10..20 {
        assert_eq!(r.wait(s).0, format!("{s}\n").into_bytes());
    }
}

#[test]
fn hello_reseeds_random_and_ping_pongs() {
    let mut r = Repl::start();
    let draw = |r: &mut Repl, entropy: &str, stream: u32| {
        r.send(
            Kind::Hello,
            0,
            format!(r#"{{"wall_clock_ns":1,"entropy_hex":"{entropy}"}}"#).as_bytes(),
        );
        assert_eq!(r.next().kind, Kind::Ready);
        r.exec(stream, "import random; print(random.random())").0
    };
    let a = draw(&mut r, "00112233445566778899aabbccddeeff", 1);
    let b = draw(&mut r, "00112233445566778899aabbccddeeff", 2);
    let c = draw(&mut r, "ffeeddccbbaa99887766554433221100", 3);
    assert_eq!(a, b);
    assert_ne!(a, c);
    r.send(Kind::Ping, 9, b"abc");
    let f = r.next();
    assert_eq!(
        (f.kind, f.stream, f.payload.as_slice()),
        (Kind::Pong, 9, &b"abc"[..])
    );
}

#[test]
fn garbage_and_unknown_kinds_are_ignored() {
    let mut r = Repl::start();
    r.sock.write_all(&[0, 1, 2, 3, 0xF1, 0, 0]).unwrap();
    // Unknown kind 999 with a payload.
    r.sock
        .write_all(&[0xF1, 1, 0xE7, 0x03, 1, 0, 0, 0, 2, 0, 0, 0, 7, 7])
        .unwrap();
    r.send(Kind::Exec, 4, b"{not json");
    let f = r.next();
    assert_eq!((f.kind, f.stream), (Kind::Error, 4));
    r.send(Kind::Exec, 5, br#"{"language":"bash","code":"echo"}"#);
    assert_eq!(r.next().kind, Kind::Error);
    assert_eq!(r.exec(6, "print('alive')").0, "alive\n");
}

#[test]
fn bytes_and_large_output() {
    let mut r = Repl::start();
    let (out, _, _) = r.exec(1, "import sys; sys.stdout.buffer.write(b'\\xff\\x00'); print('\\udcfe', end=''); print('\\u00e9')");
    assert_eq!(out, "\u{fffd}\u{0}\u{fffd}é\n");
    // The SDK's download path: base64 of an 8 MB file in stdout.
    r.exec_async(2, "import base64, random\ndata = random.randbytes(8 << 20)\nprint(base64.b64encode(data).decode())");
    let (out, err, code) = r.wait(2);
    assert_eq!((err.as_str(), code), ("", 0));
    assert_eq!(out.len(), (8 << 20) / 3 * 4 + 4 + 1);
    assert_eq!(r.exec(3, "print(len(data))").0, format!("{}\n", 8 << 20));
    // One write past the protocol's 64 MiB frame limit still arrives whole
    // (in several frames; a malformed frame would fail `next`).
    r.exec_async(4, "import sys; sys.stdout.write('y' * (65 << 20))");
    let (out, err, code) = r.wait(4);
    assert_eq!((err.as_str(), code, out.len()), ("", 0, 65 << 20));
    assert!(out.iter().all(|&b| b == b'y'));
}

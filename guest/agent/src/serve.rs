//! Port 0: turns host frames into actions.

use crate::exec::Execs;
use crate::frames::{decode_hex, FrameReader, InFrame};
use crate::port::Port;
use crate::pty::Ptys;
use crate::sys;
use podflare_proto::{Hello, Kind, Language, PtyRequest, PtySize, Ready, PROTOCOL_VERSION};
use serde::Deserialize;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// Most host entropy credited per Hello (the pool is 256 bits; more is waste).
const MAX_ENTROPY_BYTES: usize = 512;

/// The agent's reading of an Exec request: the protocol's `ExecRequest`
/// plus `stdin`, an opt-in that keeps the child's stdin open for `Stdin`
/// frames until `CloseStdin`. Without it stdin is /dev/null, so a command
/// that reads stdin (`cat`, `read`) ends instead of hanging an SDK exec.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct ExecArgs {
    /// Interpreter; only bash runs here (python is the REPL's, on port 1).
    pub language: Language,
    /// Script.
    pub code: String,
    /// Keep stdin open for `Stdin` frames.
    #[serde(default)]
    pub stdin: bool,
}

/// What a frame asks the agent to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Set the clock, credit entropy, answer Ready.
    Hello {
        wall_clock_ns: u64,
        entropy: Vec<u8>,
        disk_bytes: Option<u64>,
    },
    /// Start a bash exec.
    Exec {
        stream: u32,
        code: String,
        stdin: bool,
    },
    /// Start a terminal session.
    Pty { stream: u32, req: PtyRequest },
    /// A session's terminal has a new size.
    Resize { stream: u32, size: PtySize },
    /// Feed stdin.
    Stdin { stream: u32, data: Vec<u8> },
    /// Close stdin.
    CloseStdin { stream: u32 },
    /// Kill the stream's process group.
    Cancel { stream: u32 },
    /// Send a frame back (Pong, Error).
    Reply {
        kind: Kind,
        stream: u32,
        payload: Vec<u8>,
    },
    /// Nothing to do (guest-to-host kinds echoed back, and the like).
    Ignore,
}

/// Decides what a frame means. Pure: no I/O, never panics on host input.
pub fn classify(f: InFrame) -> Action {
    match f.kind {
        Kind::Hello => {
            // A malformed Hello still gets a Ready: the host learns we are alive.
            let hello: Hello = serde_json::from_slice(&f.payload).unwrap_or_default();
            let mut entropy = decode_hex(&hello.entropy_hex).unwrap_or_default();
            entropy.truncate(MAX_ENTROPY_BYTES);
            Action::Hello {
                wall_clock_ns: hello.wall_clock_ns,
                entropy,
                disk_bytes: hello.disk_bytes,
            }
        }
        Kind::Exec => match serde_json::from_slice::<ExecArgs>(&f.payload) {
            Ok(ExecArgs {
                language: Language::Bash,
                code,
                stdin,
            }) => Action::Exec {
                stream: f.stream,
                code,
                stdin,
            },
            Ok(ExecArgs {
                language: Language::Python,
                ..
            }) => Action::Reply {
                kind: Kind::Error,
                stream: f.stream,
                payload: b"python execs are served by the REPL on port 1".to_vec(),
            },
            Err(e) => Action::Reply {
                kind: Kind::Error,
                stream: f.stream,
                payload: format!("malformed exec request: {e}").into_bytes(),
            },
        },
        Kind::Pty => match serde_json::from_slice::<PtyRequest>(&f.payload) {
            Ok(req) if req.argv.is_empty() => Action::Reply {
                kind: Kind::Error,
                stream: f.stream,
                payload: b"pty request has an empty argv".to_vec(),
            },
            Ok(req) => Action::Pty {
                stream: f.stream,
                req,
            },
            Err(e) => Action::Reply {
                kind: Kind::Error,
                stream: f.stream,
                payload: format!("malformed pty request: {e}").into_bytes(),
            },
        },
        // A size that does not parse changes nothing; the session goes on.
        Kind::Resize => match serde_json::from_slice::<PtySize>(&f.payload) {
            Ok(size) => Action::Resize {
                stream: f.stream,
                size,
            },
            Err(_) => Action::Ignore,
        },
        Kind::Stdin => Action::Stdin {
            stream: f.stream,
            data: f.payload,
        },
        Kind::CloseStdin => Action::CloseStdin { stream: f.stream },
        Kind::Cancel => Action::Cancel { stream: f.stream },
        Kind::Ping => Action::Reply {
            kind: Kind::Pong,
            stream: f.stream,
            payload: f.payload,
        },
        // Wake is for the REPL's ring; the agent has none.
        Kind::Wake
        | Kind::Ready
        | Kind::Stdout
        | Kind::Stderr
        | Kind::Exit
        | Kind::Error
        | Kind::Pong
        | Kind::Started => Action::Ignore,
    }
}

/// The agent's Ready payload.
pub fn ready_payload() -> Vec<u8> {
    serde_json::to_vec(&Ready {
        protocol: PROTOCOL_VERSION,
        role: "agent".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .unwrap_or_default()
}

/// Port 0 service state.
pub struct Server {
    /// The port.
    pub port: Arc<Port>,
    /// Exec service.
    pub execs: Arc<Execs>,
    /// Terminal sessions.
    pub ptys: Arc<Ptys>,
    /// `/dev/urandom`, kept open so each Hello costs one ioctl.
    pub urandom: Option<OwnedFd>,
    /// Whether Hello sets the wall clock (not in the host test harness).
    pub set_clock: bool,
}

impl Server {
    /// Reads and serves frames forever.
    pub fn serve(&self) -> ! {
        let mut reader = FrameReader::new();
        // The driver hands out at most one 4 KiB buffer per read.
        let mut buf = vec![0u8; 64 << 10];
        let mut nap = Duration::from_millis(1);
        loop {
            match self.port.read(&mut buf) {
                Ok(n) if n > 0 => {
                    nap = Duration::from_millis(1);
                    reader.push(&buf[..n]);
                    while let Some(frame) = reader.next_frame() {
                        self.act(classify(frame));
                    }
                }
                // 0: no host connected (the driver returns EOF at once, it does
                // not block); errors: the device is going away. Either way back
                // off instead of spinning.
                _ => {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    fn act(&self, action: Action) {
        match action {
            Action::Hello {
                wall_clock_ns,
                entropy,
                disk_bytes,
            } => {
                // Before Ready: the host sends the REPL's Hello, and so any
                // user code, only after this one is answered when it asks
                // for a size.
                if let Some(bytes) = disk_bytes {
                    if let Err(e) = crate::boot::grow_disk(bytes) {
                        crate::console::line(&format!(
                            "podflare-agent: growing the disk to {bytes} bytes failed: {e}"
                        ));
                    }
                }
                if wall_clock_ns > 0
                    && self.set_clock
                    && sys::clock_needs_setting(sys::realtime_ns(), wall_clock_ns)
                {
                    let _ = sys::set_realtime(wall_clock_ns);
                }
                if let (Some(fd), false) = (&self.urandom, entropy.is_empty()) {
                    let _ = sys::add_entropy(fd, &entropy);
                }
                let _ = self.port.send(Kind::Ready, 0, &ready_payload());
            }
            // One stream id names one thing: an exec or a session.
            Action::Exec { stream, .. } | Action::Pty { stream, .. }
                if self.execs.has(stream) || self.ptys.has(stream) =>
            {
                let _ = self
                    .port
                    .send(Kind::Error, stream, b"stream id already running");
            }
            Action::Exec {
                stream,
                code,
                stdin,
            } => self.execs.start(stream, code, stdin),
            Action::Pty { stream, req } => self.ptys.start(stream, req),
            Action::Resize { stream, size } => {
                self.ptys.resize(stream, size);
            }
            // Sessions first; a stream that is not one may be an exec.
            Action::Stdin { stream, data } => {
                if !self.ptys.stdin(stream, &data) {
                    self.execs.stdin(stream, &data)
                }
            }
            Action::CloseStdin { stream } => {
                if !self.ptys.close_stdin(stream) {
                    self.execs.close_stdin(stream)
                }
            }
            Action::Cancel { stream } => {
                if !self.ptys.cancel(stream) {
                    self.execs.cancel(stream)
                }
            }
            Action::Reply {
                kind,
                stream,
                payload,
            } => {
                let _ = self.port.send(kind, stream, &payload);
            }
            Action::Ignore => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, stream: u32, payload: &[u8]) -> InFrame {
        InFrame {
            kind,
            stream,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn hello_decodes_clock_and_entropy() {
        let a = classify(frame(
            Kind::Hello,
            0,
            br#"{"wall_clock_ns":1700000000000000000,"entropy_hex":"00ff10"}"#,
        ));
        assert_eq!(
            a,
            Action::Hello {
                wall_clock_ns: 1_700_000_000_000_000_000,
                entropy: vec![0, 255, 16],
                disk_bytes: None,
            }
        );
        let a = classify(frame(
            Kind::Hello,
            0,
            br#"{"wall_clock_ns":1,"entropy_hex":"","disk_bytes":2147483648}"#,
        ));
        assert_eq!(
            a,
            Action::Hello {
                wall_clock_ns: 1,
                entropy: vec![],
                disk_bytes: Some(2 << 30),
            }
        );
    }

    #[test]
    fn bad_hello_still_answers() {
        assert_eq!(
            classify(frame(Kind::Hello, 0, b"\xff not json")),
            Action::Hello {
                wall_clock_ns: 0,
                entropy: vec![],
                disk_bytes: None,
            }
        );
        let a = classify(frame(
            Kind::Hello,
            0,
            br#"{"wall_clock_ns":5,"entropy_hex":"xyz"}"#,
        ));
        assert_eq!(
            a,
            Action::Hello {
                wall_clock_ns: 5,
                entropy: vec![],
                disk_bytes: None,
            }
        );
        let huge = format!(
            r#"{{"wall_clock_ns":1,"entropy_hex":"{}"}}"#,
            "ab".repeat(10_000)
        );
        match classify(frame(Kind::Hello, 0, huge.as_bytes())) {
            Action::Hello { entropy, .. } => assert_eq!(entropy.len(), MAX_ENTROPY_BYTES),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_bash_python_and_garbage() {
        assert_eq!(
            classify(frame(
                Kind::Exec,
                3,
                br#"{"language":"bash","code":"echo hi","future_field":1}"#
            )),
            Action::Exec {
                stream: 3,
                code: "echo hi".into(),
                stdin: false
            }
        );
        assert_eq!(
            classify(frame(
                Kind::Exec,
                3,
                br#"{"language":"bash","code":"cat","stdin":true}"#
            )),
            Action::Exec {
                stream: 3,
                code: "cat".into(),
                stdin: true
            }
        );
        for bad in [
            &br#"{"language":"python","code":"1"}"#[..],
            b"{",
            br#"{"language":"cobol","code":""}"#,
        ] {
            match classify(frame(Kind::Exec, 9, bad)) {
                Action::Reply {
                    kind: Kind::Error,
                    stream: 9,
                    ..
                } => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn pty_requests_decode_and_garbage_is_an_error() {
        let a = classify(frame(
            Kind::Pty,
            4,
            br#"{"argv":["bash","-l"],"size":{"cols":120,"rows":40},"cwd":"/tmp","env":[["A","1"]],"future_field":1}"#,
        ));
        assert_eq!(
            a,
            Action::Pty {
                stream: 4,
                req: PtyRequest {
                    argv: vec!["bash".into(), "-l".into()],
                    size: PtySize {
                        cols: 120,
                        rows: 40
                    },
                    cwd: Some("/tmp".into()),
                    env: vec![("A".into(), "1".into())],
                }
            }
        );
        // cwd and env may be left out.
        match classify(frame(
            Kind::Pty,
            5,
            br#"{"argv":["sh"],"size":{"cols":80,"rows":24}}"#,
        )) {
            Action::Pty { stream: 5, req } => {
                assert_eq!((req.cwd, req.env.len()), (None, 0));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"{"[..],
            b"\xff\xfe",
            br#"{"argv":[],"size":{"cols":80,"rows":24}}"#,
            br#"{"argv":["sh"]}"#,
            br#"{"argv":["sh"],"size":{"cols":-1,"rows":24}}"#,
            br#"{"argv":["sh"],"size":{"cols":70000,"rows":24}}"#,
            br#"{"argv":"sh","size":{"cols":80,"rows":24}}"#,
            br#"{"argv":["sh"],"size":{"cols":80,"rows":24},"env":[["A"]]}"#,
        ] {
            match classify(frame(Kind::Pty, 9, bad)) {
                Action::Reply {
                    kind: Kind::Error,
                    stream: 9,
                    payload,
                } => assert!(!payload.is_empty()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn resize_decodes_and_garbage_is_ignored() {
        assert_eq!(
            classify(frame(Kind::Resize, 3, br#"{"cols":100,"rows":30}"#)),
            Action::Resize {
                stream: 3,
                size: PtySize {
                    cols: 100,
                    rows: 30
                }
            }
        );
        for bad in [
            &b""[..],
            b"{",
            br#"{"cols":100}"#,
            br#"{"cols":1e9,"rows":1}"#,
        ] {
            assert_eq!(classify(frame(Kind::Resize, 3, bad)), Action::Ignore);
        }
        assert_eq!(classify(frame(Kind::Started, 3, b"")), Action::Ignore);
    }

    #[test]
    fn ping_pongs_and_guest_kinds_are_ignored() {
        assert_eq!(
            classify(frame(Kind::Ping, 7, b"x")),
            Action::Reply {
                kind: Kind::Pong,
                stream: 7,
                payload: b"x".to_vec()
            }
        );
        assert_eq!(classify(frame(Kind::Stdout, 1, b"x")), Action::Ignore);
        assert_eq!(
            classify(frame(Kind::Cancel, 2, b"")),
            Action::Cancel { stream: 2 }
        );
    }

    #[test]
    fn ready_is_the_agent() {
        let r: Ready = serde_json::from_slice(&ready_payload()).unwrap();
        assert_eq!((r.protocol, r.role.as_str()), (1, "agent"));
    }
}

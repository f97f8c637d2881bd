//! Wire protocol between podflare-hostd and the in-guest agent.
//!
//! Both ends speak the same framed byte stream over a virtio-console port:
//!
//! ```text
//! offset size field
//! 0      1    magic   0xF1
//! 1      1    version PROTOCOL_VERSION
//! 2      2    kind    (u16 LE, see `Kind`)
//! 4      4    stream  (u32 LE) request id chosen by the host; 0 = the channel itself
//! 8      4    len     (u32 LE) payload length, at most MAX_PAYLOAD
//! 12     len  payload (raw bytes for data messages, JSON for structured ones)
//! ```
//!
//! Many streams share one port: every message carries the id of the request it
//! belongs to. The guest is untrusted, so decoding never panics: a bad header
//! is an error the caller turns into "this VM's channel failed".
//!
//! Port 0 is served by the agent (PID 1): bash execs, later PTYs and files.
//! Port 1 is served directly by the Python REPL process, so a Python exec
//! costs the guest kernel one read and one write and no process hop.
//! `guest/repl.py` implements this same framing in Python.
#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// First byte of every frame.
pub const MAGIC: u8 = 0xF1;
/// Bumped on any incompatible change; both ends refuse other versions.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload one frame may carry. Bigger data is sent as several frames.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Port index of the agent (bash, PTY, control).
pub const AGENT_PORT: u32 = 0;
/// Port index of the persistent Python REPL.
pub const REPL_PORT: u32 = 1;

/// Message kinds. Host-to-guest kinds are below 64, guest-to-host from 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Host -> guest: JSON [`Hello`]; sent at connect and after every restore.
    Hello = 1,
    /// Host -> guest: JSON [`ExecRequest`]; starts stream `stream`.
    Exec = 2,
    /// Host -> guest: raw bytes for the stream's stdin.
    Stdin = 3,
    /// Host -> guest: close the stream's stdin.
    CloseStdin = 4,
    /// Host -> guest: kill the stream's process group.
    Cancel = 5,
    /// Host -> guest: echo request (raw payload comes back in `Pong`).
    Ping = 6,
    /// Host -> guest (agent port): JSON [`PtyRequest`]; starts a terminal
    /// session as stream `stream`. Its output comes back as `Stdout`, its
    /// input goes in as `Stdin`, `Cancel` kills its process group, and it
    /// ends with `Exit` (or `Error` if it could not start).
    Pty = 7,
    /// Host -> guest: JSON [`PtySize`]; the terminal of stream `stream` has
    /// a new size (its foreground process group gets SIGWINCH).
    Resize = 8,
    /// Host -> guest (REPL port): empty; requests wait in the shared-memory
    /// ring ([`ring`]) and the REPL went to sleep: look again.
    Wake = 9,
    /// Guest -> host: JSON [`Ready`]; the end speaking on this port is serving.
    Ready = 64,
    /// Guest -> host: raw stdout bytes of stream `stream`.
    Stdout = 65,
    /// Guest -> host: raw stderr bytes of stream `stream`.
    Stderr = 66,
    /// Guest -> host: 4-byte i32 LE exit code; the stream is finished.
    Exit = 67,
    /// Guest -> host: UTF-8 message; the request failed before it ran.
    Error = 68,
    /// Guest -> host: reply to `Ping` with the same payload.
    Pong = 69,
    /// Guest -> host: empty; the command of stream `stream` is running (a
    /// terminal session is ready for input).
    Started = 70,
}

impl Kind {
    /// Decodes a kind number; unknown numbers are `None` (the peer is newer or lying).
    pub fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Exec,
            3 => Kind::Stdin,
            4 => Kind::CloseStdin,
            5 => Kind::Cancel,
            6 => Kind::Ping,
            7 => Kind::Pty,
            8 => Kind::Resize,
            9 => Kind::Wake,
            64 => Kind::Ready,
            65 => Kind::Stdout,
            66 => Kind::Stderr,
            67 => Kind::Exit,
            68 => Kind::Error,
            69 => Kind::Pong,
            70 => Kind::Started,
            _ => return None,
        })
    }
}

/// Sent by the host when it (re)connects: at boot, and after every restore or
/// fork, so each copy of a snapshot gets its own clock and randomness.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Hello {
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub wall_clock_ns: u64,
    /// Fresh host entropy (hex) to credit to the guest's pool and to reseed the REPL.
    pub entropy_hex: String,
    /// The size (bytes) the writable disk's file system should have: the
    /// agent grows it (online) before it answers Ready. Absent: leave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// The ring generation ([`ring::GENERATION`]) the host wrote before
    /// this Hello: the REPL runs no ring request of a newer generation
    /// until it has handled this Hello (fresh clock and randomness first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_generation: Option<u32>,
}

/// The shared-memory ring between hostd and the REPL: a region of guest
/// RAM the e820 map marks reserved (the guest kernel never uses it), which
/// the REPL maps through `/dev/mem` and hostd reads and writes through its
/// own mapping of guest memory. It carries the REPL port's frames (the
/// same framing as the console) in two byte rings, so an exec and its
/// output cost the guest no system call and no VM exit while the REPL
/// polls; the console port stays for `Hello`, `Cancel` and [`Kind::Wake`].
///
/// Counters are free-running byte counts (u64, little endian, 8-byte
/// aligned): `head - tail` bytes are in a ring, at `counter % size`.
/// Everything in the region is untrusted to hostd.
pub mod ring {
    /// Guest-physical start of the region.
    pub const BASE: u64 = 0x80_0000;
    /// Region length.
    pub const LEN: u64 = 0x40_0000;
    /// u32: [`GUEST_MAGIC_VALUE`] once the REPL serves the ring.
    pub const GUEST_MAGIC: u64 = 0x00;
    /// The value of [`GUEST_MAGIC`]: "PFR1".
    pub const GUEST_MAGIC_VALUE: u32 = 0x3152_4650;
    /// u32: odd while the REPL sleeps (it then needs a [`super::Kind::Wake`]),
    /// even while it polls; the REPL adds one at each change.
    pub const SLEEP: u64 = 0x08;
    /// u32, host-written: bumped before every `Hello` (see
    /// [`super::Hello::ring_generation`]).
    pub const GENERATION: u64 = 0x10;
    /// u32, host-written: how long (microseconds) the REPL keeps polling
    /// after its last request before it sleeps.
    pub const POLL_US: u64 = 0x14;
    /// u64, host-written: bytes ever written into the host -> guest ring.
    pub const H2G_HEAD: u64 = 0x40;
    /// u64, guest-written: bytes ever taken from the host -> guest ring.
    pub const H2G_TAIL: u64 = 0x48;
    /// u64, guest-written: bytes ever written into the guest -> host ring.
    pub const G2H_HEAD: u64 = 0x80;
    /// u64, host-written: bytes ever taken from the guest -> host ring.
    pub const G2H_TAIL: u64 = 0x88;
    /// Offset of the host -> guest ring's bytes.
    pub const H2G_DATA: u64 = 0x10_0000;
    /// Size of the host -> guest ring.
    pub const H2G_SIZE: u64 = 0x10_0000;
    /// Offset of the guest -> host ring's bytes.
    pub const G2H_DATA: u64 = 0x20_0000;
    /// Size of the guest -> host ring.
    pub const G2H_SIZE: u64 = 0x20_0000;

    // The rings lie after the control page, apart, inside the region, and
    // the counters are 8-byte aligned (a compile error otherwise).
    const _: () = assert!(
        H2G_DATA >= 0x1000
            && H2G_DATA + H2G_SIZE <= G2H_DATA
            && G2H_DATA + G2H_SIZE <= LEN
            && H2G_HEAD.is_multiple_of(8)
            && H2G_TAIL.is_multiple_of(8)
            && G2H_HEAD.is_multiple_of(8)
            && G2H_TAIL.is_multiple_of(8)
    );
}

/// Which interpreter runs an exec.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// The persistent REPL (port 1).
    Python,
    /// A fresh `bash -c` (port 0).
    Bash,
}

/// Start a command. The stream id of the frame names it from now on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// Interpreter.
    pub language: Language,
    /// Source code (python) or script (bash).
    pub code: String,
}

/// Start a terminal session: `argv` runs as a session leader with a new
/// pseudo-terminal as its controlling terminal and stdin/stdout/stderr,
/// `TERM=xterm-256color`, the agent's environment plus `env`, in `cwd`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtyRequest {
    /// Program and arguments (`argv[0]` is looked up in `PATH`).
    pub argv: Vec<String>,
    /// Terminal size.
    pub size: PtySize,
    /// Working directory (the agent's default when `None`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment, in order (later wins).
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtySize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// Announced by an end that starts serving a port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Ready {
    /// Protocol version the speaker implements.
    pub protocol: u8,
    /// Who is speaking: "agent" or "repl".
    pub role: String,
    /// Free-form version of the speaker.
    #[serde(default)]
    pub version: String,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload means.
    pub kind: Kind,
    /// Request id (0 for channel-level messages).
    pub stream: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// What can be wrong with bytes that claim to be frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// First byte was not [`MAGIC`].
    BadMagic(u8),
    /// The peer speaks another protocol version.
    BadVersion(u8),
    /// Kind number not known to this version.
    UnknownKind(u16),
    /// Payload length above [`MAX_PAYLOAD`].
    TooLarge(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::BadMagic(b) => write!(f, "bad frame magic {b:#04x}"),
            DecodeError::BadVersion(v) => write!(f, "protocol version {v} (want {PROTOCOL_VERSION})"),
            DecodeError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            DecodeError::TooLarge(n) => write!(f, "frame payload of {n} bytes exceeds {MAX_PAYLOAD}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Appends one frame to `out`.
///
/// Panics only if `payload` is longer than [`MAX_PAYLOAD`], which is a bug in
/// the caller (split data first).
pub fn encode(out: &mut Vec<u8>, kind: Kind, stream: u32, payload: &[u8]) {
    assert!(payload.len() <= MAX_PAYLOAD, "frame payload too large");
    out.reserve(HEADER_LEN + payload.len());
    out.push(MAGIC);
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&stream.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes a frame whose payload is `value` as JSON.
pub fn encode_json<T: Serialize>(out: &mut Vec<u8>, kind: Kind, stream: u32, value: &T) {
    // Serialising our own plain structs cannot fail.
    let payload = serde_json::to_vec(value).unwrap_or_default();
    encode(out, kind, stream, &payload);
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
/// Cloned when a sandbox forks: the child continues its parent's
/// half-received frames.
#[derive(Debug, Default, Clone)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Returns the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        if avail[0] != MAGIC {
            return Err(DecodeError::BadMagic(avail[0]));
        }
        if avail[1] != PROTOCOL_VERSION {
            return Err(DecodeError::BadVersion(avail[1]));
        }
        let kind_raw = u16::from_le_bytes([avail[2], avail[3]]);
        let kind = Kind::from_u16(kind_raw).ok_or(DecodeError::UnknownKind(kind_raw))?;
        let stream = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        let len = u32::from_le_bytes([avail[8], avail[9], avail[10], avail[11]]);
        if len as usize > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(len));
        }
        let total = HEADER_LEN + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..total].to_vec();
        self.start += total;
        // Compact once the consumed prefix dominates, so the buffer stays bounded.
        if self.start > 1 << 20 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(Frame { kind, stream, payload }))
    }
}

/// Reads the exit code payload of an `Exit` frame (missing bytes read as -1).
pub fn exit_code(payload: &[u8]) -> i32 {
    match payload.get(..4) {
        Some(b) => i32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => -1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_split_anywhere() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Stdout, 7, b"hello\n");
        encode_json(&mut wire, Kind::Exec, 8, &ExecRequest { language: Language::Bash, code: "echo hi".into() });
        encode(&mut wire, Kind::Exit, 7, &3i32.to_le_bytes());
        for cut in 0..wire.len() {
            let mut d = Decoder::new();
            d.push(&wire[..cut]);
            let mut frames = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
            d.push(&wire[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                frames.push(f);
            }
            assert_eq!(frames.len(), 3, "cut at {cut}");
            assert_eq!(frames[0].payload, b"hello\n");
            let req: ExecRequest = serde_json::from_slice(&frames[1].payload).unwrap();
            assert_eq!(req.code, "echo hi");
            assert_eq!(exit_code(&frames[2].payload), 3);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let mut d = Decoder::new();
        d.push(&[0u8; 12]);
        assert_eq!(d.next_frame(), Err(DecodeError::BadMagic(0)));
        let mut d = Decoder::new();
        d.push(&[MAGIC, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(DecodeError::BadVersion(9)));
        let mut d = Decoder::new();
        d.push(&[MAGIC, PROTOCOL_VERSION, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(DecodeError::UnknownKind(0xffff)));
        let mut d = Decoder::new();
        d.push(&[MAGIC, PROTOCOL_VERSION, 65, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(DecodeError::TooLarge(u32::MAX)));
    }

    #[test]
    fn wake_is_a_known_kind() {
        // The ring's layout itself is checked at compile time, in `ring`.
        assert_eq!(Kind::from_u16(Kind::Wake as u16), Some(Kind::Wake));
    }

    #[test]
    fn exit_code_tolerates_short_payload() {
        assert_eq!(exit_code(&[]), -1);
        assert_eq!(exit_code(&(-9i32).to_le_bytes()), -9);
    }
}

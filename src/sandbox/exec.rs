//! One exec as a stream of NDJSON events: queueing behind earlier execs of the
//! same sandbox, splitting the guest's raw byte chunks into lines per stream,
//! encoding events, keep-alives on silence, and recording replay.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::instance::{ExecStartError, Sandbox, StreamSlot};
use super::queue::Ticket;
use crate::guest::stream::RecvTimeoutError;
use crate::guest::{ExecChunk, Language, StreamRx};
use crate::obs::{Logger, Metrics};

/// Exit code reported when the guest fails mid-stream, the sandbox is deleted
/// under a running exec, or the exec cannot start: 137 is what a shell shows
/// for a SIGKILLed process, the closest everyday meaning.
pub const FAILED_EXIT_CODE: i32 = 137;

/// Longest line kept whole. Longer output without a newline is emitted in
/// pieces of this size so a guest cannot make the host buffer without bound.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// Splits one output stream (stdout or stderr) into lines.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max_line: usize,
}

fn strip_cr(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line
}

impl LineSplitter {
    /// A splitter that cuts lines longer than `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        LineSplitter { buf: Vec::new(), max_line: max_line.max(1) }
    }

    /// Feeds raw bytes; returns the lines they complete, without `\n` and
    /// without one trailing `\r`.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.append(&data[..pos], &mut lines);
            lines.push(strip_cr(std::mem::take(&mut self.buf)));
            data = &data[pos + 1..];
        }
        self.append(data, &mut lines);
        lines
    }

    /// Buffers part of a line, cutting off `max_line`-byte pieces while more
    /// than that is held (at least one byte stays for the newline to end).
    fn append(&mut self, part: &[u8], lines: &mut Vec<Vec<u8>>) {
        self.buf.extend_from_slice(part);
        while self.buf.len() > self.max_line {
            let rest = self.buf.split_off(self.max_line);
            lines.push(std::mem::replace(&mut self.buf, rest));
        }
    }

    /// The final line that had no newline, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.buf.is_empty() {
            None
        } else {
            Some(strip_cr(std::mem::take(&mut self.buf)))
        }
    }
}

/// Appends `s` as a JSON string literal. Besides what JSON requires, escapes
/// U+0085, U+2028 and U+2029: Python's `str.splitlines` (used by the SDK)
/// breaks lines on them.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 0xf) as usize]);
            }
            // U+0085 is C2 85 in UTF-8.
            0xc2 if b.get(i + 1) == Some(&0x85) => {
                out.extend_from_slice(b"\\u0085");
                i += 1;
            }
            // U+2028 / U+2029 are E2 80 A8 / E2 80 A9.
            0xe2 if b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xa8) | Some(0xa9)) => {
                out.extend_from_slice(if b[i + 2] == 0xa8 { b"\\u2028" } else { b"\\u2029" });
                i += 2;
            }
            _ => out.push(c),
        }
        i += 1;
    }
    out.push(b'"');
}

/// Host wall-clock milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Payload of one event.
#[derive(Debug, Clone, Copy)]
pub enum EventData<'a> {
    /// A stdout line (raw bytes, converted lossily).
    Stdout(&'a [u8]),
    /// A stderr line.
    Stderr(&'a [u8]),
    /// The exit status.
    Exit(i32),
}

/// Encodes one event as a JSON line (no trailing newline) with all four keys.
pub fn encode_event(data: EventData<'_>, seq: u64, ts: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let (kind, text) = match data {
        EventData::Stdout(b) => ("stdout", Some(b)),
        EventData::Stderr(b) => ("stderr", Some(b)),
        EventData::Exit(_) => ("exit", None),
    };
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    match (text, data) {
        (Some(b), _) => push_json_str(&mut out, &String::from_utf8_lossy(b)),
        (None, EventData::Exit(code)) => out.extend_from_slice(code.to_string().as_bytes()),
        (None, _) => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(format!(",\"seq\":{seq},\"ts\":{ts}}}").as_bytes());
    out
}

/// A reply the transport writes line by line as it is produced.
pub trait EventStream: Send + 'static {
    /// Blocks until the next thing to send, at most the keep-alive interval;
    /// `None` at the end.
    fn next_item(&mut self) -> Option<StreamItem>;
    /// The client is gone or stopped reading: what becomes of the rest.
    fn abandon(self, log: &Logger);
}

impl EventStream for ExecStream {
    fn next_item(&mut self) -> Option<StreamItem> {
        ExecStream::next_item(self)
    }

    /// The exec still runs to its end (queue order, replay), but on a
    /// thread of its own, so an endless exec nobody reads does not keep a
    /// worker. These threads are bounded by the stream slots each abandoned
    /// exec still holds.
    fn abandon(mut self, log: &Logger) {
        let spawned = std::thread::Builder::new()
            .name("exec-drain".into())
            .spawn(move || while self.next_item().is_some() {});
        if let Err(e) = spawned {
            // Dropping the stream is the fallback: the queue moves on, replay
            // misses the rest of this exec's output.
            log.error(
                "cannot start a thread to drain an abandoned exec stream",
                &[("cause", serde_json::json!(e.to_string()))],
            );
        }
    }
}

/// What the transport writes next.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// One event as a JSON line (no trailing newline).
    Event(Vec<u8>),
    /// Nothing happened for the keep-alive interval: send a bare `\n`.
    KeepAlive,
}

enum Phase {
    /// Waiting for earlier execs of the sandbox to finish.
    Queued { language: Language, code: String },
    /// Running: chunks arrive on `rx`.
    Running { rx: StreamRx<ExecChunk>, out: LineSplitter, err: LineSplitter },
    /// The exit event has been produced.
    Done,
}

/// One exec, from its place in the queue to its exit event. Drive it with
/// [`ExecStream::next_item`] until `None`. Dropping it early is safe: the
/// queue moves on (a running guest command is not cancelled, its output is
/// just no longer read).
pub struct ExecStream {
    sandbox: Arc<Sandbox>,
    ticket: Option<Ticket>,
    phase: Phase,
    pending: VecDeque<Vec<u8>>,
    seq: u64,
    keepalive: Duration,
    _slot: (StreamSlot, StreamSlot),
    metrics: Arc<Metrics>,
    /// When the guest was asked to run it.
    started: Option<Instant>,
}

impl ExecStream {
    pub(super) fn new(
        sandbox: Arc<Sandbox>,
        language: Language,
        code: String,
        keepalive: Duration,
        slot: (StreamSlot, StreamSlot),
        metrics: Arc<Metrics>,
    ) -> Self {
        sandbox.exec_queued();
        let ticket = Some(sandbox.queue().ticket());
        ExecStream {
            sandbox,
            ticket,
            phase: Phase::Queued { language, code },
            pending: VecDeque::new(),
            seq: 0,
            keepalive,
            _slot: slot,
            metrics,
            started: None,
        }
    }

    /// Blocks until the next thing to send, at most the keep-alive interval.
    /// `None` once the exit event has been returned.
    pub fn next_item(&mut self) -> Option<StreamItem> {
        let deadline = Instant::now() + self.keepalive;
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(StreamItem::Event(line));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Queued { .. } => {
                    let our_turn = self.ticket.as_ref().is_none_or(|t| t.wait_turn(remaining));
                    if !our_turn {
                        return Some(StreamItem::KeepAlive);
                    }
                    self.start();
                }
                Phase::Running { rx, out, err } => {
                    if remaining.is_zero() {
                        return Some(StreamItem::KeepAlive);
                    }
                    match rx.recv_timeout(remaining) {
                        Ok(ExecChunk::Stdout(b)) => {
                            for line in out.push(&b) {
                                self.emit(EventData::Stdout(&line));
                            }
                        }
                        Ok(ExecChunk::Stderr(b)) => {
                            for line in err.push(&b) {
                                self.emit(EventData::Stderr(&line));
                            }
                        }
                        Ok(ExecChunk::Exit(code)) => self.finish(Ok(code)),
                        Ok(ExecChunk::Started) => {}
                        Ok(ExecChunk::Failed(msg)) if self.sandbox.is_destroyed() => self.finish(Err(format!(
                            "podflare: sandbox {} was destroyed during this exec: {msg}",
                            self.sandbox.id()
                        ))),
                        Ok(ExecChunk::Failed(msg)) => {
                            self.finish(Err(format!("podflare: the sandbox failed during this exec: {msg}")))
                        }
                        // Safety net: a VMM whose dropped guest does not
                        // close its exec channels must not leave this stream
                        // (and its worker) waiting forever.
                        Err(RecvTimeoutError::Timeout) if self.sandbox.is_destroyed() => {
                            self.finish(Err(format!(
                                "podflare: sandbox {} was destroyed during this exec",
                                self.sandbox.id()
                            )))
                        }
                        Err(RecvTimeoutError::Timeout) => return Some(StreamItem::KeepAlive),
                        Err(RecvTimeoutError::Disconnected) => {
                            let why = if self.sandbox.is_destroyed() {
                                format!("podflare: sandbox {} was destroyed during this exec", self.sandbox.id())
                            } else {
                                "podflare: the sandbox stopped answering during this exec".to_string()
                            };
                            self.finish(Err(why));
                        }
                    }
                }
            }
        }
    }

    /// Our turn has come: start the command in the guest.
    fn start(&mut self) {
        let Phase::Queued { language, code } = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        self.sandbox.exec_started();
        self.started = Some(Instant::now());
        match self.sandbox.start_exec(language, &code) {
            Ok(rx) => {
                self.phase = Phase::Running {
                    rx,
                    out: LineSplitter::new(MAX_LINE_BYTES),
                    err: LineSplitter::new(MAX_LINE_BYTES),
                }
            }
            Err(ExecStartError::Destroyed) => self.finish(Err(format!(
                "podflare: sandbox {} was destroyed before this exec could run",
                self.sandbox.id()
            ))),
            Err(ExecStartError::Guest(e)) => self.finish(Err(format!("podflare: could not start the exec: {e}"))),
        }
    }

    /// Flushes partial lines, reports a failure if any, emits `exit`, and
    /// lets the next exec of the sandbox run.
    fn finish(&mut self, result: Result<i32, String>) {
        if let Phase::Running { out, err, .. } = &mut self.phase {
            let (o, e) = (out.finish(), err.finish());
            if let Some(line) = o {
                self.emit(EventData::Stdout(&line));
            }
            if let Some(line) = e {
                self.emit(EventData::Stderr(&line));
            }
        }
        let code = match result {
            Ok(code) => code,
            Err(msg) => {
                for line in msg.lines() {
                    self.emit(EventData::Stderr(line.as_bytes()));
                }
                FAILED_EXIT_CODE
            }
        };
        self.emit(EventData::Exit(code));
        if let Some(at) = self.started.take() {
            self.metrics.observe_exec(at.elapsed());
        }
        self.phase = Phase::Done;
        self.release();
    }

    fn emit(&mut self, data: EventData<'_>) {
        let line = encode_event(data, self.seq, now_ms());
        self.seq += 1;
        self.sandbox.record(&line);
        self.pending.push_back(line);
    }

    fn release(&mut self) {
        if self.ticket.take().is_some() {
            self.sandbox.exec_finished();
        }
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(8);
        let mut out: Vec<Vec<u8>> = chunks.iter().flat_map(|c| s.push(c)).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn lines() {
        assert_eq!(split(&[b"a\n\nb"]), vec![b"a".to_vec(), b"".to_vec(), b"b".to_vec()]);
        assert_eq!(split(&[b"a\r", b"\nb\r\r\n"]), vec![b"a".to_vec(), b"b\r".to_vec()]);
        assert_eq!(split(&[b"0123", b"456789\n"]), vec![b"01234567".to_vec(), b"89".to_vec()]);
        assert_eq!(split(&[b"01234567\n"]), vec![b"01234567".to_vec()]);
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn json_escapes() {
        let mut v = Vec::new();
        push_json_str(&mut v, "a\"\\\n\u{1}\u{85}\u{2028}\u{2029}é\u{7f}");
        let want = "\"a\\\"\\\\\\n\\u0001\\u0085\\u2028\\u2029é\u{7f}\"";
        assert_eq!(String::from_utf8(v).unwrap(), want);
        let e = encode_event(EventData::Stdout(b"\xff42"), 3, 9);
        assert_eq!(e, "{\"type\":\"stdout\",\"data\":\"\u{fffd}42\",\"seq\":3,\"ts\":9}".as_bytes());
        let e = encode_event(EventData::Exit(-1), 0, 1);
        assert_eq!(e, br#"{"type":"exit","data":-1,"seq":0,"ts":1}"#);
    }
}

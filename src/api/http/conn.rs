//! One client connection and the reading half of its state machine.
//!
//! A connection moves between the accept thread (parked, waiting for bytes)
//! and the workers (reading what has arrived, answering a complete
//! request). Reads never block: a worker takes what the socket holds
//! (`MSG_DONTWAIT`) and parks the connection again when a request is not
//! complete, so a slow or silent client holds a connection slot and a
//! bounded buffer, never a worker.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, MsgFlags};

use super::request::{parse_head, BodyKind, Chunked, Head, HttpError, MAX_HEAD_BYTES};
use crate::api::error::ApiError;

/// Largest single read.
const READ_CHUNK: usize = 32 << 10;

/// The HTTP timeouts and limits, from [`Config`](crate::config::Config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body.
    pub max_body: usize,
    /// From the first byte of a request (or the connection) to its full head.
    pub header: Duration,
    /// Longest pause while a body arrives.
    pub body: Duration,
    /// Longest a reply (or one stream line) may wait for the client to read.
    pub write: Duration,
    /// Longest a keep-alive connection may sit idle between requests.
    pub idle: Duration,
}

/// Holds one place under the open-connection cap until dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place if fewer than `max` are taken.
    pub fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(open)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where the current request stands.
#[derive(Debug)]
enum Reading {
    /// Waiting for (the rest of) a head.
    Head,
    /// Head accepted; `left` body bytes to come into `data`.
    Length { head: Head, left: u64, data: Vec<u8> },
    /// Head accepted; a chunked body being decoded.
    Chunked { head: Head, body: Chunked },
    /// Refused before its body: reading `left` bytes to throw away, so the
    /// connection can carry the next request.
    Discard { head: Head, err: ApiError, left: u64 },
}

/// What the bytes so far amount to.
#[derive(Debug)]
pub enum Step {
    /// Not a whole request yet.
    NeedMore,
    /// The client waits for `100 Continue` before sending the body.
    SendContinue,
    /// A whole request.
    Request(Head, Vec<u8>),
    /// Answer `ApiError`; the connection can go on (the body, if any, was read).
    Refused(Head, ApiError),
    /// Answer `ApiError` and close: the stream is not at a request boundary.
    Fatal(Option<Head>, ApiError),
}

/// Decides, from the head alone, whether a request is refused before its
/// body is read (auth, declared body size).
pub type EarlyCheck<'a> = &'a dyn Fn(&Head) -> Option<ApiError>;

/// A client connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket (blocking; reads use `MSG_DONTWAIT`, writes a timeout).
    pub stream: TcpStream,
    buf: Vec<u8>,
    reading: Reading,
    /// First byte of the current request (the connect time before any).
    started: Instant,
    /// Last time bytes arrived.
    progress: Instant,
    /// Requests answered so far.
    served: u64,
    _slot: Slot,
}

impl Conn {
    /// A fresh connection holding `slot`.
    pub fn new(stream: TcpStream, slot: Slot) -> Self {
        let now = Instant::now();
        Conn { stream, buf: Vec::new(), reading: Reading::Head, started: now, progress: now, served: 0, _slot: slot }
    }

    /// True when bytes of a next request are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Counts an answered request; the next one starts from here.
    pub fn finished_request(&mut self) {
        self.served += 1;
        self.reading = Reading::Head;
        let now = Instant::now();
        (self.started, self.progress) = (now, now);
    }

    /// When this parked connection gives up, and whether it gets a 408
    /// first (a request was under way) or just closes (idle).
    pub fn deadline(&self, l: &Limits) -> (Instant, bool) {
        match &self.reading {
            // Idle between requests: close quietly.
            Reading::Head if self.buf.is_empty() && self.served > 0 => (self.progress + l.idle, false),
            // Nothing sent since the connect: the head timeout, quietly.
            Reading::Head if self.buf.is_empty() => (self.started + l.header, false),
            Reading::Head => (self.started + l.header, true),
            _ => (self.progress + l.body, true),
        }
    }

    /// How many bytes the next read may take: a head is never buffered past
    /// its limit, and a body of known length is read exactly, no further.
    fn read_allowance(&self) -> usize {
        let cap = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).min(READ_CHUNK);
        match &self.reading {
            Reading::Head => (MAX_HEAD_BYTES + 1).saturating_sub(self.buf.len()).clamp(1, READ_CHUNK),
            Reading::Length { left, .. } | Reading::Discard { left, .. } => cap(*left).max(1),
            Reading::Chunked { .. } => READ_CHUNK,
        }
    }

    /// Reads what the socket holds now, without blocking. `Ok(0)`: the
    /// client closed; `WouldBlock`: nothing there yet.
    pub fn fill(&mut self) -> io::Result<usize> {
        let mut scratch = [0u8; READ_CHUNK];
        let want = self.read_allowance();
        let n = recv(self.stream.as_raw_fd(), &mut scratch[..want], MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)?;
        Ok(self.receive(&scratch[..n]))
    }

    /// Takes bytes as [`Conn::fill`] does after a read: at most what the
    /// next read may take; returns how many it took. [`Conn::fill`] is the
    /// way in; this is public for the fuzz targets, which have no client.
    #[doc(hidden)]
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.read_allowance());
        if n > 0 {
            let now = Instant::now();
            if matches!(self.reading, Reading::Head) && self.buf.is_empty() && self.served > 0 {
                self.started = now;
            }
            self.progress = now;
            self.buf.extend_from_slice(&bytes[..n]);
        }
        n
    }

    /// Moves the request along with the bytes buffered so far.
    pub fn advance(&mut self, max_body: usize, early: EarlyCheck<'_>) -> Step {
        loop {
            match std::mem::replace(&mut self.reading, Reading::Head) {
                Reading::Head => {
                    if self.buf.is_empty() {
                        return Step::NeedMore;
                    }
                    let (head, len) = match parse_head(&self.buf) {
                        Ok(Some(h)) => h,
                        Ok(None) => return Step::NeedMore,
                        Err(e) => return Step::Fatal(None, ApiError::from_http(e, max_body)),
                    };
                    self.buf.drain(..len);
                    if let Some(err) = early(&head) {
                        return self.refuse(head, err, max_body);
                    }
                    let wait_continue = head.expect_continue && self.buf.is_empty();
                    match head.body {
                        BodyKind::Empty => return Step::Request(head, Vec::new()),
                        BodyKind::Length(n) => {
                            // Grown as bytes arrive: the header alone never
                            // makes us allocate.
                            let data = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(READ_CHUNK));
                            self.reading = Reading::Length { head, left: n, data };
                        }
                        BodyKind::Chunked => self.reading = Reading::Chunked { head, body: Chunked::new(max_body) },
                    }
                    if wait_continue {
                        return Step::SendContinue;
                    }
                }
                Reading::Length { head, mut left, mut data } => {
                    let take = self.buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    data.extend_from_slice(&self.buf[..take]);
                    self.buf.drain(..take);
                    left -= take as u64;
                    if left == 0 {
                        return Step::Request(head, data);
                    }
                    self.reading = Reading::Length { head, left, data };
                    return Step::NeedMore;
                }
                Reading::Chunked { head, mut body } => match body.feed(&self.buf) {
                    Ok(n) => {
                        self.buf.drain(..n);
                        if body.done() {
                            return Step::Request(head, body.into_body());
                        }
                        self.reading = Reading::Chunked { head, body };
                        return Step::NeedMore;
                    }
                    Err(e) => return Step::Fatal(Some(head), ApiError::from_http(e, max_body)),
                },
                Reading::Discard { head, err, mut left } => {
                    let take = self.buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.buf.drain(..take);
                    left -= take as u64;
                    if left == 0 {
                        return Step::Refused(head, err);
                    }
                    self.reading = Reading::Discard { head, err, left };
                    return Step::NeedMore;
                }
            }
        }
    }

    /// A request refused on its head. Its body, when the client sends it
    /// anyway and it is of bounded length, is read and dropped (never
    /// stored) so the connection lives on; a client waiting for `100
    /// Continue` never sends it, and a chunked or huge one is not worth
    /// reading: those get the answer and a close.
    fn refuse(&mut self, head: Head, err: ApiError, max_body: usize) -> Step {
        match head.body {
            BodyKind::Empty => Step::Refused(head, err),
            BodyKind::Length(n) if !head.expect_continue && n <= 2 * max_body as u64 => {
                self.reading = Reading::Discard { head, err, left: n };
                self.advance(max_body, &|_| None)
            }
            _ => Step::Fatal(Some(head), err),
        }
    }

    /// The error for a request that timed out while parked.
    pub fn timeout_error() -> ApiError {
        ApiError::from_http(HttpError::Timeout, 0)
    }
}

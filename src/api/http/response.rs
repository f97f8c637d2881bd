//! Replies on the wire: complete responses with Content-Length, and exec
//! streams as chunked NDJSON with one flushed chunk per event line.
//!
//! Every write has a deadline, so a client that stops reading costs a
//! worker at most the write timeout (plus one more per MiB of the reply,
//! so a slow but honest reader of a large reply is not cut off).

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{send, MsgFlags};

use crate::api::error::ApiError;
use crate::obs::Logger;
use crate::sandbox::exec::EventStream;
use crate::sandbox::StreamItem;

/// A complete reply, before framing.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, when there is a body.
    pub content_type: Option<&'static str>,
    /// Other headers.
    pub extra: Vec<(&'static str, &'static str)>,
    /// The body (not sent for HEAD).
    pub body: Vec<u8>,
}

impl Response {
    /// 200 with `body` of type `content_type`.
    pub fn ok(content_type: &'static str, body: Vec<u8>) -> Self {
        Response { status: 200, content_type: Some(content_type), extra: Vec::new(), body }
    }

    /// The JSON error reply of `e`, with the headers its status calls for.
    pub fn error(e: &ApiError) -> Self {
        let mut extra = Vec::new();
        match e {
            ApiError::MethodNotAllowed { allow, .. } => extra.push(("Allow", *allow)),
            ApiError::MissingAuth | ApiError::InvalidKey => extra.push(("WWW-Authenticate", "Bearer")),
            _ => {}
        }
        Response { status: e.status(), content_type: Some("application/json"), extra, body: e.body().into_bytes() }
    }

    /// Status line, headers and (unless `head_only`) the body.
    pub fn encode(&self, head_only: bool, close: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if let Some(ct) = self.content_type {
            out.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        for (k, v) in &self.extra {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        // A 204 carries no body and, per RFC 9110, no Content-Length.
        if self.status != 204 {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        if !head_only && self.status != 204 {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The reason phrase of the statuses we send.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes all of `bytes` within `timeout` plus `timeout` per MiB. Each
/// blocking send waits at most what is left of that budget.
pub fn write_within(stream: &TcpStream, bytes: &[u8], timeout: Duration) -> io::Result<()> {
    let budget = timeout.saturating_mul(1 + (bytes.len() >> 20) as u32);
    let deadline = Instant::now() + budget;
    let mut rest = bytes;
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match (&*stream).write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // SO_SNDTIMEO expiring shows up as WouldBlock.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends what the socket takes right now and never blocks: for answers
/// from the accept thread (503 at the connection cap, 408), which must not
/// wait on any one client.
pub fn send_now(stream: &TcpStream, bytes: &[u8]) {
    let _ = send(stream.as_raw_fd(), bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
}

/// One NDJSON line (`line` plus `\n`), as one chunk when `chunked`.
pub fn frame_line(chunked: bool, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 16);
    if chunked {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{:x}\r\n", line.len() + 1);
    }
    out.extend_from_slice(line);
    out.push(b'\n');
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Writes an event stream (an exec's or a terminal session's) as a chunked
/// NDJSON response (close-delimited for HTTP/1.0), one chunk per line, each
/// sent at once. If the client goes away or stops reading for the write
/// timeout, the stream is abandoned ([`EventStream::abandon`]: an exec is
/// still drained to its end without writing, so the sandbox's queue and
/// replay stay right). Returns whether the connection is still usable.
pub fn write_stream(
    stream: &TcpStream,
    mut events: impl EventStream,
    chunked: bool,
    close: bool,
    timeout: Duration,
    log: &Logger,
) -> bool {
    let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\n");
    head.push_str(if chunked { "Transfer-Encoding: chunked\r\n" } else { "" });
    head.push_str(if close { "Connection: close\r\n\r\n" } else { "\r\n" });
    if write_within(stream, head.as_bytes(), timeout).is_err() {
        events.abandon(log);
        return false;
    }
    while let Some(item) = events.next_item() {
        let line: &[u8] = match &item {
            StreamItem::Event(l) => l,
            StreamItem::KeepAlive => b"",
        };
        if write_within(stream, &frame_line(chunked, line), timeout).is_err() {
            events.abandon(log);
            return false;
        }
    }
    !chunked || write_within(stream, b"0\r\n\r\n", timeout).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_framing() {
        let mut v = frame_line(true, b"{}");
        v.extend(frame_line(true, b""));
        assert_eq!(v, b"3\r\n{}\n\r\n1\r\n\n\r\n");
        assert_eq!(frame_line(false, b"{}"), b"{}\n");
    }

    #[test]
    fn encoding() {
        let r = Response::ok("text/plain; charset=utf-8", b"ok".to_vec());
        assert_eq!(r.encode(false, false), b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nok");
        assert!(r.encode(true, true).ends_with(b"Content-Length: 2\r\nConnection: close\r\n\r\n"));
        let r = Response { status: 204, content_type: None, extra: Vec::new(), body: Vec::new() };
        assert_eq!(r.encode(false, false), b"HTTP/1.1 204 No Content\r\n\r\n");
        let e = Response::error(&ApiError::MissingAuth);
        assert!(String::from_utf8(e.encode(false, false)).unwrap().contains("WWW-Authenticate: Bearer\r\n"));
    }
}

//! The accept thread: it accepts connections (up to the cap), and holds
//! every connection that is waiting for bytes in one `poll` set, with its
//! deadline. A connection with bytes to read goes to the worker queue; one
//! past its deadline gets a 408 (a request was under way) or is closed
//! (idle). No client can block this thread: it never blocks on a socket.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use serde_json::json;

use super::conn::{Conn, Slot};
use super::response::{send_now, Response};
use super::worker::{Back, Ctx};
use crate::api::error::ApiError;

/// Longest poll, so a shutdown is seen even without a wake-up.
const MAX_WAIT_MS: u16 = 1000;
/// Most connections accepted per poll round (the parked ones get a turn).
const ACCEPTS_PER_ROUND: usize = 64;
/// Pause after an accept error (EMFILE, ENOBUFS...): the listener stays
/// readable, and retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);
/// How long, and how many bytes, a closing connection is drained.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

struct Parked {
    conn: Conn,
    deadline: Instant,
    /// Expiry answers 408 (a request was under way).
    timeout_reply: bool,
    /// `Some(bytes left)`: answered and closing, only draining.
    linger: Option<usize>,
}

/// The accept thread's state.
pub struct Acceptor {
    listener: TcpListener,
    wake: UnixStream,
    back: Receiver<Back>,
    ctx: Arc<Ctx>,
    open: Arc<AtomicUsize>,
    max_conns: usize,
    parked: Vec<Parked>,
    /// Rate limit of the warning log: last line, and lines held back since.
    last_warn: Option<Instant>,
    held_back: u64,
}

impl Acceptor {
    /// An acceptor over a non-blocking `listener`; `wake` is the read end
    /// of the workers' wake-up socket.
    pub fn new(listener: TcpListener, wake: UnixStream, back: Receiver<Back>, ctx: Arc<Ctx>, max_conns: usize) -> Self {
        let open = Arc::new(AtomicUsize::new(0));
        Acceptor { listener, wake, back, ctx, open, max_conns, parked: Vec::new(), last_warn: None, held_back: 0 }
    }

    /// Runs until shutdown. Errors are logged and the loop goes on: while
    /// the process is up, it accepts.
    pub fn run(mut self) {
        while !self.ctx.queue.stopping.load(Ordering::Acquire) {
            self.round();
        }
    }

    fn round(&mut self) {
        while let Ok(b) = self.back.try_recv() {
            self.park(b);
        }
        let now = Instant::now();
        let next = self.parked.iter().map(|p| p.deadline).min();
        let wait = next.map_or(MAX_WAIT_MS as u128, |d| d.saturating_duration_since(now).as_millis() + 1);
        let timeout = PollTimeout::from(wait.min(MAX_WAIT_MS as u128) as u16);
        let ready: Vec<bool> = {
            let mut fds = Vec::with_capacity(self.parked.len() + 2);
            fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
            fds.extend(self.parked.iter().map(|p| PollFd::new(p.conn.stream.as_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => return,
                Err(e) => {
                    self.warn("poll failed; retrying", &e.to_string());
                    std::thread::sleep(ACCEPT_BACKOFF);
                    return;
                }
            }
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        if ready[1] {
            let mut sink = [0u8; 256];
            while matches!((&self.wake).read(&mut sink), Ok(n) if n > 0) {}
        }
        let now = Instant::now();
        for (p, ready) in std::mem::take(&mut self.parked).into_iter().zip(&ready[2..]) {
            if *ready {
                self.on_ready(p);
            } else if now >= p.deadline {
                self.expire(p);
            } else {
                self.parked.push(p);
            }
        }
        if ready[0] {
            self.accept();
        }
    }

    fn park(&mut self, b: Back) {
        match b {
            Back::Wait(conn) => {
                let (deadline, timeout_reply) = conn.deadline(&self.ctx.limits);
                self.parked.push(Parked { conn, deadline, timeout_reply, linger: None });
            }
            Back::Linger(conn) => {
                let deadline = Instant::now() + LINGER.min(self.ctx.limits.header);
                self.parked.push(Parked { conn, deadline, timeout_reply: false, linger: Some(LINGER_BYTES) });
            }
        }
    }

    fn on_ready(&mut self, mut p: Parked) {
        let Some(left) = p.linger else {
            self.ctx.queue.push(p.conn);
            return;
        };
        let mut sink = [0u8; 16 << 10];
        match recv(p.conn.stream.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT) {
            Ok(n) if n > 0 && n < left => {
                p.linger = Some(left - n);
                self.parked.push(p);
            }
            Err(Errno::EAGAIN | Errno::EINTR) => self.parked.push(p),
            // Closed by the client, an error, or drained enough: close.
            _ => {}
        }
    }

    fn expire(&mut self, p: Parked) {
        if p.timeout_reply {
            let err = Conn::timeout_error();
            send_now(&p.conn.stream, &Response::error(&err).encode(false, true));
            self.ctx.log.info("request", &[("status", json!(err.status())), ("why", json!("timed out"))]);
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_ROUND {
            match self.listener.accept() {
                Ok((s, _)) => self.admit(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.warn("accept failed; still accepting", &e.to_string());
                    std::thread::sleep(ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, s: TcpStream) {
        // Accepted sockets are blocking (writes rely on a send timeout);
        // each line of a stream goes out at once, not held back by Nagle.
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        match Slot::take(&self.open, self.max_conns) {
            Some(slot) => {
                let conn = Conn::new(s, slot);
                let (deadline, timeout_reply) = conn.deadline(&self.ctx.limits);
                self.parked.push(Parked { conn, deadline, timeout_reply, linger: None });
            }
            None => {
                let err = ApiError::Unavailable(format!(
                    "too many open connections (PODFLARE_MAX_CONNECTIONS={}); retry shortly",
                    self.max_conns
                ));
                send_now(&s, &Response::error(&err).encode(false, true));
                self.warn("connection cap reached; answering 503", &self.max_conns.to_string());
            }
        }
    }

    /// A warning, at most one line per second (an attacker must not be
    /// able to flood the log).
    fn warn(&mut self, msg: &str, cause: &str) {
        if self.last_warn.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            self.held_back += 1;
            return;
        }
        self.ctx.log.warn(msg, &[("cause", json!(cause)), ("similar_held_back", json!(self.held_back))]);
        (self.last_warn, self.held_back) = (Some(Instant::now()), 0);
    }
}

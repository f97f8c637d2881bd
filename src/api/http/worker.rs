//! The worker pool: a fixed number of threads take ready connections off
//! one queue, answer at most one request each turn, and hand the connection
//! back (to the queue's tail if more is buffered, so pipelining clients
//! take turns with everyone else; else to the accept thread to wait).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::conn::{Conn, Limits, Step};
use super::request::{BodyKind, Head};
use super::response::{write_stream, write_within, Response};
use crate::api::auth::Gate;
use crate::api::error::ApiError;
use crate::api::router;
use crate::obs::Logger;
use crate::sandbox::{Controller, Reply};

/// Most reads one turn makes before the connection goes to the back of the
/// queue (a large upload must not keep a worker from everyone else).
const READS_PER_TURN: usize = 64;

/// The queue of connections with something to read. Each open connection
/// is in it at most once, so its length is bounded by the connection cap.
#[derive(Default)]
pub struct Queue {
    ready: Mutex<VecDeque<Conn>>,
    wake: Condvar,
    /// Set once by shutdown.
    pub stopping: AtomicBool,
}

impl Queue {
    /// Adds a connection at the tail and wakes one idle worker.
    pub fn push(&self, c: Conn) {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).push_back(c);
        self.wake.notify_one();
    }

    /// The next connection; `None` once stopping. The wait re-checks the
    /// queue under the lock, so a push can never be missed.
    fn pop(&self) -> Option<Conn> {
        let mut q = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            if let Some(c) = q.pop_front() {
                return Some(c);
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wakes every worker (shutdown).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let _g = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }
}

/// A connection going back to the accept thread.
pub enum Back {
    /// Wait for bytes (or its deadline).
    Wait(Conn),
    /// Answered and shut for writing: read and drop what the client still
    /// sends for a moment, so our answer is not lost to a TCP reset.
    Linger(Conn),
}

/// What every worker shares.
pub struct Ctx {
    /// The auth gate.
    pub gate: Gate,
    /// Executes actions.
    pub controller: Arc<Controller>,
    /// Request log.
    pub log: Logger,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Hands connections back to the accept thread.
    pub back: Sender<Back>,
    /// Wakes the accept thread's poll after a hand-back.
    pub waker: UnixStream,
    /// Ready connections.
    pub queue: Queue,
}

impl Ctx {
    fn hand_back(&self, b: Back) {
        // The channel first, then the wake-up: the accept thread drains
        // the channel after every wake, so nothing is left unseen.
        let sent = self.back.send(b).is_ok();
        if sent {
            // Non-blocking: a full socket already means a pending wake-up.
            let _ = (&self.waker).write(&[1]);
        }
    }

    /// The refusals decided on the head: the gate first (an unauthenticated
    /// caller learns nothing else), then the declared body size.
    fn early(&self, head: &Head) -> Option<ApiError> {
        if !router::is_public(&head.method, &head.target) {
            if let Err(e) = self.gate.check(head.header("Authorization")) {
                return Some(e);
            }
        }
        match head.body {
            BodyKind::Length(n) if n > self.limits.max_body as u64 => {
                Some(ApiError::PayloadTooLarge { limit_mib: self.limits.max_body >> 20 })
            }
            _ => None,
        }
    }
}

/// One worker thread's life.
pub fn run(ctx: &Ctx) {
    while let Some(conn) = ctx.queue.pop() {
        // A bug in one handler must not shrink the pool; the connection it
        // held is dropped (closed).
        match std::panic::catch_unwind(AssertUnwindSafe(|| turn(ctx, conn))) {
            Ok(Some(Next::Queue(c))) => ctx.queue.push(c),
            Ok(Some(Next::Back(b))) => ctx.hand_back(b),
            Ok(None) => {}
            Err(_) => ctx.log.error("request handler panicked (bug); the worker continues", &[]),
        }
    }
}

enum Next {
    Queue(Conn),
    Back(Back),
}

/// Reads what has arrived and answers at most one request.
fn turn(ctx: &Ctx, mut conn: Conn) -> Option<Next> {
    for _ in 0..READS_PER_TURN {
        match conn.advance(ctx.limits.max_body, &|h| ctx.early(h)) {
            Step::NeedMore => match conn.fill() {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(Next::Back(Back::Wait(conn))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            },
            Step::SendContinue => {
                write_within(&conn.stream, b"HTTP/1.1 100 Continue\r\n\r\n", ctx.limits.write).ok()?;
            }
            Step::Request(head, body) => {
                let keep = serve(ctx, &conn, &head, &body);
                return after(conn, keep);
            }
            Step::Refused(head, err) => {
                let keep = answer(ctx, &conn, Some(&head), &err, head.close);
                return after(conn, keep);
            }
            Step::Fatal(head, err) => {
                answer(ctx, &conn, head.as_ref(), &err, true);
                let _ = conn.stream.shutdown(Shutdown::Write);
                return Some(Next::Back(Back::Linger(conn)));
            }
        }
    }
    Some(Next::Queue(conn))
}

/// Where a connection goes after a reply.
fn after(mut conn: Conn, keep: bool) -> Option<Next> {
    if !keep {
        let _ = conn.stream.shutdown(Shutdown::Write);
        return Some(Next::Back(Back::Linger(conn)));
    }
    conn.finished_request();
    Some(if conn.has_buffered() { Next::Queue(conn) } else { Next::Back(Back::Wait(conn)) })
}

/// Answers an error; returns whether the connection may go on.
fn answer(ctx: &Ctx, conn: &Conn, head: Option<&Head>, err: &ApiError, close: bool) -> bool {
    let started = Instant::now();
    let head_only = head.is_some_and(|h| h.method == "HEAD");
    let ok = write_within(&conn.stream, &Response::error(err).encode(head_only, close), ctx.limits.write).is_ok();
    log_request(ctx, head, err.status(), started, None);
    ok && !close
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(head: &Head) -> Option<String> {
    let id = head.header("traceparent")?.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The sandbox id in `/v1/sandboxes/{id}/...`, for the log line.
fn path_sandbox(path: &str) -> Option<String> {
    let mut it = path.split('/').skip(1);
    (it.next() == Some("v1") && it.next() == Some("sandboxes")).then(|| it.next()).flatten().map(str::to_string)
}

fn log_request(ctx: &Ctx, head: Option<&Head>, status: u16, started: Instant, sandbox: Option<String>) {
    // A request too broken to have a head has no route.
    let route = head.map_or("unmatched", |h| router::route_template(&h.target));
    ctx.controller.manager().metrics().http_request(route, status);
    let sandbox = sandbox.or_else(|| head.and_then(|h| path_sandbox(h.path())));
    ctx.log.info(
        "request",
        &[
            ("method", head.map_or(Value::Null, |h| json!(h.method))),
            ("path", head.map_or(Value::Null, |h| json!(h.path()))),
            ("status", json!(status)),
            ("ms", json!(started.elapsed().as_millis() as u64)),
            ("sandbox", sandbox.map_or(Value::Null, Value::String)),
            ("trace", head.and_then(trace_id).map_or(Value::Null, Value::String)),
        ],
    );
}

/// Router, controller, reply (the gate ran on the head); returns whether
/// the connection may carry another request.
fn serve(ctx: &Ctx, conn: &Conn, head: &Head, body: &[u8]) -> bool {
    let started = Instant::now();
    let outcome = router::parse(&head.method, &head.target, body).and_then(|a| Ok(ctx.controller.execute(a)?));
    let head_only = head.method == "HEAD";
    let w = ctx.limits.write;
    let (resp, sandbox) = match outcome {
        // HTTP/1.0 has no chunked encoding: the close ends the stream.
        Ok(Reply::Stream(exec)) => {
            let ok = write_stream(&conn.stream, exec, !head.http10, head.close, w, &ctx.log);
            log_request(ctx, Some(head), 200, started, None);
            return ok && !head.close;
        }
        Ok(Reply::Pty(session)) => {
            let ok = write_stream(&conn.stream, session, !head.http10, head.close, w, &ctx.log);
            log_request(ctx, Some(head), 200, started, None);
            return ok && !head.close;
        }
        Ok(Reply::Text(t)) => (Response::ok("text/plain; charset=utf-8", t.as_bytes().to_vec()), None),
        Ok(Reply::Json(v)) => {
            let id = v.get("id").and_then(Value::as_str).map(str::to_string);
            (Response::ok("application/json", v.to_string().into_bytes()), id)
        }
        Ok(Reply::Ndjson(b)) => (Response::ok("application/x-ndjson", b), None),
        Ok(Reply::Metrics(text)) => (Response::ok(crate::obs::metrics::CONTENT_TYPE, text.into_bytes()), None),
        Ok(Reply::NoContent) => (Response { status: 204, content_type: None, extra: Vec::new(), body: Vec::new() }, None),
        Err(e) => {
            if let ApiError::Internal(cause) = &e {
                ctx.log.error("internal error", &[("method", json!(head.method)), ("path", json!(head.path())), ("cause", json!(cause))]);
            }
            (Response::error(&e), None)
        }
    };
    let ok = write_within(&conn.stream, &resp.encode(head_only, head.close), w).is_ok();
    // A sandbox id from the path wins over one created by this request.
    let sandbox = path_sandbox(head.path()).or(sandbox);
    log_request(ctx, Some(head), resp.status, started, sandbox);
    ok && !head.close
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_from_path() {
        assert_eq!(path_sandbox("/v1/sandboxes/sbx_1/exec").as_deref(), Some("sbx_1"));
        assert_eq!(path_sandbox("/v1/capacity"), None);
    }
}

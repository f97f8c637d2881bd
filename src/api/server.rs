//! The HTTP transport: tiny_http accepts connections, a fixed pool of worker
//! threads handles requests (limits, auth gate, router, controller), frames
//! replies and writes one log line per request.
//!
//! Exec streams are written by hand on the raw connection: tiny_http's
//! `Response` with a reader goes through a chunk encoder that buffers 8 KiB,
//! which would hold back short lines. Here every event is its own chunk,
//! flushed at once, and the zero-length chunk ends the response so the
//! connection stays usable for the client's next request (keep-alive).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::{json, Value};
use tiny_http::{HTTPVersion, Header, Request, Response};

use super::auth::Gate;
use super::error::ApiError;
use crate::obs::Logger;
use super::router;
use crate::config::Config;
use crate::sandbox::{Controller, ExecStream, Reply, StreamItem};

/// Most request headers accepted.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of request headers accepted (names plus values).
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// tiny_http refused the listener.
    #[error("cannot serve on the listener: {0}")]
    Listen(String),
    /// A worker thread could not be spawned.
    #[error("cannot start worker threads")]
    Spawn(#[source] io::Error),
    /// The accept loop died (tiny_http stops accepting after an accept error).
    #[error("the server stopped accepting connections: {0}")]
    Stopped(String),
}

struct Ctx {
    gate: Gate,
    controller: Arc<Controller>,
    log: Logger,
    max_body: usize,
}

/// A running server. Dropping it leaves the workers running; call
/// [`ServerHandle::shutdown`] to stop them.
pub struct ServerHandle {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    workers: Vec<JoinHandle<Option<String>>>,
    stopping: Arc<AtomicBool>,
}

impl ServerHandle {
    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops; an error says why it stopped by itself.
    pub fn join(self) -> Result<(), ServerError> {
        let mut why = None;
        for w in self.workers {
            if let Ok(Some(e)) = w.join() {
                why = Some(e);
            }
        }
        match why {
            Some(e) if !self.stopping.load(Ordering::Acquire) => Err(ServerError::Stopped(e)),
            _ => Ok(()),
        }
    }

    /// Stops the workers after their current request and waits for them.
    pub fn shutdown(self) {
        self.stopping.store(true, Ordering::Release);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        let _ = self.join();
    }
}

/// Serves the API on `listener` with `cfg.http_workers` worker threads.
pub fn serve(
    listener: TcpListener,
    cfg: &Config,
    gate: Gate,
    controller: Arc<Controller>,
    log: Logger,
) -> Result<ServerHandle, ServerError> {
    let addr = listener.local_addr().map_err(|e| ServerError::Listen(e.to_string()))?;
    let server = Arc::new(tiny_http::Server::from_listener(listener, None).map_err(|e| ServerError::Listen(e.to_string()))?);
    let ctx = Arc::new(Ctx { gate, controller, log, max_body: cfg.max_body_bytes });
    let stopping = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::with_capacity(cfg.http_workers);
    for i in 0..cfg.http_workers {
        let (server, ctx, stopping) = (Arc::clone(&server), Arc::clone(&ctx), Arc::clone(&stopping));
        let w = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || worker(&server, &ctx, &stopping))
            .map_err(ServerError::Spawn)?;
        workers.push(w);
    }
    Ok(ServerHandle { server, addr, workers, stopping })
}

/// Returns why it stopped when that was not a shutdown.
fn worker(server: &tiny_http::Server, ctx: &Ctx, stopping: &AtomicBool) -> Option<String> {
    loop {
        let rq = match server.recv() {
            Ok(rq) => rq,
            Err(_) if stopping.load(Ordering::Acquire) => return None,
            Err(e) => {
                ctx.log.error("accepting connections failed; the server cannot continue", &[("cause", json!(e.to_string()))]);
                return Some(e.to_string());
            }
        };
        // A bug in one handler must not shrink the pool. The request is
        // moved into the closure; if it unwinds, tiny_http answers 500.
        if std::panic::catch_unwind(AssertUnwindSafe(|| handle(ctx, rq))).is_err() {
            ctx.log.error("request handler panicked (bug); the worker continues", &[]);
        }
    }
}

fn header<'a>(rq: &'a Request, name: &'static str) -> Option<&'a str> {
    rq.headers().iter().find(|h| h.field.equiv(name)).map(|h| h.value.as_str())
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(rq: &Request) -> Option<String> {
    let tp = header(rq, "traceparent")?;
    let id = tp.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The sandbox id in `/v1/sandboxes/{id}/...`, for the log line.
fn path_sandbox(path: &str) -> Option<String> {
    let mut it = path.split('/').skip(1);
    (it.next() == Some("v1") && it.next() == Some("sandboxes")).then(|| it.next()).flatten().map(str::to_string)
}

fn handle(ctx: &Ctx, mut rq: Request) {
    let started = Instant::now();
    let method = rq.method().as_str().to_string();
    let path = rq.url().split('?').next().unwrap_or("").to_string();
    let trace = trace_id(&rq);
    let mut sandbox = path_sandbox(&path);
    let outcome = process(ctx, &mut rq, &method);
    let status = match outcome {
        Ok(Reply::Stream(stream)) => {
            write_stream(rq, stream);
            200
        }
        Ok(reply) => {
            if let Reply::Json(v) = &reply {
                if let (None, Some(id)) = (&sandbox, v.get("id").and_then(Value::as_str)) {
                    sandbox = Some(id.to_string());
                }
            }
            respond(rq, reply)
        }
        Err(e) => {
            if let ApiError::Internal(cause) = &e {
                ctx.log.error("internal error", &[("method", json!(method)), ("path", json!(path)), ("cause", json!(cause))]);
            }
            respond_error(rq, &e)
        }
    };
    ctx.log.info(
        "request",
        &[
            ("method", json!(method)),
            ("path", json!(path)),
            ("status", json!(status)),
            ("ms", json!(started.elapsed().as_millis() as u64)),
            ("sandbox", sandbox.map_or(Value::Null, Value::String)),
            ("trace", trace.map_or(Value::Null, Value::String)),
        ],
    );
}

/// Limits, gate, body, router, controller: in that order, so nothing is
/// parsed before it is bounded and no sandbox is touched before auth.
fn process(ctx: &Ctx, rq: &mut Request, method: &str) -> Result<Reply, ApiError> {
    let header_bytes: usize = rq.headers().iter().map(|h| h.field.as_str().len() + h.value.len() + 4).sum();
    if rq.headers().len() > MAX_HEADERS || header_bytes > MAX_HEADER_BYTES {
        return Err(ApiError::HeadersTooLarge { max_count: MAX_HEADERS, max_bytes: MAX_HEADER_BYTES });
    }
    let url = rq.url().to_string();
    if !router::is_public(method, &url) {
        ctx.gate.check(header(rq, "Authorization"))?;
    }
    let body = read_body(rq, ctx.max_body)?;
    let action = router::parse(method, &url, &body)?;
    Ok(ctx.controller.execute(action)?)
}

fn read_body(rq: &mut Request, max: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = ApiError::PayloadTooLarge { limit_mib: max >> 20 };
    if rq.body_length().is_some_and(|n| n > max) {
        return Err(too_large);
    }
    let mut body = Vec::with_capacity(rq.body_length().unwrap_or(0));
    rq.as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
    if body.len() > max {
        return Err(too_large);
    }
    Ok(body)
}

fn content_type(v: &'static str) -> Header {
    // Both parts are ASCII constants, so this cannot fail.
    Header::from_bytes(&b"Content-Type"[..], v.as_bytes()).expect("static ASCII header")
}

/// Sends a complete reply; returns the status.
fn respond(rq: Request, reply: Reply) -> u16 {
    let (status, resp) = match reply {
        Reply::Text(t) => (200, Response::from_string(t).with_header(content_type("text/plain; charset=utf-8"))),
        Reply::Json(v) => (200, Response::from_string(v.to_string()).with_header(content_type("application/json"))),
        Reply::Ndjson(b) => (200, Response::from_data(b).with_header(content_type("application/x-ndjson"))),
        Reply::NoContent => (204, Response::from_data(Vec::new()).with_status_code(204)),
        // Streams never get here; answer something valid if they ever do.
        Reply::Stream(_) => (500, Response::from_string("").with_status_code(500)),
    };
    let _ = rq.respond(resp);
    status
}

fn respond_error(rq: Request, e: &ApiError) -> u16 {
    let status = e.status();
    let mut resp = Response::from_string(e.body()).with_status_code(status).with_header(content_type("application/json"));
    match e {
        ApiError::MethodNotAllowed { allow, .. } => {
            if let Ok(h) = Header::from_bytes("Allow", *allow) {
                resp.add_header(h);
            }
        }
        ApiError::MissingAuth | ApiError::InvalidKey => {
            if let Ok(h) = Header::from_bytes("WWW-Authenticate", "Bearer") {
                resp.add_header(h);
            }
        }
        _ => {}
    }
    let _ = rq.respond(resp);
    status
}

/// Writes the exec stream as a chunked NDJSON response, one flushed chunk
/// per line. If the client goes away, the stream is still drained to its
/// exit event so the sandbox's queue and replay stay right.
fn write_stream(rq: Request, mut stream: ExecStream) {
    let chunked = *rq.http_version() >= HTTPVersion(1, 1);
    let close = !chunked || header(&rq, "Connection").is_some_and(|v| v.to_ascii_lowercase().contains("close"));
    let mut w = rq.into_writer();
    let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\n");
    head.push_str(if chunked { "Transfer-Encoding: chunked\r\n" } else { "" });
    head.push_str(if close { "Connection: close\r\n\r\n" } else { "\r\n" });
    let mut ok = w.write_all(head.as_bytes()).and_then(|()| w.flush()).is_ok();
    while let Some(item) = stream.next_item() {
        if ok {
            let line: &[u8] = match &item {
                StreamItem::Event(l) => l,
                StreamItem::KeepAlive => b"",
            };
            ok = write_line(&mut w, chunked, line).is_ok();
        }
    }
    if ok && chunked {
        let _ = w.write_all(b"0\r\n\r\n").and_then(|()| w.flush());
    }
}

/// One NDJSON line (`line` plus `\n`), as one chunk when `chunked`.
fn write_line(w: &mut dyn Write, chunked: bool, line: &[u8]) -> io::Result<()> {
    if chunked {
        write!(w, "{:x}\r\n", line.len() + 1)?;
        w.write_all(line)?;
        w.write_all(b"\n\r\n")?;
    } else {
        w.write_all(line)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_framing() {
        let mut v = Vec::new();
        write_line(&mut v, true, b"{}").unwrap();
        write_line(&mut v, true, b"").unwrap();
        assert_eq!(v, b"3\r\n{}\n\r\n1\r\n\n\r\n");
        assert_eq!(path_sandbox("/v1/sandboxes/sbx_1/exec").as_deref(), Some("sbx_1"));
        assert_eq!(path_sandbox("/v1/capacity"), None);
    }
}

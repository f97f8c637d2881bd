//! A hostile client against the real HTTP layer (fake guests, no KVM):
//! malformed framing, oversized and short bodies, slow senders, silent and
//! idle connections, pipelining without reading, the connection cap, and
//! every route with bad ids. Throughout, a checker thread asks
//! `GET /v1/healthz` on fresh connections and it must answer 200 within
//! 1 s; after each case it is asked once more. Traffic goes to 127.0.0.1
//! only; every loop is bounded in count and time.

mod api_support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api_support::*;
use podflare_hostd::config::{AuthMode, Config};

/// Short timeouts so the whole file runs in well under a minute.
fn hostile_config() -> Config {
    Config {
        http_workers: 8,
        max_streams: 4,
        max_body_bytes: 1 << 20,
        max_connections: 700,
        http_header_timeout: Duration::from_millis(800),
        http_body_timeout: Duration::from_millis(800),
        http_write_timeout: Duration::from_millis(800),
        http_idle_timeout: Duration::from_millis(1500),
        ..test_config()
    }
}

fn hostile_server(cfg: Config) -> TestServer {
    start_with(cfg, AuthMode::Keys(vec![KEY.into()]), 1000)
}

/// What came back on a raw connection.
#[derive(Debug)]
enum Got {
    Answer { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// The server closed (or reset) without an answer.
    Closed,
    /// Nothing within the read timeout.
    Hang,
}

impl Got {
    fn status(&self) -> u16 {
        match self {
            Got::Answer { status, .. } => *status,
            Got::Closed => CLOSED,
            Got::Hang => 0,
        }
    }
}

/// Stands for "closed without an answer" in a list of expected statuses.
const CLOSED: u16 = 1;

fn raw(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    BufReader::new(s)
}

fn closed_kind(k: ErrorKind) -> bool {
    matches!(k, ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof)
}

/// Reads one response (no body for `head_only`).
fn read_one(r: &mut BufReader<TcpStream>, head_only: bool) -> Got {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => return Got::Closed,
        Ok(_) => {}
        Err(e) if closed_kind(e.kind()) => return Got::Closed,
        Err(_) => return Got::Hang,
    }
    let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            return Got::Closed;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').expect("header line");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut body = Vec::new();
    let len = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.parse::<usize>().unwrap());
    if let (Some(n), false, false) = (len, head_only, status == 100) {
        body.resize(n, 0);
        if r.read_exact(&mut body).is_err() {
            return Got::Closed;
        }
    }
    Got::Answer { status, headers, body }
}

/// True when the server closes the connection within `wait` (bytes still
/// arriving are read and dropped).
fn closes_within(r: &mut BufReader<TcpStream>, wait: Duration) -> bool {
    let end = Instant::now() + wait;
    let mut sink = [0u8; 64 << 10];
    while Instant::now() < end {
        match r.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if closed_kind(e.kind()) => return true,
            Err(_) => {}
        }
    }
    false
}

fn healthz_within(addr: SocketAddr, bound: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(bound)).unwrap();
    let mut r = BufReader::new(s);
    r.get_mut().write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: t\r\n\r\n").map_err(|e| e.to_string())?;
    match read_one(&mut r, false) {
        Got::Answer { status: 200, body, .. } if body == b"ok" && t0.elapsed() <= bound => Ok(t0.elapsed()),
        other => Err(format!("healthz after {:?}: {other:?}", t0.elapsed())),
    }
}

/// Asks healthz every 50 ms until dropped; any miss fails the test.
struct Checker {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    asked: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Checker {
    fn start(addr: SocketAddr) -> Checker {
        let (stop, failures, asked) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
        let (s, f, a) = (Arc::clone(&stop), Arc::clone(&failures), Arc::clone(&asked));
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                if let Err(e) = healthz_within(addr, Duration::from_secs(1)) {
                    f.lock().unwrap().push(e);
                }
                a.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Checker { stop, failures, asked, thread: Some(thread) }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let f = self.failures.lock().unwrap();
        assert!(f.is_empty(), "healthz missed its 1 s bound: {f:?}");
        assert!(self.asked.load(Ordering::SeqCst) > 0);
    }
}

/// What the client does after sending `send`.
#[derive(Clone)]
enum Then {
    /// Nothing more; read the answer.
    Wait,
    /// Shut our side for writing, then read.
    HalfClose,
    /// Expect `100 Continue`, then send these bytes.
    Continue(Vec<u8>),
    /// Send these bytes one by one, `ms` apart, then read.
    Trickle(Vec<u8>, u64),
    /// The request is HEAD: the answer has no body.
    Head,
    /// `send` holds this many requests; read that many answers.
    Pipelined(usize),
}

struct Case {
    name: String,
    send: Vec<u8>,
    then: Then,
    /// Acceptable statuses ([`CLOSED`]: closed without an answer).
    expect: Vec<u16>,
    /// `Some(true)`: the server must close after answering;
    /// `Some(false)`: the connection must serve another request.
    closes: Option<bool>,
}

fn case(name: impl Into<String>, send: impl Into<Vec<u8>>, expect: &[u16], closes: Option<bool>) -> Case {
    Case { name: name.into(), send: send.into(), then: Then::Wait, expect: expect.to_vec(), closes }
}

fn with(mut c: Case, then: Then) -> Case {
    c.then = then;
    c
}

/// A request with the key, a Host and (unless `extra` frames the body
/// itself) a Content-Length.
fn req(method: &str, path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let len = if extra.to_ascii_lowercase().contains("content-length") || extra.to_ascii_lowercase().contains("transfer-encoding") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let mut v = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n{len}{extra}\r\n").into_bytes();
    v.extend_from_slice(body);
    v
}

fn run_case(addr: SocketAddr, c: &Case) -> Result<(), String> {
    let t0 = Instant::now();
    let mut r = raw(addr);
    let fail = |why: String| Err(format!("{}: {why}", c.name));
    // A server may close before taking all of a large send: that is allowed.
    let _ = r.get_mut().write_all(&c.send);
    let mut answers = Vec::new();
    match &c.then {
        Then::Wait | Then::Head => answers.push(read_one(&mut r, matches!(c.then, Then::Head))),
        Then::HalfClose => {
            let _ = r.get_mut().shutdown(Shutdown::Write);
            answers.push(read_one(&mut r, false));
        }
        Then::Continue(body) => {
            let first = read_one(&mut r, false);
            if first.status() == 100 {
                let _ = r.get_mut().write_all(body);
                answers.push(read_one(&mut r, false));
            } else {
                answers.push(first);
            }
        }
        Then::Trickle(bytes, ms) => {
            for b in bytes {
                if r.get_mut().write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(*ms));
            }
            answers.push(read_one(&mut r, false));
        }
        Then::Pipelined(n) => {
            for _ in 0..*n {
                answers.push(read_one(&mut r, false));
            }
        }
    }
    for got in &answers {
        if !c.expect.contains(&got.status()) {
            return fail(format!("expected {:?}, got {got:?}", c.expect));
        }
        if let Got::Answer { status, body, headers } = got {
            if *status >= 400 && !matches!(c.then, Then::Head) {
                let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("{}: error body not JSON: {e}", c.name))?;
                if !v["error"].is_string() || v.as_object().map(|o| o.len()) != Some(1) {
                    return fail(format!("error body {v}"));
                }
            }
            let framed = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"));
            if !matches!(*status, 100 | 204) && !framed {
                return fail("response without Content-Length or chunking".into());
            }
        }
    }
    let answered = answers.iter().all(|g| matches!(g, Got::Answer { .. }));
    match c.closes {
        Some(true) if answered && !closes_within(&mut r, Duration::from_secs(3)) => return fail("connection left open".into()),
        Some(false)
            if r.get_mut().write_all(b"GET /v1/healthz HTTP/1.1\r\nHost: t\r\n\r\n").is_err()
                || read_one(&mut r, false).status() != 200 =>
        {
            return fail("connection not reusable".into())
        }
        _ => {}
    }
    if t0.elapsed() > Duration::from_secs(6) {
        return fail(format!("took {:?}", t0.elapsed()));
    }
    healthz_within(addr, Duration::from_secs(1)).map_err(|e| format!("{} then {e}", c.name))?;
    Ok(())
}

const C: Option<bool> = Some(true);
const K: Option<bool> = Some(false);

#[test]
fn hostile_table() {
    let srv = hostile_server(hostile_config());
    let sb = create(srv.addr, "{}");
    let table = table(&sb);
    assert!(table.len() >= 100, "{} cases", table.len());
    let checker = Checker::start(srv.addr);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    // Four clients at once keep the file fast; cases are independent.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(c) = table.get(i) else { break };
                if let Err(e) = run_case(srv.addr, c) {
                    failures.lock().unwrap().push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), table.len(), failures.join("\n"));
    checker.finish();
    // The sandbox used by the route cases is intact.
    assert_eq!(exec(srv.addr, &sb, "still here").events()[0]["data"], "still here");
}

/// A chunked body of `body` in pieces of `piece` bytes.
fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for c in body.chunks(piece) {
        v.extend(format!("{:x}\r\n", c.len()).into_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"0\r\n\r\n");
    v
}

/// The cases: raw bytes, what the client does next, acceptable answers.
fn table(sb: &str) -> Vec<Case> {
    let gone = "sbx_0123456789abcdef0123456789abcdef";
    let te = "Transfer-Encoding: chunked\r\n";
    let mut t = vec![
        // Not HTTP/1.x at all.
        case("http2 preface", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[505], C),
        case("http/2.0 request line", &b"GET /v1/healthz HTTP/2.0\r\n\r\n"[..], &[505], C),
        case("http/3 request line", &b"GET /v1/healthz HTTP/3\r\n\r\n"[..], &[505], C),
        case("tls client hello", &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03hello\r\n\r\n"[..], &[400, CLOSED], C),
        case("nul bytes", &[0u8; 64][..], &[400, CLOSED], C),
        case("plain words", &b"hello world\r\n\r\n"[..], &[400], C),
        case("ssh banner", &b"SSH-2.0-OpenSSH_9.6\r\n"[..], &[400], C),
        case("method only", &b"GET\r\n\r\n"[..], &[400], C),
        case("http/0.9", &b"GET /v1/healthz\r\n\r\n"[..], &[400], C),
        case("extra token on request line", &b"GET /v1/healthz HTTP/1.1 x\r\n\r\n"[..], &[400], C),
        case("space in target", &b"GET /v1/he althz HTTP/1.1\r\n\r\n"[..], &[400], C),
        case("control byte in target", &b"GET /\x01 HTTP/1.1\r\n\r\n"[..], &[400], C),
        case("header without colon", &b"GET /v1/healthz HTTP/1.1\r\nNoColon\r\n\r\n"[..], &[400], C),
        case("space in header name", &b"GET /v1/healthz HTTP/1.1\r\nBad Name: x\r\n\r\n"[..], &[400], C),
        case("folded header", &b"GET /v1/healthz HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"[..], &[400], C),
        case("nul in header value", &b"GET /v1/healthz HTTP/1.1\r\nA: b\x00c\r\n\r\n"[..], &[400], C),
        case("http/1.1 then garbage", &b"GET /v1/healthz HTTP/1.1\r\n\x7f\x7f\r\n\r\n"[..], &[400], C),
        case("version 1.2", &b"GET /v1/healthz HTTP/1.2\r\n\r\n"[..], &[400, 505], C),
        // Accepted spellings.
        case("bare LF line endings", &b"GET /v1/healthz HTTP/1.1\nHost: t\n\n"[..], &[200], K),
        case("leading empty line", &b"\r\nGET /v1/healthz HTTP/1.1\r\nHost: t\r\n\r\n"[..], &[200], K),
        case("no Host header", &b"GET /v1/healthz HTTP/1.1\r\n\r\n"[..], &[200], K),
        case("query string", &b"GET /v1/healthz?x=1&y HTTP/1.1\r\n\r\n"[..], &[200], K),
        case("http/1.0 closes", &b"GET /v1/healthz HTTP/1.0\r\n\r\n"[..], &[200], C),
        case("http/1.0 keep-alive still closes", &b"GET /v1/healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"[..], &[200], C),
        case("Connection: close honored", &b"GET /v1/healthz HTTP/1.1\r\nConnection: close\r\n\r\n"[..], &[200], C),
        case("Connection: Keep-Alive, Close", &b"GET /v1/healthz HTTP/1.1\r\nConnection: Keep-Alive, Close\r\n\r\n"[..], &[200], C),
        case("Connection: upgrade without body", &b"GET /v1/healthz HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"[..], &[200], K),
        case("h2c upgrade is ignored", &b"GET /v1/healthz HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"[..], &[200], K),
        with(case("HEAD healthz: not public, 401, no body", &b"HEAD /v1/healthz HTTP/1.1\r\n\r\n"[..], &[401], K), Then::Head),
        with(case("HEAD capacity: router's 405", req("HEAD", "/v1/capacity", "", b""), &[405], K), Then::Head),
        case("unknown method", &b"BREW /v1/healthz HTTP/1.1\r\n\r\n"[..], &[401], K),
        case("unknown method with key", req("BREW", "/v1/healthz", "", b""), &[405], K),
        case("lowercase method", &b"get /v1/healthz HTTP/1.1\r\n\r\n"[..], &[401], K),
        case("OPTIONS *", &b"OPTIONS * HTTP/1.1\r\n\r\n"[..], &[401], K),
        case("OPTIONS * with key", req("OPTIONS", "*", "", b""), &[404], K),
        case("absolute-form target", req("GET", "http://t/v1/capacity", "", b""), &[404], K),
        case("long method", req(&"X".repeat(2000), "/v1/healthz", "", b""), &[405], K),
        // Head limits.
        case("100 headers are fine", format!("GET /v1/healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(100)), &[200], K),
        case("101 headers: 431", format!("GET /v1/healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(101)), &[431], C),
        case("1000 headers: 431", format!("GET /v1/healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(1000)), &[431], C),
        case("60 KiB head is fine", format!("GET /v1/healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(60 << 10)), &[200], K),
        case("65 KiB target: 431", format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(65 << 10)), &[431, CLOSED], C),
        case("70 x 1 KiB headers: 431", format!("GET /v1/healthz HTTP/1.1\r\n{}\r\n", format!("X-A: {}\r\n", "b".repeat(1024)).repeat(70)), &[431, CLOSED], C),
        case("16 MiB header line: 431, not buffered", format!("GET /v1/healthz HTTP/1.1\r\nX-Huge: {}", "h".repeat(16 << 20)), &[431, CLOSED], C),
        case("1 MiB of newlines", "\r\n".repeat(512 << 10), &[400, 408, 431, CLOSED], C),
        // Content-Length.
        case("1 TiB Content-Length on healthz: 413 and close", &b"GET /v1/healthz HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n"[..], &[413], C),
        case("u64::MAX Content-Length", &b"GET /v1/healthz HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"[..], &[413], C),
        case("Content-Length overflowing u64", &b"GET /v1/healthz HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"[..], &[400], C),
        case("3 MiB create announced, not sent", req("POST", "/v1/sandboxes", "Content-Length: 3145728\r\n", b""), &[413], C),
        case("over the limit by 1 byte, sent: 413 keeps the connection", req("POST", "/v1/sandboxes", "", &vec![b' '; (1 << 20) + 1]), &[413], K),
        case("negative Content-Length", req("POST", "/v1/sandboxes", "Content-Length: -1\r\n", b""), &[400], C),
        case("hex Content-Length", req("POST", "/v1/sandboxes", "Content-Length: 0x10\r\n", b""), &[400], C),
        case("empty Content-Length", req("POST", "/v1/sandboxes", "Content-Length: \r\n", b""), &[400], C),
        case("Content-Length with sign", req("POST", "/v1/sandboxes", "Content-Length: +2\r\n", b"{}"), &[400], C),
        case("two different Content-Length", req("POST", "/v1/sandboxes", "Content-Length: 2\r\nContent-Length: 3\r\n", b"{} "), &[400], C),
        case("two equal Content-Length", req("POST", "/v1/sandboxes", "Content-Length: 2\r\nContent-Length: 2\r\n", b"{}"), &[200], K),
        case("Content-Length and chunked", req("POST", "/v1/sandboxes", "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"{}"), &[400], C),
        case("gzip transfer coding", req("POST", "/v1/sandboxes", "Transfer-Encoding: gzip\r\n", b""), &[400], C),
        case("chunked twice", req("POST", "/v1/sandboxes", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b""), &[400], C),
        case("chunked in HTTP/1.0", &b"POST /v1/sandboxes HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], &[400], C),
        case("short body, then silence: 408", req("POST", "/v1/sandboxes", "Content-Length: 10\r\n", b"{}"), &[408], C),
        with(case("short body, then half-close: no answer", req("POST", "/v1/sandboxes", "Content-Length: 10\r\n", b"{}"), &[CLOSED], None), Then::HalfClose),
        case("body announced, none sent: 408", req("POST", "/v1/sandboxes", "Content-Length: 2\r\n", b""), &[408], C),
        case("upgrade announcing a body, none sent: 408", req("GET", "/v1/healthz", "Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n", b""), &[408], C),
        case("empty body on create is {}", req("POST", "/v1/sandboxes", "", b""), &[200], K),
        case("GET with a body", req("GET", "/v1/capacity", "", b"ignored"), &[200], K),
        // Chunked request bodies.
        case("chunked create", req("POST", "/v1/sandboxes", te, &chunked(b"{}", 1)), &[200], K),
        case("chunked with extensions and trailers", req("POST", "/v1/sandboxes", te, b"2;ext=1\r\n{}\r\n0\r\nX-T: 1\r\n\r\n"), &[200], K),
        case("chunked upper-case hex", req("POST", "/v1/sandboxes", te, b"A\r\n{\"n\":1}  \r\n0\r\n\r\n"), &[200], K),
        case("chunked bad size", req("POST", "/v1/sandboxes", te, b"zz\r\n{}\r\n0\r\n\r\n"), &[400], C),
        case("chunked empty size line", req("POST", "/v1/sandboxes", te, b"\r\n{}\r\n0\r\n\r\n"), &[400], C),
        case("chunked size over the limit: 413", req("POST", "/v1/sandboxes", te, b"200000\r\n{}"), &[413], C),
        case("chunked 17 hex digits", req("POST", "/v1/sandboxes", te, b"10000000000000000\r\n"), &[400, 413], C),
        case("chunked data longer than size", req("POST", "/v1/sandboxes", te, b"1\r\n{}\r\n0\r\n\r\n"), &[400], C),
        case("chunked 5 KiB extension", req("POST", "/v1/sandboxes", te, format!("2;{}", "e".repeat(5 << 10)).as_bytes()), &[400], C),
        case("chunked never finished: 408", req("POST", "/v1/sandboxes", te, b"2\r\n{}\r\n"), &[408], C),
        case("chunked missing final CRLF: 408", req("POST", "/v1/sandboxes", te, b"2\r\n{}\r\n0\r\n"), &[408], C),
        case("chunked over the limit in small chunks: 413", req("POST", "/v1/sandboxes", te, &chunked(&vec![b' '; (1 << 20) + 10], 60 << 10)), &[413, CLOSED], C),
        case("chunked 20 KiB trailers", req("POST", "/v1/sandboxes", te, format!("0\r\n{}\r\n", "X-T: aaaaaaaaaa\r\n".repeat(1300)).as_bytes()), &[431, CLOSED], C),
        // Expect: 100-continue.
        with(case("100-continue then body", req("POST", "/v1/sandboxes", "Expect: 100-continue\r\nContent-Length: 2\r\n", b""), &[200], K), Then::Continue(b"{}".to_vec())),
        with(case("100-continue chunked", req("POST", "/v1/sandboxes", "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n", b""), &[200], K), Then::Continue(chunked(b"{}", 1))),
        with(case("100-continue refused by auth: 401 without 100", "POST /v1/sandboxes HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", &[401], C), Then::Continue(b"{}".to_vec())),
        with(case("100-continue over the limit: 413 without 100", req("POST", "/v1/sandboxes", "Expect: 100-continue\r\nContent-Length: 5000000\r\n", b""), &[413], C), Then::Continue(b"{}".to_vec())),
        with(case("100-continue, body never sent: 408", req("POST", "/v1/sandboxes", "Expect: 100-continue\r\nContent-Length: 2\r\n", b""), &[100, 408], C), Then::Pipelined(2)),
        // Slow senders within and past the timeouts.
        with(case("head trickled within the timeout", Vec::new(), &[200], K), Then::Trickle(b"GET /v1/healthz HTTP/1.1\r\n\r\n".to_vec(), 10)),
        with(case("head trickled past the timeout: 408", Vec::new(), &[408, CLOSED], None), Then::Trickle(b"GET /v1/healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n".to_vec(), 40)),
        with(case("body trickled, each byte in time", req("POST", "/v1/sandboxes", "Content-Length: 12\r\n", b""), &[200], K), Then::Trickle(b"{\"xxxxxx\":1}".to_vec(), 100)),
        case("partial head then silence: 408", &b"GET /v1/healthz HTTP/1.1\r\nHost:"[..], &[408], C),
        case("partial request line then silence: 408", &b"GE"[..], &[408], C),
        case("connect and send nothing: closed", &b""[..], &[CLOSED], None),
        // Pipelining.
        with(case("three pipelined healthz", b"GET /v1/healthz HTTP/1.1\r\n\r\n".repeat(3), &[200], K), Then::Pipelined(3)),
        with(case("pipelined with bodies", [req("POST", "/v1/sandboxes", "", b"{}"), req("GET", "/v1/capacity", "", b""), req("POST", "/v1/sandboxes/x/fork", "", b"{\"n\":0}")].concat(), &[200, 400], K), Then::Pipelined(3)),
        with(case("pipelined after a refused body", [req("POST", "/v1/sandboxes", "", &vec![b' '; (1 << 20) + 5]), b"GET /v1/healthz HTTP/1.1\r\n\r\n".to_vec()].concat(), &[413, 200], K), Then::Pipelined(2)),
        with(case("pipelined after 401 with a body", [b"POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(), b"GET /v1/healthz HTTP/1.1\r\n\r\n".to_vec()].concat(), &[401, 200], K), Then::Pipelined(2)),
        // Auth.
        case("no key", &b"GET /v1/capacity HTTP/1.1\r\n\r\n"[..], &[401], K),
        case("wrong scheme", &b"GET /v1/capacity HTTP/1.1\r\nAuthorization: Basic dGVzdA==\r\n\r\n"[..], &[401], K),
        case("wrong key", &b"GET /v1/capacity HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n"[..], &[401], K),
        case("non-UTF-8 key", &b"GET /v1/capacity HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n\r\n"[..], &[401], K),
        case("60 KiB key", format!("GET /v1/capacity HTTP/1.1\r\nAuthorization: Bearer {}\r\n\r\n", "k".repeat(60 << 10)), &[401], K),
    ];
    // Malformed JSON and wrong types, through the router.
    for (name, body, status) in [
        ("truncated JSON", &br#"{"code": "x""#[..], 400),
        ("JSON array", b"[]", 400),
        ("JSON null", b"null", 400),
        ("JSON string", b"\"code\"", 400),
        ("invalid UTF-8", b"{\"code\": \"\xff\"}", 400),
        ("code is a number", br#"{"code": 5}"#, 400),
        ("code is a list", br#"{"code": ["a"]}"#, 400),
        ("language is an object", br#"{"code": "x", "language": {}}"#, 400),
        ("unknown language", br#"{"code": "x", "language": "cobol"}"#, 400),
        ("trailing garbage", br#"{"code": "x"} x"#, 400),
        ("nested 100000 deep", &"[".repeat(100_000).into_bytes()[..], 400),
        ("duplicate keys", br#"{"code": "a", "code": 1}"#, 400),
    ] {
        t.push(case(format!("exec body: {name}"), req("POST", &format!("/v1/sandboxes/{sb}/exec"), "", body), &[status], K));
    }
    for (name, body) in [
        ("timeout is a string", r#"{"timeout_seconds": "9"}"#),
        ("ram is negative", r#"{"ram_mib": -1}"#),
        ("ram is huge float", r#"{"ram_mib": 1e308}"#),
        ("egress is a string", r#"{"egress": "no"}"#),
        ("template is a number", r#"{"template": 7}"#),
        ("persistent is null-ish string", r#"{"persistent": "null"}"#),
        ("timeout past u64", r#"{"timeout_seconds": 99999999999999999999999}"#),
    ] {
        t.push(case(format!("create body: {name}"), req("POST", "/v1/sandboxes", "", body.as_bytes()), &[400], K));
    }
    // Every route with ids that do not exist or cannot exist.
    let long = "a".repeat(4000);
    for id in [gone, "nope", "..", "%2e%2e", "a%2Fb", "%00", long.as_str()] {
        for (method, path, body) in [
            ("DELETE", format!("/v1/sandboxes/{id}"), ""),
            ("GET", format!("/v1/sandboxes/{id}"), ""),
            ("POST", format!("/v1/sandboxes/{id}/exec"), r#"{"code":"x"}"#),
            ("POST", format!("/v1/sandboxes/{id}/fork"), r#"{"n":2}"#),
            ("POST", format!("/v1/sandboxes/{id}/merge_into/{sb}"), ""),
            ("GET", format!("/v1/sandboxes/{id}/replay"), ""),
            ("POST", format!("/v1/spaces/{id}/resume"), "{}"),
            ("DELETE", format!("/v1/spaces/{id}"), ""),
            ("POST", format!("/v1/sandboxes/{id}/pty"), r#"{"shellCmd":"ls"}"#),
            ("GET", format!("/v1/sandboxes/{id}/pty"), ""),
            ("POST", format!("/v1/sandboxes/{sb}/pty/{id}/input"), r#"{"data_b64":"aGk="}"#),
            ("POST", format!("/v1/sandboxes/{sb}/pty/{id}/resize"), r#"{"cols":1,"rows":1}"#),
            ("POST", format!("/v1/sandboxes/{sb}/pty/{id}/kill"), ""),
            ("GET", format!("/v1/sandboxes/{sb}/pty/{id}/attach"), ""),
            ("POST", format!("/v1/sandboxes/{sb}/pty/{id}/read"), "{}"),
        ] {
            let short = &id[..id.len().min(12)];
            t.push(case(format!("{method} {} [{short}]", path.replace(id, "{id}")), req(method, &path, "", body.as_bytes()), &[400, 404, 501], K));
        }
    }
    t
}

#[test]
fn short_or_unfinished_bodies_are_never_executed() {
    let srv = hostile_server(hostile_config());
    let checker = Checker::start(srv.addr);
    let body = br#"{"timeout_seconds": 60}"#;
    let mut conns = Vec::new();
    // Every way of not finishing a create body, all at once.
    for cut in [0, 1, body.len() / 2, body.len() - 1] {
        let mut r = raw(srv.addr);
        r.get_mut().write_all(&req("POST", "/v1/sandboxes", &format!("Content-Length: {}\r\n", body.len()), &body[..cut])).unwrap();
        conns.push((r, false));
        let mut r = raw(srv.addr);
        let mut chunks = chunked(body, 4);
        chunks.truncate(cut.max(1));
        r.get_mut().write_all(&req("POST", "/v1/sandboxes", "Transfer-Encoding: chunked\r\n", &chunks)).unwrap();
        conns.push((r, true));
    }
    for (i, (r, _)) in conns.iter_mut().enumerate() {
        if i % 3 == 0 {
            r.get_mut().shutdown(Shutdown::Write).unwrap();
        }
    }
    for (i, (r, _)) in conns.iter_mut().enumerate() {
        let got = read_one(r, false);
        let expected = if i % 3 == 0 { CLOSED } else { 408 };
        assert_eq!(got.status(), expected, "connection {i}: {got:?}");
    }
    assert_eq!(srv.factory.created.load(Ordering::SeqCst), 0, "no short body was executed");
    checker.finish();
}

#[test]
fn idle_and_silent_connections_hold_no_worker() {
    // The trickle's pauses are 150 ms plus a healthz that may take up to
    // 1 s on a loaded 2-core runner: the body timeout must outlast both, or
    // the server rightly answers 408 and the next trickled byte meets a
    // closed socket.
    let cfg = Config { http_body_timeout: Duration::from_secs(4), ..hostile_config() };
    let srv = hostile_server(cfg);
    let checker = Checker::start(srv.addr);
    // 300 connections that say nothing, and 40 that announce a body and
    // trickle it, against 8 workers.
    let idle: Vec<BufReader<TcpStream>> = (0..300).map(|_| raw(srv.addr)).collect();
    let mut slow: Vec<BufReader<TcpStream>> = (0..40)
        .map(|_| {
            let mut r = raw(srv.addr);
            r.get_mut().write_all(&req("POST", "/v1/sandboxes", "Content-Length: 4\r\n", b"")).unwrap();
            r
        })
        .collect();
    let t_start = Instant::now();
    for step in 0..4 {
        std::thread::sleep(Duration::from_millis(150));
        for r in &mut slow {
            r.get_mut().write_all(&[b"{}  "[step]]).unwrap_or_else(|e| panic!("trickle step {step} after {:?}: {e}", t_start.elapsed()));
        }
        healthz_within(srv.addr, Duration::from_secs(1)).unwrap();
    }
    for r in &mut slow {
        assert_eq!(read_one(r, false).status(), 200);
    }
    // Silent connections are closed by the head timeout.
    let t0 = Instant::now();
    for mut r in idle {
        assert!(closes_within(&mut r, Duration::from_secs(3)), "silent connection closed");
    }
    assert!(t0.elapsed() < Duration::from_secs(4));
    // A kept-alive connection is closed after the idle timeout.
    let mut r = raw(srv.addr);
    r.get_mut().write_all(b"GET /v1/healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_one(&mut r, false).status(), 200);
    let t0 = Instant::now();
    assert!(closes_within(&mut r, Duration::from_secs(4)));
    assert!(t0.elapsed() >= Duration::from_millis(1200), "idle timeout, not earlier: {:?}", t0.elapsed());
    checker.finish();
}

#[test]
fn connection_cap_answers_503() {
    let cfg = Config { max_connections: 20, ..hostile_config() };
    let srv = hostile_server(cfg);
    // Fill the cap with the silent, then one more.
    let held: Vec<BufReader<TcpStream>> = (0..20).map(|_| raw(srv.addr)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = raw(srv.addr);
    let _ = extra.get_mut().write_all(b"GET /v1/healthz HTTP/1.1\r\n\r\n");
    let got = read_one(&mut extra, false);
    assert!(matches!(got.status(), 503 | CLOSED), "{got:?}");
    if let Got::Answer { body, .. } = &got {
        assert!(String::from_utf8_lossy(body).contains("PODFLARE_MAX_CONNECTIONS"));
    }
    drop(held);
    // Places free up as connections close.
    assert!(eventually(Duration::from_secs(3), || healthz_within(srv.addr, Duration::from_secs(1)).is_ok()));
    assert!(srv.logs.lock().unwrap().iter().any(|l| l.contains("connection cap reached")));
}

#[test]
fn pipelining_client_that_never_reads() {
    let srv = hostile_server(hostile_config());
    let sb = create(srv.addr, "{}");
    // About 1 MiB of replay, so that a few unread answers fill the socket.
    assert_eq!(exec(srv.addr, &sb, &"BIG 100000\n".repeat(10)).status(), 200);
    let checker = Checker::start(srv.addr);
    let mut hog = raw(srv.addr);
    let one = req("GET", &format!("/v1/sandboxes/{sb}/replay"), "", b"");
    let t0 = Instant::now();
    // 1,500 requests in flight; the writes may stop when the server gives up.
    for _ in 0..1500 {
        if hog.get_mut().write_all(&one).is_err() {
            break;
        }
    }
    // healthz from others stays quick while the hog does not read, for 5
    // write timeouts: the server's worker may reach the hog's requests late
    // on a loaded machine, and its write must block a whole timeout before
    // it gives up (after 10 x 100 ms a loaded run had not, and the hog then
    // read every answer).
    let hold = hostile_config().http_write_timeout * 5;
    while t0.elapsed() < hold {
        healthz_within(srv.addr, Duration::from_secs(1)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    // The server abandons the hog: the bytes it got end well short of 1,500
    // answers, with a close.
    let mut got = 0usize;
    let mut sink = vec![0u8; 1 << 20];
    let closed = loop {
        match hog.read(&mut sink) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if closed_kind(e.kind()) => break true,
            Err(_) => break false,
        }
        if t0.elapsed() > Duration::from_secs(20) {
            break false;
        }
    };
    assert!(closed, "the server closed the connection of a client that does not read");
    assert!(got < 1500 * 1_000_000, "abandoned, not all answered: {got}");
    checker.finish();
}

#[test]
fn stream_client_that_stops_reading_is_drained() {
    let srv = hostile_server(hostile_config());
    let sb = create(srv.addr, "{}");
    let checker = Checker::start(srv.addr);
    let mut r = raw(srv.addr);
    // ~10 MB of output that nobody reads (more than loopback socket buffers hold).
    let code = format!("{}done", "BIG 1000000\n".repeat(10));
    let body = serde_json::json!({ "code": code, "language": "bash" }).to_string();
    r.get_mut().write_all(&req("POST", &format!("/v1/sandboxes/{sb}/exec"), "", body.as_bytes())).unwrap();
    // Its status line proves the server took this exec first; then stop reading.
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // The next exec on the sandbox queues behind it and completes once the
    // abandoned stream has been drained (its events still reach replay).
    let t0 = Instant::now();
    let next = exec(srv.addr, &sb, "after");
    assert_eq!(next.events()[0]["data"], "after");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let replay = call(srv.addr, "GET", &format!("/v1/sandboxes/{sb}/replay"), "").events();
    let done = replay.iter().position(|e| e["data"] == "done").expect("the drained stream reached replay");
    assert_eq!(replay[done + 1]["type"], "exit");
    drop(r);
    checker.finish();
}

#[test]
fn concurrent_requests_on_fresh_and_kept_alive_connections_are_all_served_promptly() {
    // An otherwise idle server: 12 clients, half on one kept-alive
    // connection each, half on a fresh connection per request, with short
    // random pauses (the pattern that once left a request unserved for
    // minutes). Every request must be answered within 1 s.
    let srv = start();
    let bound = Duration::from_secs(1);
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let addr = srv.addr;
            std::thread::spawn(move || -> Result<Duration, String> {
                let id = create(addr, "{}");
                let mut kept = (i % 2 == 0).then(|| Conn::open(addr));
                let mut worst = Duration::ZERO;
                let mut seed = 0x9e37_79b9u32.wrapping_mul(i + 1);
                for n in 0..60u32 {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    std::thread::sleep(Duration::from_millis(u64::from(seed % 15)));
                    let (method, path, body) = match n % 3 {
                        0 => ("GET", "/v1/healthz".to_string(), String::new()),
                        1 => ("GET", "/v1/capacity".to_string(), String::new()),
                        _ => ("POST", format!("/v1/sandboxes/{id}/exec"), r#"{"code":"x","language":"bash"}"#.to_string()),
                    };
                    let t = Instant::now();
                    let status = match kept.as_mut() {
                        Some(c) => c.call(method, &path, Some(KEY), body.as_bytes()).status(),
                        None => Conn::open(addr).call(method, &path, Some(KEY), body.as_bytes()).status(),
                    };
                    let took = t.elapsed();
                    if status != 200 {
                        return Err(format!("client {i} request {n}: status {status}"));
                    }
                    if took > bound {
                        return Err(format!("client {i} request {n} ({method} {path}) took {took:?}"));
                    }
                    worst = worst.max(took);
                }
                Ok(worst)
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for c in clients {
        worst = worst.max(c.join().unwrap().unwrap_or_else(|e| panic!("{e}")));
    }
    eprintln!("720 requests, slowest {worst:?}");
}

//! Shared by the `api_*` tests: an in-process fake guest factory, a server
//! on an ephemeral loopback port, and a tiny HTTP/1.1 client that can read
//! a chunked stream chunk by chunk. Nothing here opens `/dev/kvm`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use podflare_hostd::guest::stream::{bounded, StreamRx, StreamTx};
use podflare_hostd::guest::EXEC_STREAM_LIMIT;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podflare_hostd::api::{serve, Gate, ServerHandle};
use podflare_hostd::obs::Logger;
use podflare_hostd::config::{AuthMode, Config, LogFormat};
use podflare_hostd::guest::{CapacityReason, ExecChunk, Guest, GuestError, GuestFactory, GuestSpec, Language};
use podflare_hostd::sandbox::Controller;

/// The key the test servers accept.
pub const KEY: &str = "test-key-1";

/// Fake factory: serves both templates, at most `limit` live guests.
/// `mem_cap_mib` (0: none) is fake host memory: while the live guests'
/// memory (`MEM n` sets a guest's) is above it, the factory reports pressure.
pub struct FakeFactory {
    pub limit: usize,
    pub live: Arc<AtomicUsize>,
    pub created: AtomicUsize,
    pub mem_cap_mib: AtomicU64,
    mems: Mutex<Vec<std::sync::Weak<AtomicU64>>>,
}

impl FakeFactory {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(FakeFactory {
            limit,
            live: Arc::new(AtomicUsize::new(0)),
            created: AtomicUsize::new(0),
            mem_cap_mib: AtomicU64::new(0),
            mems: Mutex::new(Vec::new()),
        })
    }
}

impl GuestFactory for FakeFactory {
    fn templates(&self) -> Vec<String> {
        vec!["default".into(), "python-datasci".into()]
    }
    fn create(&self, _spec: &GuestSpec) -> Result<Box<dyn Guest>, GuestError> {
        if self.live.load(Ordering::SeqCst) >= self.limit {
            return Err(GuestError::Capacity(CapacityReason::SandboxCount, format!("fake host holds at most {} sandboxes", self.limit)));
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        self.created.fetch_add(1, Ordering::SeqCst);
        let mem = Arc::new(AtomicU64::new(1));
        self.mems.lock().unwrap().push(Arc::downgrade(&mem));
        Ok(Box::new(FakeGuest { live: Arc::clone(&self.live), alive: Arc::new(AtomicBool::new(true)), mem }))
    }
    fn capacity(&self) -> serde_json::Value {
        serde_json::json!({ "fake": true, "live": self.live.load(Ordering::SeqCst), "limit": self.limit })
    }
    fn memory_pressure(&self) -> Option<u64> {
        let cap = self.mem_cap_mib.load(Ordering::SeqCst);
        let total: u64 = self.mems.lock().unwrap().iter().filter_map(|w| w.upgrade()).map(|m| m.load(Ordering::SeqCst)).sum();
        (cap > 0 && total > cap).then(|| total - cap)
    }
}

/// Fake guest. `exec` interprets the code line by line:
/// `EXIT n`, `FAIL msg`, `SLEEP ms`, `HANG` (until destroyed), `STUCK ms`
/// (sleeps even if destroyed), `ERR text` (stderr line),
/// `HEX hex` / `ERRHEX hex` (raw bytes, no newline added), `BIG n` (one
/// stdout line of n `a`s sent in 64 KiB chunks); any other line is echoed
/// to stdout with a newline. Ends with exit 0. Code starting `BLOCKSTART`
/// blocks the exec's start until the guest is shut down. Code that is
/// `MEM n` sets the guest's memory to n MiB (and echoes the line).
pub struct FakeGuest {
    live: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    /// Its memory, MiB.
    mem: Arc<AtomicU64>,
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex in test script")).collect()
}

/// Sleeps `ms`, returning false early if the guest was destroyed.
fn nap(alive: &AtomicBool, ms: u64) -> bool {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        if !alive.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    alive.load(Ordering::SeqCst)
}

fn run_script(code: String, tx: StreamTx<ExecChunk>, alive: Arc<AtomicBool>) {
    for line in code.split('\n') {
        if !alive.load(Ordering::SeqCst) {
            return; // destroyed: the sender drops, the receiver sees a disconnect
        }
        let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
        let chunk = match cmd {
            "EXIT" => {
                let _ = tx.push(ExecChunk::Exit(arg.parse().expect("EXIT n")));
                return;
            }
            "FAIL" => {
                let _ = tx.push(ExecChunk::Failed(arg.to_string()));
                return;
            }
            "SLEEP" => {
                if !nap(&alive, arg.parse().expect("SLEEP ms")) {
                    return;
                }
                continue;
            }
            "STUCK" => {
                // Ignores destruction: a guest whose channel outlives it.
                std::thread::sleep(Duration::from_millis(arg.parse().expect("STUCK ms")));
                continue;
            }
            "HANG" => {
                while nap(&alive, 50) {}
                return;
            }
            "ERR" => ExecChunk::Stderr(format!("{arg}\n").into_bytes()),
            "HEX" => ExecChunk::Stdout(unhex(arg)),
            "ERRHEX" => ExecChunk::Stderr(unhex(arg)),
            "BIG" => {
                let n: usize = arg.parse().expect("BIG n");
                let mut left = n;
                while left > 0 {
                    let k = left.min(64 << 10);
                    let _ = tx.push(ExecChunk::Stdout(vec![b'a'; k]));
                    left -= k;
                }
                ExecChunk::Stdout(b"\n".to_vec())
            }
            _ => ExecChunk::Stdout(format!("{line}\n").into_bytes()),
        };
        let _ = tx.push(chunk);
    }
    let _ = tx.push(ExecChunk::Exit(0));
}

impl Guest for FakeGuest {
    fn exec(&self, _language: Language, code: &str) -> Result<StreamRx<ExecChunk>, GuestError> {
        if let Some(n) = code.strip_prefix("MEM ") {
            self.mem.store(n.trim().parse().expect("MEM n"), Ordering::SeqCst);
        }
        if code.starts_with("BLOCKSTART") {
            // A guest that does not read its port: the start itself blocks
            // until the guest is shut down (bounded, so a bug cannot hang).
            let end = Instant::now() + Duration::from_secs(30);
            while self.alive.load(Ordering::SeqCst) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            return Err(GuestError::Failed("the guest channel was shut down".into()));
        }
        let (tx, rx) = bounded(EXEC_STREAM_LIMIT);
        let (code, alive) = (code.to_string(), Arc::clone(&self.alive));
        std::thread::spawn(move || run_script(code, tx, alive));
        Ok(rx)
    }
    fn private_memory_bytes(&self) -> u64 {
        self.mem.load(Ordering::SeqCst) << 20
    }
    fn shutdown(&self, _why: &str) {
        self.alive.store(false, Ordering::SeqCst);
    }
}

/// A test configuration: ephemeral loopback port, small pools, fast keep-alive.
pub fn test_config() -> Config {
    Config {
        addr: "127.0.0.1:0".into(),
        http_workers: 16,
        max_streams: 8,
        keepalive: Duration::from_millis(400),
        max_body_bytes: 16 << 20,
        log_format: LogFormat::Json,
        ..Config::default()
    }
}

/// A running server over a fake factory.
pub struct TestServer {
    pub addr: SocketAddr,
    pub controller: Arc<Controller>,
    pub factory: Arc<FakeFactory>,
    pub logs: Arc<Mutex<Vec<String>>>,
    handle: Option<ServerHandle>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

/// Starts a server with `cfg`, auth by [`KEY`], `limit` fake sandboxes.
pub fn start_with(cfg: Config, auth: AuthMode, limit: usize) -> TestServer {
    let factory = FakeFactory::new(limit);
    let (log, logs) = Logger::memory(cfg.log_format);
    let controller = Arc::new(Controller::new(factory.clone(), &cfg, log.clone()));
    let listener = cfg.bind().expect("bind loopback");
    let handle = serve(listener, &cfg, Gate::new(&auth), Arc::clone(&controller), log).expect("serve");
    TestServer { addr: handle.addr(), controller, factory, logs, handle: Some(handle) }
}

/// The usual test server.
pub fn start() -> TestServer {
    start_with(test_config(), AuthMode::Keys(vec![KEY.into(), "other-key".into()]), 1000)
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn chunked(&self) -> bool {
        self.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

/// A complete response.
#[derive(Debug)]
pub struct Resp {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn status(&self) -> u16 {
        self.head.status
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// The `error` message of a JSON error body (asserting the shape).
    pub fn error(&self) -> String {
        assert_eq!(self.head.header("content-type"), Some("application/json"), "{self:?}");
        let v = self.json();
        let obj = v.as_object().expect("error body is an object");
        assert_eq!(obj.len(), 1, "only `error`: {v}");
        obj["error"].as_str().expect("error is a string").to_string()
    }
    /// NDJSON body lines, blank lines dropped.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.text().lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("ndjson line")).collect()
    }
}

/// One keep-alive connection.
pub struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        Conn { r: BufReader::new(s) }
    }

    /// Sends a request; `key` adds `Authorization: Bearer key`.
    pub fn send(&mut self, method: &str, path: &str, key: Option<&str>, extra: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n", body.len());
        if let Some(k) = key {
            req.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let s = self.r.get_mut();
        s.write_all(req.as_bytes()).expect("send head");
        s.write_all(body).expect("send body");
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("read line");
        l.trim_end_matches(['\r', '\n']).to_string()
    }

    pub fn head(&mut self) -> Head {
        let status_line = self.line();
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("header");
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        Head { status, headers }
    }

    /// Next chunk of a chunked body; `None` at the terminating chunk.
    pub fn chunk(&mut self) -> Option<Vec<u8>> {
        let size_line = self.line();
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
        if size == 0 {
            assert_eq!(self.line(), "", "no trailers");
            return None;
        }
        let mut data = vec![0; size];
        self.r.read_exact(&mut data).expect("chunk data");
        assert_eq!(self.line(), "", "CRLF after chunk");
        Some(data)
    }

    pub fn body(&mut self, head: &Head) -> Vec<u8> {
        if head.chunked() {
            let mut out = Vec::new();
            while let Some(c) = self.chunk() {
                out.extend(c);
            }
            return out;
        }
        let n: usize = head.header("content-length").map_or(0, |v| v.parse().expect("content-length"));
        let mut data = vec![0; n];
        self.r.read_exact(&mut data).expect("body");
        data
    }

    pub fn call(&mut self, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> Resp {
        self.send(method, path, key, &[], body);
        let head = self.head();
        let body = self.body(&head);
        Resp { head, body }
    }
}

/// One request on a fresh connection.
pub fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Resp {
    Conn::open(addr).call(method, path, Some(KEY), body.as_bytes())
}

/// Creates a sandbox, returning its id.
pub fn create(addr: SocketAddr, body: &str) -> String {
    let r = call(addr, "POST", "/v1/sandboxes", body);
    assert_eq!(r.status(), 200, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_string()
}

/// Runs a bash exec to completion, returning the response.
pub fn exec(addr: SocketAddr, id: &str, code: &str) -> Resp {
    let body = serde_json::json!({ "code": code, "language": "bash" }).to_string();
    call(addr, "POST", &format!("/v1/sandboxes/{id}/exec"), &body)
}

/// Polls `f` until true or `timeout`; returns whether it became true.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

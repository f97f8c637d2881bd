//! The `http` and `pty` sections: exec and terminal round trips through a
//! running hostd on loopback.

use super::*;

/// One `print(1)` through HTTP on a kept-alive connection.
struct HttpClient {
    stream: BufReader<TcpStream>,
    host: String,
}

impl HttpClient {
    fn connect(base: &str) -> std::io::Result<Self> {
        let host = base.trim_start_matches("http://").trim_end_matches('/').to_string();
        let s = TcpStream::connect(&host)?;
        s.set_nodelay(true)?;
        Ok(HttpClient { stream: BufReader::new(s), host })
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes())?;
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line)?;
        let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut chunked = false;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                self.stream.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(len, 0);
            self.stream.read_exact(&mut body)?;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn http_exec_series(base: &str, n: usize) -> Result<Vec<f64>, String> {
    let mut c = HttpClient::connect(base).map_err(|e| e.to_string())?;
    let (st, body) = c.request("POST", "/v1/sandboxes", "{}").map_err(|e| e.to_string())?;
    if st != 200 {
        return Err(format!("create: {st} {body}"));
    }
    let id = body.split('"').nth(3).unwrap_or("").to_string();
    let mut times = Vec::new();
    for i in 0..n + 3 {
        let t = Instant::now();
        let (st, body) = c
            .request("POST", &format!("/v1/sandboxes/{id}/exec"), r#"{"code":"print(1)"}"#)
            .map_err(|e| e.to_string())?;
        if st != 200 || !body.contains(r#""type":"exit","data":0"#) {
            return Err(format!("exec: {st} {body}"));
        }
        if i >= 3 {
            times.push(ms(t.elapsed()));
        }
    }
    let _ = c.request("DELETE", &format!("/v1/sandboxes/{id}"), "");
    Ok(times)
}

pub fn bench_http(b: &mut Bench, base: &str) {
    let one = "`print(1)` exec round trip over HTTP, 1 client";
    let n1 = b.pick(100, 15);
    match http_exec_series(base, n1) {
        Ok(t) => {
            b.samples(one, "latency", &t, Some(2.0));
            let (m, p) = stats(t);
            b.row(one, format!("{m:.2} ms (p95 {p:.2})"), "<= 2 ms", "loopback, kept-alive connection, warm sandbox", n1);
        }
        Err(e) => b.row(one, format!("failed: {e}"), "<= 2 ms", "", 0),
    }
    let eight = "`print(1)` over HTTP, 8 clients on 8 sandboxes";
    let n8 = b.pick(40, 5);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let base = base.to_string();
            std::thread::spawn(move || http_exec_series(&base, n8))
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = None;
    for h in handles {
        match h.join() {
            Ok(Ok(t)) => all.extend(t),
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some("client thread panicked".into()),
        }
    }
    if let Some(e) = failed {
        return b.row(eight, format!("failed: {e}"), "-", "", 0);
    }
    b.samples(eight, "latency", &all, None);
    let (m, p) = stats(all);
    b.row(eight, format!("{m:.2} ms (p95 {p:.2})"), "-", "2 host cores shared by 8 guests", 8 * n8);
}

/// One NDJSON stream response (a PTY session), read line by line.
struct NdjsonStream {
    stream: BufReader<TcpStream>,
    /// The current chunk's bytes not read yet.
    left: usize,
    line: Vec<u8>,
}

impl NdjsonStream {
    /// Sends `POST path` with `body` on a fresh connection and reads the
    /// response head; a non-200 answer is an error with its body.
    fn open(base: &str, path: &str, body: &str) -> Result<Self, String> {
        let mut c = HttpClient::connect(base).map_err(|e| e.to_string())?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            c.host,
            body.len()
        );
        c.stream.get_mut().write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        c.stream.get_ref().set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let mut status = String::new();
        c.stream.read_line(&mut status).map_err(|e| e.to_string())?;
        loop {
            let mut h = String::new();
            c.stream.read_line(&mut h).map_err(|e| e.to_string())?;
            if h.trim_end().is_empty() {
                break;
            }
        }
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(format!("{path}: {}", status.trim_end()));
        }
        Ok(NdjsonStream { stream: c.stream, left: 0, line: Vec::new() })
    }

    /// The next JSON event (keep-alive blank lines skipped); `None` at the
    /// end of the stream.
    fn next(&mut self) -> Result<Option<Value>, String> {
        loop {
            if self.left == 0 {
                let mut size = String::new();
                self.stream.read_line(&mut size).map_err(|e| e.to_string())?;
                if size.trim().is_empty() {
                    // The CRLF after the previous chunk's data.
                    size.clear();
                    self.stream.read_line(&mut size).map_err(|e| e.to_string())?;
                }
                self.left = usize::from_str_radix(size.trim(), 16).map_err(|_| format!("bad chunk size {size:?}"))?;
                if self.left == 0 {
                    return Ok(None);
                }
            }
            let mut byte = [0u8; 1];
            self.stream.read_exact(&mut byte).map_err(|e| e.to_string())?;
            self.left -= 1;
            if byte[0] != b'\n' {
                self.line.push(byte[0]);
            } else if !self.line.is_empty() {
                let v = serde_json::from_slice(&self.line).map_err(|e| e.to_string());
                self.line.clear();
                return v.map(Some);
            }
        }
    }

    /// Reads events until one of `kind`; the bytes of the `pty_data` events
    /// passed on the way are appended to `seen`.
    fn until(&mut self, kind: &str, seen: &mut Vec<u8>) -> Result<Value, String> {
        use base64::Engine as _;
        loop {
            let ev = self.next()?.ok_or_else(|| format!("stream ended before {kind}"))?;
            if ev["type"] == "pty_data" {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(ev["data_b64"].as_str().unwrap_or(""))
                    .map_err(|e| e.to_string())?;
                seen.extend_from_slice(&b);
            }
            if ev["type"] == kind {
                return Ok(ev);
            }
            if ev["type"] == "pty_error" || ev["type"] == "pty_exit" {
                return Err(format!("waiting for {kind}: {ev}"));
            }
        }
    }

    /// Reads `pty_data` until `want` has arrived in the bytes after `seen`'s
    /// current end.
    fn until_bytes(&mut self, want: &[u8], seen: &mut Vec<u8>) -> Result<(), String> {
        let from = seen.len();
        while !seen[from..].windows(want.len()).any(|w| w == want) {
            self.until("pty_data", seen)?;
        }
        Ok(())
    }
}

/// A raw-mode echo program: every byte it reads goes straight back, as an
/// editor or a REPL driven by keystrokes answers a key; `~` ends it.
const PTY_ECHO_PY: &str = "import os, tty\ntty.setraw(0)\nos.write(1, b'READY')\nwhile True:\n    b = os.read(0, 64)\n    os.write(1, b)\n    if b'~' in b: break\n";

/// PTY rows: `pty_ready` (POST .../pty until its first event) and the
/// keystroke echo round trip (POST .../input until the echoed byte's
/// `pty_data`), through a running hostd.
pub fn bench_pty(b: &mut Bench, base: &str) {
    use base64::Engine as _;
    let ready_row = "PTY session: POST .../pty -> `pty_ready`";
    let echo_row = "PTY keystroke echo: POST .../input -> its `pty_data`";
    let sessions = b.pick(5, 2);
    let keys = b.pick(50, 10);
    let run = || -> Result<(Vec<f64>, Vec<f64>), String> {
        let mut c = HttpClient::connect(base).map_err(|e| e.to_string())?;
        let (st, body) = c.request("POST", "/v1/sandboxes", "{}").map_err(|e| e.to_string())?;
        if st != 200 {
            return Err(format!("create: {st} {body}"));
        }
        let id = serde_json::from_str::<Value>(&body).map_err(|e| e.to_string())?["id"].as_str().unwrap_or("").to_string();
        let open = serde_json::to_string(&json!({ "argv": ["python3", "-c", PTY_ECHO_PY], "cols": 80, "rows": 24 })).unwrap_or_default();
        let mut ready = Vec::new();
        let mut echo = Vec::new();
        let result = (|| {
            for s in 0..sessions {
                let t = Instant::now();
                let mut stream = NdjsonStream::open(base, &format!("/v1/sandboxes/{id}/pty"), &open)?;
                let mut seen = Vec::new();
                let ev = stream.until("pty_ready", &mut seen)?;
                ready.push(ms(t.elapsed()));
                let pty = ev["session_id"].as_str().unwrap_or("").to_string();
                stream.until_bytes(b"READY", &mut seen)?;
                let input = format!("/v1/sandboxes/{id}/pty/{pty}/input");
                if s + 1 == sessions {
                    for k in 0..keys + 2 {
                        let key = [b'a' + (k % 26) as u8];
                        let body = json!({ "data_b64": base64::engine::general_purpose::STANDARD.encode(key) }).to_string();
                        let t = Instant::now();
                        let (st, resp) = c.request("POST", &input, &body).map_err(|e| e.to_string())?;
                        if !(200..300).contains(&st) {
                            return Err(format!("input: {st} {resp}"));
                        }
                        stream.until_bytes(&key, &mut seen)?;
                        if k >= 2 {
                            echo.push(ms(t.elapsed()));
                        }
                    }
                }
                let end = json!({ "data_b64": base64::engine::general_purpose::STANDARD.encode(b"~") }).to_string();
                let _ = c.request("POST", &input, &end);
                stream.until("pty_exit", &mut seen)?;
            }
            Ok(())
        })();
        let _ = c.request("DELETE", &format!("/v1/sandboxes/{id}"), "");
        result.map(|()| (ready, echo))
    };
    match run() {
        Ok((ready, echo)) => {
            b.samples(ready_row, "latency", &ready, Some(10_000.0));
            let (m, p) = stats(ready.clone());
            b.row(ready_row, format!("{m:.0} ms (p95 {p:.0})"), "<= 10 s", "a new session each: `python3` spawned in the guest (~1 s of emulated kernel here)", ready.len());
            b.samples(echo_row, "latency", &echo, None);
            let (m, p) = stats(echo.clone());
            b.row(echo_row, format!("{m:.1} ms (p95 {p:.1})"), "-", "one byte to a raw-mode Python echo and back, loopback, warm session", echo.len());
        }
        Err(e) => {
            b.row(ready_row, format!("failed: {e}"), "<= 10 s", "", 0);
            b.row(echo_row, "not measured".into(), "-", "", 0);
        }
    }
}

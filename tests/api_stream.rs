//! Exec streams over HTTP: NDJSON framing, flushing, keep-alives, failures,
//! per-sandbox ordering, replay, and keep-alive connection reuse.

mod api_support;

use std::time::{Duration, Instant};

use api_support::*;
use serde_json::Value;

fn exec_body(code: &str) -> Vec<u8> {
    serde_json::json!({ "code": code, "language": "bash" }).to_string().into_bytes()
}

/// stdout/stderr `data` of the events, as (type, data) pairs.
fn pairs(events: &[Value]) -> Vec<(String, Value)> {
    events.iter().map(|e| (e["type"].as_str().unwrap().to_string(), e["data"].clone())).collect()
}

fn out(s: &str) -> (String, Value) {
    ("stdout".into(), Value::String(s.into()))
}

fn err(s: &str) -> (String, Value) {
    ("stderr".into(), Value::String(s.into()))
}

fn exit(code: i64) -> (String, Value) {
    ("exit".into(), Value::from(code))
}

#[test]
fn framing_lines_blank_lines_and_keys() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let r = exec(srv.addr, &id, "a\n\nb");
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(r.head.header("transfer-encoding"), Some("chunked"));
    let ev = r.events();
    assert_eq!(pairs(&ev), vec![out("a"), out(""), out("b"), exit(0)]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    for (i, e) in ev.iter().enumerate() {
        let o = e.as_object().unwrap();
        assert_eq!(o.len(), 4, "exactly four keys: {e}");
        assert_eq!(e["seq"], i as u64);
        let ts = e["ts"].as_u64().unwrap();
        assert!(ts <= now && now - ts < 60_000);
    }
    // Each event line is its own chunk, and `data` never holds a newline.
    assert!(r.text().lines().all(|l| !l.is_empty()));
}

#[test]
fn crlf_partial_lines_and_per_stream_splitting() {
    let srv = start();
    let id = create(srv.addr, "{}");
    // "a\r\nb\r\r\n" then "c" with no newline at the end.
    let ev = exec(srv.addr, &id, "HEX 610d0a620d0d0a\nHEX 63").events();
    assert_eq!(pairs(&ev), vec![out("a"), out("b\r"), out("c"), exit(0)]);
    // Partial stdout and stderr lines interleaved stay separate lines.
    let ev = exec(srv.addr, &id, "HEX 61\nERRHEX 78\nHEX 620a\nERRHEX 790a\nHEX 7a\nEXIT 3").events();
    assert_eq!(pairs(&ev), vec![out("ab"), err("xy"), out("z"), exit(3)]);
    let ev = exec(srv.addr, &id, "ERR boom\nEXIT 1").events();
    assert_eq!(pairs(&ev), vec![err("boom"), exit(1)]);
}

#[test]
fn unicode_separators_are_escaped_and_bad_utf8_is_lossy() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let line = "x\u{2028}y\u{0085}z\u{2029}w\té\"\\";
    let r = exec(srv.addr, &id, line);
    let raw = r.text();
    assert!(raw.contains(r"x\u2028y\u0085z\u2029w"), "{raw}");
    assert!(!raw.contains('\u{2028}') && !raw.contains('\u{2029}') && !raw.contains('\u{85}'));
    assert_eq!(pairs(&r.events()), vec![out(line), exit(0)]);
    // Python's splitlines would see one line per event.
    assert_eq!(raw.split(['\u{2028}', '\u{2029}', '\u{85}']).count(), 1);
    let ev = exec(srv.addr, &id, "HEX ff41c30a").events();
    assert_eq!(pairs(&ev), vec![out("\u{fffd}A\u{fffd}"), exit(0)]);
}

#[test]
fn eleven_megabyte_line_is_one_event() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let n = 11 * 1024 * 1024 + 7;
    let mut c = Conn::open(srv.addr);
    c.send("POST", &format!("/v1/sandboxes/{id}/exec"), Some(KEY), &[], &exec_body(&format!("BIG {n}\nafter")));
    let h = c.head();
    let first = c.chunk().expect("event");
    assert_eq!(first.last(), Some(&b'\n'));
    assert_eq!(first.iter().filter(|&&b| b == b'\n').count(), 1, "one line in one chunk");
    let e: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(e["data"].as_str().unwrap().len(), n);
    assert!(e["data"].as_str().unwrap().bytes().all(|b| b == b'a'));
    let rest: Vec<Value> = String::from_utf8(c.body(&h)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(pairs(&rest), vec![out("after"), exit(0)]);
}

#[test]
fn lines_are_flushed_as_produced_and_silence_sends_keepalive() {
    // The test server's keep-alive interval is 400 ms.
    let srv = start();
    let id = create(srv.addr, "{}");
    let mut c = Conn::open(srv.addr);
    c.send("POST", &format!("/v1/sandboxes/{id}/exec"), Some(KEY), &[], &exec_body("first\nSLEEP 1500\nsecond"));
    let h = c.head();
    assert_eq!(h.status, 200);
    let t0 = Instant::now();
    let first = c.chunk().unwrap();
    assert!(t0.elapsed() < Duration::from_millis(700), "first line not held back");
    assert!(first.starts_with(b"{\"type\":\"stdout\",\"data\":\"first\""));
    let mut keepalives = 0;
    let second = loop {
        let c = c.chunk().unwrap();
        if c == b"\n" {
            keepalives += 1;
        } else {
            break c;
        }
    };
    assert!(keepalives >= 2, "bare newlines during 1.5 s of silence: {keepalives}");
    assert!(second.starts_with(b"{\"type\":\"stdout\",\"data\":\"second\""));
    let last = c.chunk().unwrap();
    assert!(last.starts_with(b"{\"type\":\"exit\",\"data\":0"));
    assert!(c.chunk().is_none());
    // Same connection, next request.
    assert_eq!(c.call("GET", "/v1/healthz", None, b"").text(), "ok");
}

#[test]
fn guest_failure_mid_stream() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let ev = exec(srv.addr, &id, "one\nHEX 7061727469616c\nFAIL agent crashed\nnever").events();
    let p = pairs(&ev);
    assert_eq!(p[0], out("one"));
    assert_eq!(p[1], out("partial"));
    assert_eq!(p[2].0, "stderr");
    assert!(p[2].1.as_str().unwrap().contains("agent crashed"));
    assert_eq!(*p.last().unwrap(), exit(137));
    assert_eq!(p.len(), 4);
    // The sandbox still takes execs.
    assert_eq!(pairs(&exec(srv.addr, &id, "ok").events()), vec![out("ok"), exit(0)]);
}

#[test]
fn execs_on_one_sandbox_run_in_arrival_order() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let other = create(srv.addr, "{}");
    // Open three streams in a known order: the queue place is taken before
    // the response head is sent, so waiting for each head fixes the order.
    let mut conns = Vec::new();
    for (i, code) in ["A1\nSLEEP 1500\nA2", "B1\nSLEEP 100\nB2", "C1"].iter().enumerate() {
        let mut c = Conn::open(srv.addr);
        c.send("POST", &format!("/v1/sandboxes/{id}/exec"), Some(KEY), &[], &exec_body(code));
        let h = c.head();
        assert_eq!(h.status, 200, "stream {i}");
        conns.push((c, h));
    }
    // Another sandbox is not held up by this queue.
    let t0 = Instant::now();
    assert_eq!(pairs(&exec(srv.addr, &other, "free").events()), vec![out("free"), exit(0)]);
    assert!(t0.elapsed() < Duration::from_millis(1200), "not queued behind the 1.5 s exec");
    let mut streamed = Vec::new();
    let mut spans = Vec::new();
    for (c, h) in conns.iter_mut().rev() {
        let body = String::from_utf8(c.body(h)).unwrap();
        let ev: Vec<Value> = body.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
        spans.push((ev[0]["ts"].as_u64().unwrap(), ev.last().unwrap()["ts"].as_u64().unwrap()));
        streamed.push(ev);
    }
    streamed.reverse();
    spans.reverse();
    assert_eq!(pairs(&streamed[0]), vec![out("A1"), out("A2"), exit(0)]);
    assert_eq!(pairs(&streamed[1]), vec![out("B1"), out("B2"), exit(0)]);
    assert_eq!(pairs(&streamed[2]), vec![out("C1"), exit(0)]);
    assert!(spans[0].1 <= spans[1].0 && spans[1].1 <= spans[2].0, "no overlap: {spans:?}");
    // Replay is exactly what was streamed, in order.
    let replay = call(srv.addr, "GET", &format!("/v1/sandboxes/{id}/replay"), "");
    assert_eq!(replay.head.header("content-type"), Some("application/x-ndjson"));
    let all: Vec<Value> = streamed.into_iter().flatten().collect();
    assert_eq!(replay.events(), all);
}

#[test]
fn replay_keeps_the_newest_thousand_events_verbatim() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let mut raw = String::new();
    for batch in 0..3 {
        let code: Vec<String> = (0..500).map(|i| format!("line {batch}-{i} \u{2028}")).collect();
        let r = exec(srv.addr, &id, &code.join("\n"));
        raw.push_str(&r.text());
    }
    let replay = call(srv.addr, "GET", &format!("/v1/sandboxes/{id}/replay"), "").text();
    let streamed: Vec<&str> = raw.lines().filter(|l| !l.is_empty()).collect();
    let kept: Vec<&str> = replay.lines().collect();
    assert_eq!(kept.len(), 1000);
    assert_eq!(kept[..], streamed[streamed.len() - 1000..], "byte-identical lines");
}

#[test]
fn client_that_disconnects_does_not_wedge_the_queue() {
    let srv = start();
    let id = create(srv.addr, "{}");
    {
        let mut c = Conn::open(srv.addr);
        c.send("POST", &format!("/v1/sandboxes/{id}/exec"), Some(KEY), &[], &exec_body("x\nSLEEP 300\ny"));
        c.head();
    } // dropped mid-stream
    let t0 = Instant::now();
    assert_eq!(pairs(&exec(srv.addr, &id, "next").events()), vec![out("next"), exit(0)]);
    assert!(t0.elapsed() < Duration::from_secs(3));
    let replay = call(srv.addr, "GET", &format!("/v1/sandboxes/{id}/replay"), "").events();
    assert_eq!(pairs(&replay), vec![out("x"), out("y"), exit(0), out("next"), exit(0)]);
}

#[test]
fn python_is_the_default_language() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let r = call(srv.addr, "POST", &format!("/v1/sandboxes/{id}/exec"), r#"{"code":"print"}"#);
    assert_eq!(pairs(&r.events()), vec![out("print"), exit(0)]);
}

#[test]
fn destroyed_sandbox_ends_a_stream_even_if_the_guest_channel_lingers() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let mut c = Conn::open(srv.addr);
    c.send("POST", &format!("/v1/sandboxes/{id}/exec"), Some(KEY), &[], &exec_body("early\nSTUCK 4000\nlate"));
    let h = c.head();
    assert!(c.chunk().unwrap().starts_with(b"{\"type\":\"stdout\",\"data\":\"early\""));
    let t0 = Instant::now();
    assert_eq!(call(srv.addr, "DELETE", &format!("/v1/sandboxes/{id}"), "").status(), 204);
    let rest = String::from_utf8(c.body(&h)).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "ended by the keep-alive check, not by the guest");
    let ev: Vec<Value> = rest.lines().filter(|l| !l.is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(ev[0]["data"].as_str().unwrap().contains("destroyed"));
    assert_eq!(*pairs(&ev).last().unwrap(), exit(137));
}

#[test]
fn an_endless_exec_whose_client_left_does_not_keep_a_worker() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let mut c = Conn::open(srv.addr);
    c.send("POST", &format!("/v1/sandboxes/{id}/exec"), Some(KEY), &[], &exec_body("start\nHANG"));
    assert_eq!(c.head().status, 200);
    drop(c);
    // The worker writes the request's log line when it lets go of the
    // stream; with the exec still running, that means another thread drains it.
    let logged = || {
        srv.logs.lock().unwrap().iter().any(|l| l.contains("\"request\"") && l.contains("/exec"))
    };
    assert!(eventually(Duration::from_secs(5), logged), "the worker still holds the endless exec");
    // The exec itself runs on (it holds its slot) until the sandbox goes.
    assert!(srv.controller.manager().capacity()["streams"]["active"] == 1);
    assert_eq!(call(srv.addr, "DELETE", &format!("/v1/sandboxes/{id}"), "").status(), 204);
    assert!(eventually(Duration::from_secs(5), || srv.controller.manager().capacity()["streams"]["active"] == 0));
}

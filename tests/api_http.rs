//! The HTTP layer over a fake guest factory: auth gate, start-up rule,
//! malformed requests, create/delete/capacity, limits and reaping.

mod api_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api_support::*;
use podflare_hostd::config::{AuthMode, Config};

const MISSING: &str = r#"{"error": "missing Authorization: Bearer <key>"}"#;
const INVALID: &str = r#"{"error": "invalid api key"}"#;

/// Every route of the router table, with a body that parses.
fn route_table(id: &str) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("GET", "/v1/capacity".into(), ""),
        ("POST", "/v1/sandboxes".into(), "{}"),
        ("DELETE", format!("/v1/sandboxes/{id}"), ""),
        ("POST", format!("/v1/sandboxes/{id}/exec"), r#"{"code":"hi","language":"bash"}"#),
        ("POST", format!("/v1/sandboxes/{id}/fork"), r#"{"n":1}"#),
        ("POST", format!("/v1/sandboxes/{id}/merge_into/sbx_other"), ""),
        ("GET", format!("/v1/sandboxes/{id}/replay"), ""),
        ("POST", "/v1/spaces/spc_1/resume".into(), "{}"),
        ("DELETE", "/v1/spaces/spc_1".into(), ""),
        ("POST", format!("/v1/sandboxes/{id}/pty"), r#"{"shellCmd":"ls"}"#),
        ("GET", format!("/v1/sandboxes/{id}/pty"), ""),
        ("POST", format!("/v1/sandboxes/{id}/pty/pty_1/input"), r#"{"data_b64":"aGk="}"#),
        ("POST", format!("/v1/sandboxes/{id}/pty/pty_1/resize"), r#"{"cols":80,"rows":24}"#),
        ("POST", format!("/v1/sandboxes/{id}/pty/pty_1/kill"), ""),
        ("GET", format!("/v1/sandboxes/{id}/pty/pty_1/attach"), ""),
        ("POST", format!("/v1/sandboxes/{id}/pty/pty_1/read"), "{}"),
        ("GET", "/v1/no-such-route".into(), ""),
        ("POST", "/v1/healthz".into(), ""),
    ]
}

#[test]
fn auth_gate_on_every_route() {
    let srv = start();
    let known = create(srv.addr, "{}");
    let mut c = Conn::open(srv.addr);
    // healthz is open.
    let r = c.call("GET", "/v1/healthz", None, b"");
    assert_eq!((r.status(), r.text().as_str()), (200, "ok"));
    for id in [known.as_str(), "sbx_00000000000000000000000000000000"] {
        for (method, path, body) in route_table(id) {
            let r = c.call(method, &path, None, body.as_bytes());
            assert_eq!((r.status(), r.text().as_str()), (401, MISSING), "{method} {path} without key");
            assert_eq!(r.head.header("content-type"), Some("application/json"));
            let r = c.call(method, &path, Some("wrong-key"), body.as_bytes());
            assert_eq!((r.status(), r.text().as_str()), (401, INVALID), "{method} {path} wrong key");
            // Not "Bearer": treated as missing.
            c.send(method, &path, None, &[("Authorization", &format!("Basic {KEY}"))], body.as_bytes());
            let h = c.head();
            assert_eq!((h.status, String::from_utf8(c.body(&h)).unwrap().as_str()), (401, MISSING));
        }
    }
    // With the right key the gate lets every route through (whatever the
    // route then answers, it is not 401). Deletes go last.
    for (method, path, body) in route_table("sbx_00000000000000000000000000000000") {
        let r = c.call(method, &path, Some(KEY), body.as_bytes());
        assert_ne!(r.status(), 401, "{method} {path}: {}", r.text());
    }
    let r = c.call("GET", &format!("/v1/sandboxes/{known}/replay"), Some("other-key"), b"");
    assert_eq!(r.status(), 200, "second key works");
}

#[test]
fn auth_off_in_loopback_dev_mode() {
    let srv = start_with(test_config(), AuthMode::LoopbackDev, 10);
    let r = Conn::open(srv.addr).call("POST", "/v1/sandboxes", None, b"{}");
    assert_eq!(r.status(), 200, "{}", r.text());
}

/// `(method, path, body, status, substring of the error)`; `{sb}` is a live
/// sandbox id, `{gone}` an unknown one.
const MALFORMED: &[(&str, &str, &str, u16, &str)] = &[
    ("POST", "/v1/sandboxes", "{", 400, "not valid JSON"),
    ("POST", "/v1/sandboxes", "[]", 400, "JSON object"),
    ("POST", "/v1/sandboxes", "\"x\"", 400, "JSON object"),
    ("POST", "/v1/sandboxes", "\u{0}\u{1}", 400, "not valid JSON"),
    ("POST", "/v1/sandboxes", r#"{"template": 5}"#, 400, "template"),
    ("POST", "/v1/sandboxes", r#"{"template": "gpu-xl"}"#, 400, "template"),
    ("POST", "/v1/sandboxes", r#"{"timeout_seconds": -5}"#, 400, "timeout_seconds"),
    ("POST", "/v1/sandboxes", r#"{"timeout_seconds": 0}"#, 400, "timeout_seconds"),
    ("POST", "/v1/sandboxes", r#"{"timeout_seconds": "10"}"#, 400, "timeout_seconds"),
    ("POST", "/v1/sandboxes", r#"{"timeout_seconds": 1.5}"#, 400, "timeout_seconds"),
    ("POST", "/v1/sandboxes", r#"{"idle_timeout_seconds": -1}"#, 400, "idle_timeout_seconds"),
    ("POST", "/v1/sandboxes", r#"{"ram_mib": 0}"#, 400, "ram_mib"),
    ("POST", "/v1/sandboxes", r#"{"ram_mib": "big"}"#, 400, "ram_mib"),
    ("POST", "/v1/sandboxes", r#"{"rootfs_gb": -1}"#, 400, "rootfs_gb"),
    ("POST", "/v1/sandboxes", r#"{"persistent": "yes"}"#, 400, "persistent"),
    ("POST", "/v1/sandboxes", r#"{"egress": 1}"#, 400, "egress"),
    ("POST", "/v1/sandboxes/{sb}/exec", "{}", 400, "code"),
    ("POST", "/v1/sandboxes/{sb}/exec", r#"{"code": 5}"#, 400, "code"),
    ("POST", "/v1/sandboxes/{sb}/exec", r#"{"code": null}"#, 400, "code"),
    ("POST", "/v1/sandboxes/{sb}/exec", r#"{"code": "x", "language": "ruby"}"#, 400, "language"),
    ("POST", "/v1/sandboxes/{sb}/exec", r#"{"code": "x", "language": 3}"#, 400, "language"),
    ("POST", "/v1/sandboxes/{sb}/exec", r#"{"code": "x""#, 400, "not valid JSON"),
    ("POST", "/v1/sandboxes/{sb}/exec", "42", 400, "JSON object"),
    ("POST", "/v1/sandboxes/{gone}/exec", r#"{"code": "x"}"#, 404, "unknown sandbox"),
    ("DELETE", "/v1/sandboxes/{gone}", "", 404, "unknown sandbox"),
    ("GET", "/v1/sandboxes/{gone}/replay", "", 404, "unknown sandbox"),
    ("POST", "/v1/sandboxes/{sb}/fork", r#"{"n": 0}"#, 400, "n:"),
    ("POST", "/v1/sandboxes/{sb}/fork", r#"{"n": 33}"#, 400, "n:"),
    ("POST", "/v1/sandboxes/{sb}/fork", r#"{"n": "2"}"#, 400, "n:"),
    ("POST", "/v1/sandboxes/{gone}/fork", r#"{"n": 2}"#, 404, "unknown sandbox"),
    ("POST", "/v1/sandboxes/{sb}/fork", r#"{"n": 2}"#, 501, "not implemented yet"),
    ("POST", "/v1/sandboxes/{sb}/merge_into/{sb}", "", 400, "winner"),
    ("POST", "/v1/sandboxes/{sb}/merge_into/{gone}", "", 404, "unknown sandbox"),
    ("POST", "/v1/sandboxes/{gone}/merge_into/{sb}", "", 404, "unknown sandbox"),
    ("PUT", "/v1/sandboxes", "", 405, "GET, POST"),
    ("PUT", "/v1/sandboxes/{sb}", "", 405, "DELETE, GET"),
    ("GET", "/v1/sandboxes/{gone}", "", 404, "unknown sandbox"),
    ("POST", "/metrics", "", 405, "GET"),
    ("GET", "/v1/sandboxes/{sb}/exec", "", 405, "POST"),
    ("POST", "/v1/sandboxes/{sb}/replay", "", 405, "GET"),
    ("POST", "/v1/healthz", "", 405, "GET"),
    ("DELETE", "/v1/capacity", "", 405, "GET"),
    ("GET", "/v1/nope", "", 404, "no such route"),
    ("GET", "/v1/sandboxes/{sb}/exec/extra", "", 404, "no such route"),
    ("POST", "/v1/spaces/spc_x/resume", r#"{"timeout_seconds": -1}"#, 400, "timeout_seconds"),
    ("POST", "/v1/spaces/spc_x/resume", "{}", 404, "unknown space"),
    ("DELETE", "/v1/spaces/spc_x", "", 404, "unknown space"),
    ("POST", "/v1/sandboxes/{sb}/pty", r#"{"cols": 0}"#, 400, "cols"),
    ("POST", "/v1/sandboxes/{sb}/pty", r#"{"argv": "ls"}"#, 400, "argv"),
    ("POST", "/v1/sandboxes/{sb}/pty", r#"{"env": [["A"]]}"#, 400, "env"),
    ("POST", "/v1/sandboxes/{gone}/pty", r#"{"shellCmd": "ls"}"#, 404, "unknown sandbox"),
    ("POST", "/v1/sandboxes/{sb}/pty", r#"{"shellCmd": "ls"}"#, 501, "not implemented yet"),
    ("POST", "/v1/sandboxes/{sb}/pty/p1/input", r#"{"data_b64": "!!!"}"#, 400, "data_b64"),
    ("POST", "/v1/sandboxes/{sb}/pty/p1/resize", r#"{"cols": 80}"#, 400, "rows"),
    ("POST", "/v1/sandboxes/{sb}/pty/p1/read", r#"{"since_seq": -1}"#, 400, "since_seq"),
    ("DELETE", "/v1/sandboxes/{sb}/pty/p1/kill", "", 405, "POST"),
    ("GET", "/v1/sandboxes/{gone}/pty", "", 404, "unknown sandbox"),
    ("POST", "/v1/sandboxes/{sb}/pty/pty_x/input", r#"{"data_b64": "aGk="}"#, 404, "unknown pty session"),
    ("POST", "/v1/sandboxes/{sb}/pty/pty_x/kill", "", 404, "unknown pty session"),
];

#[test]
fn malformed_requests_table() {
    let cfg = Config { max_body_bytes: 1 << 20, ..test_config() };
    let srv = start_with(cfg, AuthMode::Keys(vec![KEY.into()]), 1000);
    let sb = create(srv.addr, "{}");
    let gone = "sbx_0123456789abcdef0123456789abcdef";
    let mut c = Conn::open(srv.addr);
    assert!(MALFORMED.len() >= 30);
    for (method, path, body, status, needle) in MALFORMED {
        let path = path.replace("{sb}", &sb).replace("{gone}", gone);
        let r = c.call(method, &path, Some(KEY), body.as_bytes());
        assert_eq!(r.status(), *status, "{method} {path} {body}: {}", r.text());
        let msg = r.error();
        assert!(msg.contains(needle), "{method} {path} {body}: {msg:?} should mention {needle:?}");
        if *status == 405 {
            assert!(r.head.header("allow").is_some(), "405 says what is allowed");
        }
        // Still serving on the same connection.
        let h = c.call("GET", "/v1/healthz", None, b"");
        assert_eq!(h.status(), 200);
    }
    // Too large, by Content-Length: 413, and the connection survives.
    let big = vec![b' '; (1 << 20) + 10];
    let r = c.call("POST", "/v1/sandboxes", Some(KEY), &big);
    assert_eq!(r.status(), 413);
    assert!(r.error().contains("PODFLARE_MAX_BODY_MIB"));
    assert_eq!(c.call("GET", "/v1/healthz", None, b"").status(), 200);
    // Too many headers: 431 with a JSON body.
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("X-H{i}"), "v".to_string())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    c.send("GET", "/v1/capacity", Some(KEY), &many, b"");
    let h = c.head();
    assert_eq!(h.status, 431);
    let body = c.body(&h);
    assert!(String::from_utf8_lossy(&body).contains("headers"));
    // The sandbox used above is intact.
    assert_eq!(exec(srv.addr, &sb, "still here").events()[0]["data"], "still here");
}

#[test]
fn create_delete_and_response_shape() {
    let srv = start();
    let r = call(srv.addr, "POST", "/v1/sandboxes", "{}");
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert!(id.starts_with("sbx_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(v["state"], "ready");
    assert!(v.get("region").is_none() && v.get("endpoint").is_none());
    // Unknown fields ignored, known ones accepted, big values clamped.
    let id2 = create(
        srv.addr,
        r#"{"template":"python-datasci","timeout_seconds":99999999,"ram_mib":999999,"egress":false,"persistent":true,"future_field":[1]}"#,
    );
    assert_ne!(id, id2);
    let r = call(srv.addr, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    assert_eq!((r.status(), r.body.len()), (204, 0));
    let r = call(srv.addr, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    assert_eq!(r.status(), 404);
    assert_eq!(call(srv.addr, "GET", &format!("/v1/sandboxes/{id}/replay"), "").status(), 404);
    assert_eq!(srv.factory.live.load(std::sync::atomic::Ordering::SeqCst), 1, "the deleted guest was dropped");
}

#[test]
fn region_and_endpoint_when_both_configured() {
    let cfg = Config { region: Some("eu".into()), public_url: Some("https://h.example".into()), ..test_config() };
    let srv = start_with(cfg, AuthMode::Keys(vec![KEY.into()]), 10);
    let v = call(srv.addr, "POST", "/v1/sandboxes", "{}").json();
    assert_eq!((v["region"].as_str(), v["endpoint"].as_str()), (Some("eu"), Some("https://h.example")));
    let cfg = Config { region: Some("eu".into()), ..test_config() };
    let srv = start_with(cfg, AuthMode::Keys(vec![KEY.into()]), 10);
    assert!(call(srv.addr, "POST", "/v1/sandboxes", "{}").json().get("region").is_none());
}

#[test]
fn capacity_shape_and_429s() {
    let cfg = Config { max_streams: 1, ..test_config() };
    let srv = start_with(cfg, AuthMode::Keys(vec![KEY.into()]), 2);
    let a = create(srv.addr, "{}");
    let _b = create(srv.addr, "{}");
    let r = call(srv.addr, "POST", "/v1/sandboxes", "{}");
    assert_eq!(r.status(), 429, "factory at capacity");
    assert!(r.error().contains("capacity"));
    // One stream slot: a hanging exec holds it, the next exec gets 429.
    let mut c = Conn::open(srv.addr);
    c.send("POST", &format!("/v1/sandboxes/{a}/exec"), Some(KEY), &[], br#"{"code":"HANG","language":"bash"}"#);
    assert_eq!(c.head().status, 200);
    let r = exec(srv.addr, &a, "x");
    assert_eq!(r.status(), 429);
    assert!(r.error().contains("PODFLARE_MAX_STREAMS"));
    let cap = call(srv.addr, "GET", "/v1/capacity", "").json();
    assert_eq!(cap["sandboxes"]["live"], 2);
    assert_eq!(cap["sandboxes"]["busy"], 1);
    assert_eq!(cap["streams"]["active"], 1);
    assert_eq!(cap["streams"]["max"], 1);
    assert_eq!(cap["guest_private_memory_bytes"], 2 << 20);
    assert_eq!(cap["vmm"]["fake"], true);
    assert!(cap["spaces"].as_array().unwrap().is_empty());
    assert!(cap["templates"].as_array().unwrap().len() == 2);
    // Deleting the sandbox ends the hanging stream with a failure exit.
    assert_eq!(call(srv.addr, "DELETE", &format!("/v1/sandboxes/{a}"), "").status(), 204);
    let h = Head { status: 200, headers: vec![("transfer-encoding".into(), "chunked".into())] };
    let body = String::from_utf8(c.body(&h)).unwrap();
    let last: serde_json::Value = serde_json::from_str(body.lines().rfind(|l| !l.is_empty()).unwrap()).unwrap();
    assert_eq!(last["type"], "exit");
    assert_eq!(last["data"], 137);
    assert!(body.contains("destroyed"));
    assert!(eventually(Duration::from_secs(5), || call(srv.addr, "GET", "/v1/capacity", "").json()["streams"]["active"] == 0));
}

#[test]
fn reaper_enforces_lifetime_and_idle() {
    let srv = start();
    let short = create(srv.addr, r#"{"timeout_seconds": 1}"#);
    let idle = create(srv.addr, r#"{"idle_timeout_seconds": 1, "persistent": true}"#);
    let busy = create(srv.addr, r#"{"idle_timeout_seconds": 1}"#);
    // An exec longer than the idle timeout is activity, not idleness.
    let r = exec(srv.addr, &busy, "SLEEP 1600\ndone");
    assert_eq!(r.events().last().unwrap()["data"], 0, "{}", r.text());
    let t0 = Instant::now();
    for id in [&short, &idle, &busy] {
        let gone = eventually(Duration::from_secs(5), || {
            call(srv.addr, "GET", &format!("/v1/sandboxes/{id}/replay"), "").status() == 404
        });
        assert!(gone, "{id} reaped");
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(srv.factory.live.load(std::sync::atomic::Ordering::SeqCst), 0);
}

fn hostd(envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_podflare-hostd"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        // Keep a real VMM, if there is one, away from the host's cache.
        .env("PODFLARE_CACHE", std::env::temp_dir().join("podflare-hostd-startup-test"))
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn startup_refuses_public_bind_without_keys() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let out = hostd(&[("PODFLARE_HOSTD_ADDR", addr)]).output().expect("run hostd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {err}");
        assert!(err.contains("refusing to start") && err.contains("PODFLARE_API_KEYS"), "{err}");
    }
}

#[test]
fn startup_with_auth_disabled_warns() {
    let mut child = hostd(&[("PODFLARE_HOSTD_ADDR", "0.0.0.0:0"), ("PODFLARE_AUTH_DISABLED", "1")]).spawn().expect("spawn");
    let first = first_line(&mut child, Duration::from_secs(10));
    // Past the warning it either serves (real VMM) or fails at the VMM
    // stage; it must not be the refusal.
    let _ = child.kill();
    let status = child.wait().expect("wait");
    assert!(first.contains("AUTH IS DISABLED"), "{first}");
    assert_ne!(status.code(), Some(2));
}

/// The child's first stderr line, or "" if it prints nothing within `wait`.
fn first_line(child: &mut std::process::Child, wait: Duration) -> String {
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stderr).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(wait).unwrap_or_default()
}

#[test]
fn startup_loopback_without_keys_is_not_refused() {
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let mut child = hostd(&[("PODFLARE_HOSTD_ADDR", addr)]).spawn().expect("spawn");
        let first = first_line(&mut child, Duration::from_secs(3));
        let _ = child.kill();
        let status = child.wait().expect("wait");
        assert!(!first.contains("refusing"), "{addr}: {first}");
        assert_ne!(status.code(), Some(2), "{addr}: {first}");
    }
}

#[test]
fn startup_rejects_bad_settings_by_name() {
    let out = hostd(&[("PODFLARE_MAX_BODY_MIB", "lots")]).output().expect("run hostd");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PODFLARE_MAX_BODY_MIB"));
}

#[test]
fn request_log_lines() {
    let srv = start();
    let id = create(srv.addr, "{}");
    let mut c = Conn::open(srv.addr);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    c.send("GET", &format!("/v1/sandboxes/{id}/replay?x=1"), Some(KEY), &[("traceparent", tp)], b"");
    let h = c.head();
    c.body(&h);
    c.call("GET", "/v1/capacity", Some("wrong-secret-key"), b"");
    // A request's line is written just after its response: wait for both.
    let logged = || srv.logs.lock().unwrap().clone();
    assert!(eventually(Duration::from_secs(5), || {
        let l = logged();
        l.iter().any(|l| l.contains("\"status\":401")) && l.iter().any(|l| l.contains("/replay"))
    }));
    let logs = logged();
    let line = logs
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json log line"))
        .find(|v| v["msg"] == "request" && v["path"] == format!("/v1/sandboxes/{id}/replay"))
        .expect("request line");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 200);
    assert_eq!(line["sandbox"], id.as_str());
    assert_eq!(line["trace"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(line["ms"].is_u64());
    assert!(!logs.iter().any(|l| l.contains(KEY) || l.contains("wrong-secret-key")), "keys never logged");
}

#[test]
fn sandbox_listing_and_one_sandbox() {
    let srv = start();
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let a = create(srv.addr, r#"{"timeout_seconds": 100, "idle_timeout_seconds": 50}"#);
    let b = create(srv.addr, r#"{"egress": false, "persistent": true}"#);
    let r = call(srv.addr, "GET", "/v1/sandboxes", "");
    assert_eq!((r.status(), r.head.header("content-type")), (200, Some("application/json")));
    let list = r.json();
    let ids: Vec<&str> = list["sandboxes"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [a.as_str(), b.as_str()], "oldest first");
    let one = call(srv.addr, "GET", &format!("/v1/sandboxes/{a}"), "").json();
    assert_eq!(one, list["sandboxes"][0], "the listing and the single view agree");
    assert_eq!((one["template"].as_str(), one["state"].as_str()), (Some("default"), Some("ready")));
    assert_eq!((one["persistent"].as_bool(), one["egress"].as_bool()), (Some(false), Some(true)));
    assert_eq!((list["sandboxes"][1]["persistent"].as_bool(), list["sandboxes"][1]["egress"].as_bool()), (Some(true), Some(false)));
    let created = one["created_at_ms"].as_u64().unwrap();
    assert!(created >= before.saturating_sub(1000) && created <= before + 60_000, "created_at_ms {created} vs {before}");
    assert_eq!(one["expires_at_ms"].as_u64(), Some(created + 100_000));
    assert_eq!(one["idle_expires_at_ms"].as_u64(), Some(created + 50_000), "no exec yet: idle since creation");
    assert!(one["last_exec_at_ms"].is_null());
    assert!(one["private_memory_bytes"].is_u64());
    // After an exec the idle deadline counts from it.
    let r = call(srv.addr, "POST", &format!("/v1/sandboxes/{a}/exec"), r#"{"code":"print(1)"}"#);
    assert_eq!(r.status(), 200);
    let one = call(srv.addr, "GET", &format!("/v1/sandboxes/{a}"), "").json();
    let last = one["last_exec_at_ms"].as_u64().expect("last_exec_at_ms after an exec");
    assert!(last >= created && one["idle_expires_at_ms"].as_u64().unwrap() >= last + 50_000 - 1000);
    assert_eq!(call(srv.addr, "DELETE", &format!("/v1/sandboxes/{b}"), "").status(), 204);
    assert_eq!(call(srv.addr, "GET", &format!("/v1/sandboxes/{b}"), "").status(), 404);
    assert_eq!(call(srv.addr, "GET", "/v1/sandboxes", "").json()["sandboxes"].as_array().unwrap().len(), 1);
}

#[test]
fn metrics_count_operations_and_requests_behind_the_gate() {
    let srv = start_with(test_config(), AuthMode::Keys(vec![KEY.into()]), 1);
    let get = |auth: bool| {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        let h = if auth { format!("Authorization: Bearer {KEY}\r\n") } else { String::new() };
        std::io::Write::write_all(&mut s, format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{h}Connection: close\r\n\r\n").as_bytes()).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
    };
    assert!(get(false).starts_with("HTTP/1.1 401"), "metrics need a key like the rest of the API");
    let a = create(srv.addr, "{}");
    assert_eq!(call(srv.addr, "POST", "/v1/sandboxes", "{}").status(), 429, "a host of one sandbox is full");
    assert_eq!(call(srv.addr, "DELETE", "/v1/sandboxes/sbx_nope", "").status(), 404);
    assert_eq!(call(srv.addr, "DELETE", &format!("/v1/sandboxes/{a}"), "").status(), 204);
    let text = get(true);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: application/openmetrics-text") || text.contains("Content-Type: application/openmetrics-text"), "{text}");
    for want in [
        r#"podflare_sandbox_operations_total{op="create",outcome="ok"} 1"#,
        r#"podflare_sandbox_operations_total{op="create",outcome="refused"} 1"#,
        r#"podflare_sandbox_operations_total{op="delete",outcome="rejected"} 1"#,
        r#"podflare_sandbox_operations_total{op="delete",outcome="ok"} 1"#,
        r#"podflare_admission_refusals_total{reason="sandbox_count"} 1"#,
        r#"podflare_sandboxes_destroyed_total{reason="delete"} 1"#,
        r#"podflare_http_requests_total{route="/v1/sandboxes",status="429"} 1"#,
        r#"podflare_http_requests_total{route="/v1/sandboxes/{id}",status="404"} 1"#,
        r#"podflare_http_requests_total{route="/metrics",status="401"} 1"#,
        "podflare_create_duration_seconds_count 1",
        "podflare_sandboxes_live 0",
        "# EOF",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    assert!(!text.contains("sbx_"), "no series names a sandbox");
}

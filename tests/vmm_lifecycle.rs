//! hostd as a process: SIGTERM ends open exec streams with a line saying
//! why and exit 137, tears the VMs down and exits 0 within a bound; after a
//! `kill -9` with 20 sandboxes a restart serves at once and removes what the
//! killed run left. The real binary with real VMs (restored from the cached
//! `default` snapshot). Needs `/dev/kvm`; fails where it exists and anything
//! does not work.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{create, request};
use common::process::{free_port, start_hostd, wait_exit};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn sigterm_ends_streams_tears_down_and_exits_zero() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let addr = free_port();
    let log = std::env::temp_dir().join(format!("podflare-sigterm-{}.log", std::process::id()));
    let mut hostd = start_hostd(addr, &log, &[]);
    let id = create(addr, "{}");
    let body = serde_json::json!({ "code": "import time\nprint('started', flush=True)\ntime.sleep(600)" }).to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut lines = BufReader::new(s).lines();
    for line in lines.by_ref() {
        if line.expect("stream").contains("\"started\"") {
            break;
        }
    }
    let t = Instant::now();
    kill(Pid::from_raw(hostd.id() as i32), Signal::SIGTERM).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = wait_exit(&mut hostd, Duration::from_secs(20)).expect("hostd still running 20 s after SIGTERM");
    let took = t.elapsed();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "exit status {status:?}\n{logged}");
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}");
    let events: Vec<serde_json::Value> =
        rest.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v.is_object()).collect();
    let said_why = events.iter().any(|e| e["type"] == "stderr" && e["data"].as_str().unwrap_or("").contains("shutting down"));
    assert!(said_why, "no stderr line saying why: {rest:?}");
    assert_eq!(events.last().map(|e| (e["type"].clone(), e["data"].clone())), Some(("exit".into(), 137.into())), "{rest:?}");
    assert!(logged.contains("\"shutting down\"") && logged.contains("\"stopped\""), "{logged}");
}

#[test]
fn after_kill_9_with_20_sandboxes_a_restart_serves_and_cleans_up() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let addr = free_port();
    let log = std::env::temp_dir().join(format!("podflare-kill9-{}.log", std::process::id()));
    let mut hostd = start_hostd(addr, &log, &[]);
    for _ in 0..20 {
        create(addr, "{}");
    }
    // What a run killed while writing a snapshot leaves: `<key>.tmp<pid>` of
    // a process that is gone.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let leftover = common::cache_dir().join("snapshots/default").join(format!("killed-run.tmp{dead_pid}"));
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("memory"), b"half written").unwrap();
    kill(Pid::from_raw(hostd.id() as i32), Signal::SIGKILL).unwrap();
    assert!(wait_exit(&mut hostd, Duration::from_secs(10)).is_some(), "kill -9 did not take");

    let t = Instant::now();
    let mut hostd = start_hostd(addr, &log, &[]);
    let restart = t.elapsed();
    let id = create(addr, "{}");
    let (status, out) = request(addr, "POST", &format!("/v1/sandboxes/{id}/exec"), r#"{"code":"print(6*7)"}"#);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = hostd.kill();
    let _ = hostd.wait();
    let _ = std::fs::remove_file(&log);
    assert_eq!(status, 200);
    assert!(out.contains(r#""data":"42""#), "{out}");
    assert!(!leftover.exists(), "the killed run's half-written snapshot is still there");
    assert!(logged.contains("killed run left"), "{logged}");
    assert!(restart < Duration::from_secs(60), "restart took {restart:?}");
}

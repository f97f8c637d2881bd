//! Spaces on disk, with hostd as a process and real VMs: persistent
//! sandboxes frozen at their idle timeout survive a `kill -9` and a
//! restart, and resume with their state; a half-written space is removed
//! at start, a space with a damaged state file is dropped from the listing
//! at start, and one whose memory changed on disk is refused (409) and
//! dropped, never restored. Needs `/dev/kvm`; fails where it exists and
//! anything does not work.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http::{create, request};
use common::process::{free_port, start_hostd, wait_exit};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Bytes before a framed file's JSON payload (magic, version, length, SHA-256).
const FRAME_HEADER: usize = 8 + 4 + 8 + 32;

fn spaces(addr: SocketAddr) -> Vec<Value> {
    let (status, body) = request(addr, "GET", "/v1/capacity", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).expect("json")["spaces"].as_array().expect("spaces list").clone()
}

/// The space frozen from each of `sources`, waiting (bounded) until all are listed.
fn wait_frozen(addr: SocketAddr, sources: &[&str]) -> Vec<String> {
    let t = Instant::now();
    loop {
        let listed = spaces(addr);
        let found: Vec<Option<String>> = sources
            .iter()
            .map(|s| listed.iter().find(|x| x["source_sandbox"] == *s).map(|x| x["id"].as_str().unwrap().to_string()))
            .collect();
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
        assert!(t.elapsed() < Duration::from_secs(120), "not all of {sources:?} frozen: {listed:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn exec(addr: SocketAddr, id: &str, code: &str) -> String {
    let (status, body) = request(addr, "POST", &format!("/v1/sandboxes/{id}/exec"), &serde_json::json!({ "code": code }).to_string());
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""type":"exit","data":0"#), "exec failed: {body}");
    body
}

#[test]
fn spaces_survive_kill_9_and_damaged_ones_are_never_restored() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let dir = std::env::temp_dir().join(format!("podflare-spaces-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = std::env::temp_dir().join(format!("podflare-spaces-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let env = [("PODFLARE_SPACES_DIR", dir.to_str().unwrap())];
    let addr = free_port();
    let mut hostd = start_hostd(addr, &log, &env);
    // Each one's exec right after its create: the idle clock starts there.
    let persistent = r#"{"persistent":true,"idle_timeout_seconds":3}"#;
    let with = |code: &str| {
        let id = create(addr, persistent);
        exec(addr, &id, code);
        id
    };
    let (a, b, c) = (with("x = 'kept-a'\nopen('/tmp/a', 'w').write('file-a')"), with("x = 'b'"), with("x = 'c'"));
    let ids = wait_frozen(addr, &[&a, &b, &c]);
    let (space_a, space_b, space_c) = (&ids[0], &ids[1], &ids[2]);
    kill(Pid::from_raw(hostd.id() as i32), Signal::SIGKILL).unwrap();
    assert!(wait_exit(&mut hostd, Duration::from_secs(10)).is_some(), "kill -9 did not take");

    // c's state file damaged (one byte of its payload); a half-written
    // space of a run that is gone.
    let state_c = dir.join(space_c).join("state");
    let mut bytes = std::fs::read(&state_c).unwrap();
    bytes[FRAME_HEADER + 10] ^= 0x55;
    std::fs::write(&state_c, bytes).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let half = dir.join(format!("spc_half.tmp{dead_pid}"));
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("memory"), b"half written").unwrap();

    let mut hostd = start_hostd(addr, &log, &env);
    let listed: Vec<String> = spaces(addr).iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert!(listed.contains(space_a) && listed.contains(space_b), "{listed:?}");
    assert!(!listed.contains(space_c), "a space with a damaged state file is not listed: {listed:?}");
    assert!(!half.exists() && !dir.join(space_c).exists(), "leftovers removed at start");

    // b's memory changed on disk while listed: one page of its first run.
    let state_b = std::fs::read(dir.join(space_b).join("state")).unwrap();
    let st: Value = serde_json::from_slice(&state_b[FRAME_HEADER..]).unwrap();
    let first = st["record"]["runs"][0]["first"].as_u64().expect("a run");
    let mem_b = std::fs::OpenOptions::new().write(true).open(dir.join(space_b).join("memory")).unwrap();
    mem_b.write_all_at(&[0x5a; 4096], first * 4096).unwrap();
    drop(mem_b);
    let (status, body) = request(addr, "POST", &format!("/v1/spaces/{space_b}/resume"), "{}");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("checksum"), "{body}");
    let (status, _) = request(addr, "POST", &format!("/v1/spaces/{space_b}/resume"), "{}");
    assert_eq!(status, 404, "a refused space is gone");

    let (status, body) = request(addr, "POST", &format!("/v1/spaces/{space_a}/resume"), "{}");
    assert_eq!(status, 200, "{body}");
    let resumed: Value = serde_json::from_str(&body).unwrap();
    let id = resumed["id"].as_str().unwrap();
    assert_ne!(id, a);
    let out = exec(addr, id, "print(x, open('/tmp/a').read())");
    assert!(out.contains(r#""data":"kept-a file-a""#), "{out}");
    assert!(spaces(addr).is_empty(), "every space consumed or dropped");

    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = hostd.kill();
    let _ = hostd.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
    assert!(logged.contains("removed an unreadable space") && logged.contains("half written"), "{logged}");
    assert!(logged.contains("space refused and removed"), "{logged}");
}

fn temp_paths(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("podflare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = std::env::temp_dir().join(format!("podflare-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    (dir, log)
}

#[test]
fn sigterm_freezes_persistent_sandboxes_and_destroys_the_rest() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let (dir, log) = temp_paths("spaces-sigterm");
    let env = [("PODFLARE_SPACES_DIR", dir.to_str().unwrap())];
    let addr = free_port();
    let mut hostd = start_hostd(addr, &log, &env);
    let kept = create(addr, r#"{"persistent":true}"#);
    exec(addr, &kept, "x = 'through sigterm'");
    let plain = create(addr, "{}");
    kill(Pid::from_raw(hostd.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut hostd, Duration::from_secs(20)).expect("hostd still running 20 s after SIGTERM");
    assert!(status.success(), "{status:?}");
    let mut hostd = start_hostd(addr, &log, &env);
    let listed = spaces(addr);
    assert_eq!(listed.len(), 1, "only the persistent one: {listed:?}");
    assert_eq!(listed[0]["source_sandbox"], kept.as_str());
    assert_ne!(listed[0]["source_sandbox"], plain.as_str());
    let (status, body) = request(addr, "POST", &format!("/v1/spaces/{}/resume", listed[0]["id"].as_str().unwrap()), "{}");
    assert_eq!(status, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_string();
    let out = exec(addr, &id, "print(x)");
    let _ = hostd.kill();
    let _ = hostd.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
    assert!(out.contains(r#""data":"through sigterm""#), "{out}");
}

#[test]
fn a_freeze_that_cannot_write_leaves_the_sandbox_running_and_nothing_listed() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let (dir, log) = temp_paths("spaces-full");
    // The spaces directory is a file system of 256 KiB: every freeze runs
    // out of room writing a guest's pages, as on a full disk. (A file size
    // limit on hostd would fail every create too: each sandbox's writable
    // disk is a file of its own.) Mounting needs root, as /dev/kvm does here.
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "podflare-test-full"]).arg(&dir).status();
    assert!(mounted.is_ok_and(|s| s.success()), "mounting a 256 KiB tmpfs on {} failed (the test needs root)", dir.display());
    let env = [("PODFLARE_SPACES_DIR", dir.to_str().unwrap())];
    let addr = free_port();
    let mut hostd = start_hostd(addr, &log, &env);
    let id = create(addr, r#"{"persistent":true,"idle_timeout_seconds":1}"#);
    exec(addr, &id, "x = 'still here'");
    let t = Instant::now();
    let logged = loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("freezing into a space failed") || t.elapsed() > Duration::from_secs(60) {
            break logged;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let out = exec(addr, &id, "print(x)");
    let listed = spaces(addr);
    let left: Vec<_> = std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    let _ = hostd.kill();
    let _ = hostd.wait();
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log);
    assert!(logged.contains("freezing into a space failed") && logged.contains("keeps running"), "{logged}");
    assert!(out.contains(r#""data":"still here""#), "the sandbox runs on: {out}");
    assert!(listed.is_empty(), "{listed:?}");
    assert!(left.is_empty(), "nothing half written stays: {left:?}");
}

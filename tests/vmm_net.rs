//! Sandbox networking through a real hostd and real VMs. Every packet goes
//! to this machine only: the "upstream" is a lab network namespace the test
//! makes itself (`common::netlab`), with an HTTP server and a resolver.
//!
//! - with egress a sandbox fetches the lab's page by address and by a name
//!   its resolver answers; without, the same fetch fails at once;
//! - a sandbox reaches no other sandbox, no address of the host itself
//!   (hostd's port, a listener of the host's), no link-local address;
//! - 5 fork children of an egress sandbox all fetch; a merge keeps the
//!   winner's network; a resume takes the request's egress;
//! - 100 create/delete cycles leave no namespace link behind; after
//!   `kill -9`, nothing of the killed run stays, and the next hostd's clean
//!   exit removes its table and puts `ip_forward` back.
//!
//! Needs `/dev/kvm` and root; fails where they exist and anything does not
//! work.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::http::{create, request};
use common::netlab::NetLab;
use common::process::{free_port, start_hostd, wait_exit};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The tests count host links and share the host-wide table: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A hostd that is killed when the test ends, passing or not.
struct Hostd(std::process::Child);

impl Drop for Hostd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Standard output of an exec, and its exit status.
fn exec(addr: SocketAddr, id: &str, code: &str) -> (String, i64) {
    let (status, body) = request(addr, "POST", &format!("/v1/sandboxes/{id}/exec"), &json!({ "code": code }).to_string());
    assert_eq!(status, 200, "{body}");
    let mut out = String::new();
    let mut exit = None;
    // The body is chunked: its event lines are the ones that are JSON objects.
    for line in body.lines().filter(|l| l.starts_with('{')) {
        let ev: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?} in {body:?}"));
        match ev["type"].as_str() {
            // One event per line of output.
            Some("stdout") | Some("stderr") => {
                out.push_str(ev["data"].as_str().unwrap_or_default());
                out.push('\n');
            }
            Some("exit") => exit = ev["data"].as_i64(),
            _ => {}
        }
    }
    (out, exit.unwrap_or_else(|| panic!("no exit event: {body}")))
}

/// Fetches `url` in the sandbox: `OK <body>` or `ERR <why>`, and the seconds it took.
fn fetch(addr: SocketAddr, id: &str, url: &str) -> (String, f64) {
    let code = format!(
        "import time, urllib.request\nt = time.time()\ntry:\n    r = urllib.request.urlopen({url:?}, timeout=20).read().decode().strip()\n    print('OK', r)\nexcept Exception as e:\n    print('ERR', type(e).__name__, e)\nprint(round(time.time() - t, 3))"
    );
    let (out, status) = exec(addr, id, &code);
    assert_eq!(status, 0, "{out}");
    let mut lines = out.lines();
    let result = lines.next().unwrap_or_default().to_string();
    let secs = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or(f64::MAX);
    (result, secs)
}

/// Tries TCP connections from the sandbox; one line per target: `open` or the error.
fn connect_all(addr: SocketAddr, id: &str, targets: &[(String, u16)]) -> Vec<String> {
    let list: Vec<String> = targets.iter().map(|(h, p)| format!("({h:?}, {p})")).collect();
    let code = format!(
        "import socket, time\nfor t in [{}]:\n    s = time.time()\n    try:\n        socket.create_connection(t, timeout=5).close()\n        r = 'open'\n    except Exception as e:\n        r = type(e).__name__\n    print(t[0], t[1], r, round(time.time() - s, 2))",
        list.join(", ")
    );
    let (out, status) = exec(addr, id, &code);
    assert_eq!(status, 0, "{out}");
    out.lines().map(str::to_string).collect()
}

/// Host-side addresses of the sandbox links (`pfv*`) in `subnet` (the
/// first two octets and a dot: each test's hostd has a subnet of its own,
/// so other hostds on the machine do not count).
fn sandbox_links(subnet: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (name, addr) = (f.get(1)?, f.get(3)?);
            (name.starts_with("pfv") && addr.starts_with(subnet)).then(|| addr.split('/').next().unwrap_or(addr).to_string())
        })
        .collect()
}

fn wait_links_at_most(subnet: &str, n: usize, within: Duration) -> usize {
    let t = Instant::now();
    loop {
        let now = sandbox_links(subnet).len();
        if now <= n || t.elapsed() > within {
            return now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether another process holds hostd's host-wide network lock.
fn others_hold_the_host_rules() -> bool {
    let Ok(f) = std::fs::File::open("/run/podflare/net.lock") else { return false };
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
}

fn table_present() -> bool {
    let out = Command::new("nft").args(["list", "tables"]).output().expect("nft");
    String::from_utf8_lossy(&out.stdout).contains("inet podflare")
}

fn log_path(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("podflare-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn egress_reaches_the_lab_and_nothing_else() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = NetLab::start(&["web.lab.test"]);
    let log = log_path("net");
    let spaces = std::env::temp_dir().join(format!("podflare-net-spaces-{}", std::process::id()));
    let dns = lab.addr().to_string();
    let env = [
        ("PODFLARE_NET_DNS", dns.as_str()),
        ("PODFLARE_SPACES_DIR", spaces.to_str().unwrap()),
        ("PODFLARE_NET_SUBNET", "10.212.0.0/16"),
    ];
    let addr = free_port();
    let _hostd = Hostd(start_hostd(addr, &log, &env));

    // By address and by name, with egress (the default).
    let on = create(addr, "{}");
    let (got, secs) = fetch(addr, &on, &lab.url("/"));
    assert_eq!(got, "OK podflare-lab-ok", "by address ({secs} s)");
    let (got, _) = fetch(addr, &on, &format!("http://web.lab.test:{}/", lab.http_port()));
    assert_eq!(got, "OK podflare-lab-ok", "by name");
    assert_eq!(lab.wait_requests(2, Duration::from_secs(10)).len(), 2);

    // Without: fails at once, reaches nothing.
    let off = create(addr, r#"{"egress": false}"#);
    let (got, secs) = fetch(addr, &off, &lab.url("/"));
    assert!(got.starts_with("ERR"), "{got}");
    assert!(secs < 3.0, "egress:false fails fast: {secs} s");
    let (got, secs) = fetch(addr, &off, &format!("http://web.lab.test:{}/", lab.http_port()));
    assert!(got.starts_with("ERR") && secs < 5.0, "{got} in {secs} s");
    assert_eq!(lab.requests().len(), 2, "nothing more reached the lab");

    // Nothing of the host: a listener of the host's on every address,
    // hostd's own port, link-local; and no other sandbox.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let peer = create(addr, "{}");
    let (out, status) = exec(addr, &peer, "import socket, threading\nsrv = socket.create_server(('0.0.0.0', 9000))\nseen = []\nthreading.Thread(target=lambda: seen.append(srv.accept()), daemon=True).start()\nprint('listening')");
    assert_eq!((out.trim(), status), ("listening", 0));
    let mut targets = vec![(lab.root_side().to_string(), port), ("169.254.169.254".to_string(), 80)];
    for host_side in sandbox_links("10.212.") {
        let ns_side: std::net::Ipv4Addr = host_side.parse().unwrap();
        let ns_side = std::net::Ipv4Addr::from(u32::from(ns_side) + 1);
        targets.push((host_side.clone(), port));
        targets.push((host_side, addr.port()));
        targets.push((ns_side.to_string(), 9000));
    }
    assert!(targets.len() >= 5, "sandbox links are on the host: {targets:?}");
    let lines = connect_all(addr, &on, &targets);
    assert_eq!(lines.len(), targets.len(), "{lines:?}");
    for l in &lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_ne!(f[2], "open", "reached: {l}");
        assert!(f[3].parse::<f64>().unwrap() < 3.0, "refused at once: {l}");
    }
    assert!(listener.accept().is_err(), "the host's listener saw no connection");
    let (seen, _) = exec(addr, &peer, "print(len(seen))");
    assert_eq!(seen.trim(), "0", "the other sandbox saw no connection");

    // Fork children of an egress sandbox: each its own namespace, all fetch.
    let (status, body) = request(addr, "POST", &format!("/v1/sandboxes/{on}/fork"), r#"{"n": 5}"#);
    assert_eq!(status, 200, "{body}");
    let children: Vec<String> =
        serde_json::from_str::<Value>(&body).unwrap()["children"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    for c in &children {
        assert_eq!(fetch(addr, c, &lab.url("/")).0, "OK podflare-lab-ok", "child {c}");
    }
    // Children of a sandbox without egress have none.
    let (status, body) = request(addr, "POST", &format!("/v1/sandboxes/{off}/fork"), r#"{"n": 1}"#);
    assert_eq!(status, 200, "{body}");
    let off_child = serde_json::from_str::<Value>(&body).unwrap()["children"][0].as_str().unwrap().to_string();
    assert!(fetch(addr, &off_child, &lab.url("/")).0.starts_with("ERR"));

    // Merge: the parent runs the winner's VM, network included.
    let (status, body) = request(addr, "POST", &format!("/v1/sandboxes/{on}/merge_into/{}", children[0]), "");
    assert_eq!(status, 204, "{body}");
    assert_eq!(fetch(addr, &on, &lab.url("/")).0, "OK podflare-lab-ok", "after merge");

    // Resume takes the request's egress, whatever the frozen sandbox had.
    let frozen = |body: &str| {
        let id = create(addr, body);
        exec(addr, &id, "x = 1");
        let t = Instant::now();
        loop {
            let (_, list) = request(addr, "GET", "/v1/capacity", "");
            let v: Value = serde_json::from_str(&list).unwrap();
            if let Some(s) = v["spaces"].as_array().and_then(|a| a.iter().find(|s| s["source_sandbox"] == json!(id))) {
                return s["id"].as_str().unwrap().to_string();
            }
            assert!(t.elapsed() < Duration::from_secs(120), "not frozen: {list}");
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let resume = |space: &str, body: &str| {
        let (status, out) = request(addr, "POST", &format!("/v1/spaces/{space}/resume"), body);
        assert_eq!(status, 200, "{out}");
        serde_json::from_str::<Value>(&out).unwrap()["id"].as_str().unwrap().to_string()
    };
    let was_on = frozen(r#"{"persistent": true, "idle_timeout_seconds": 2}"#);
    let was_off = frozen(r#"{"persistent": true, "idle_timeout_seconds": 2, "egress": false}"#);
    let now_off = resume(&was_on, r#"{"egress": false}"#);
    let now_on = resume(&was_off, r#"{"egress": true}"#);
    let (got, secs) = fetch(addr, &now_off, &lab.url("/"));
    assert!(got.starts_with("ERR") && secs < 3.0, "{got} in {secs} s");
    assert_eq!(fetch(addr, &now_on, &lab.url("/")).0, "OK podflare-lab-ok");
    let (_, list) = request(addr, "GET", &format!("/v1/sandboxes/{now_off}"), "");
    assert!(!list.contains(r#""egress":true"#), "{list}");

    let _ = std::fs::remove_dir_all(&spaces);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn cycles_and_kill_9_leave_nothing_behind() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The machine's own setting: the one a killed run saved, else today's.
    let forward = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap().trim().to_string();
    let own = std::fs::read_to_string("/run/podflare/net.ip_forward").map(|s| s.trim().to_string()).unwrap_or_else(|_| forward());
    let log = log_path("net-cycles");
    let env = [("PODFLARE_NET_READY", "2"), ("PODFLARE_NET_SUBNET", "10.211.0.0/16")];
    const MINE: &str = "10.211.";
    let addr = free_port();
    let mut hostd = Hostd(start_hostd(addr, &log, &env));
    assert!(table_present());
    let ready = wait_links_at_most(MINE, 2, Duration::from_secs(10));
    for i in 0..100 {
        let id = create(addr, "{}");
        let (status, body) = request(addr, "DELETE", &format!("/v1/sandboxes/{id}"), "");
        assert_eq!(status, 204, "cycle {i}: {body}");
    }
    let after = wait_links_at_most(MINE, 2, Duration::from_secs(30));
    assert!(after <= 2, "100 cycles left {after} sandbox links (ready namespaces: {ready})");
    let (_, cap) = request(addr, "GET", "/v1/capacity", "");
    let made = serde_json::from_str::<Value>(&cap).unwrap()["vmm"]["network"]["made"].as_u64().unwrap();
    assert!(made >= 100, "a namespace per sandbox: {cap}");

    // kill -9: the killed run's namespaces go with it; its table stays
    // until the next start takes it over.
    let live = create(addr, "{}");
    assert!(!sandbox_links(MINE).is_empty(), "{live} has its link");
    kill(Pid::from_raw(hostd.0.id() as i32), Signal::SIGKILL).unwrap();
    assert!(wait_exit(&mut hostd.0, Duration::from_secs(10)).is_some());
    assert_eq!(wait_links_at_most(MINE, 0, Duration::from_secs(30)), 0, "links of a killed run");
    let mut hostd = Hostd(start_hostd(addr, &log, &env));
    assert!(table_present());
    kill(Pid::from_raw(hostd.0.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut hostd.0, Duration::from_secs(60)).is_some(), "SIGTERM stops hostd");
    if others_hold_the_host_rules() {
        // Another hostd on this machine (scripts/test runs one) still uses them.
        assert!(table_present(), "the table stays while another hostd runs");
        assert_eq!(forward(), "1", "forwarding stays on while another hostd runs");
    } else {
        assert!(!table_present(), "the last hostd removes its table");
        assert_eq!(forward(), own, "ip_forward as the machine had it");
        assert!(!std::path::Path::new("/run/podflare/net.ip_forward").exists());
    }
    assert_eq!(wait_links_at_most(MINE, 0, Duration::from_secs(30)), 0);
    let _ = std::fs::remove_file(&log);
}

//! A test's own upstream network: a network namespace joined to the root
//! namespace by a veth pair, with `tests/net/lab_server.py` (HTTP and DNS)
//! serving inside it. Tests reach it only through this machine's routing,
//! so nothing they send leaves the machine.

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/net/lab_server.py");
const HTTP_PORT: u16 = 8080;
/// Serialises choosing names and a /30 and claiming them across test
/// processes.
const LOCK: &str = "/tmp/podflare-netlab.lock";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running lab; dropping it kills the server and removes its namespace
/// and veth.
pub struct NetLab {
    // Dropped after the server is killed (fields drop after `Drop::drop`),
    // and on its own when `start` fails halfway.
    claim: Claim,
    k: u8,
    server: Child,
    requests: Arc<Mutex<Vec<String>>>,
}

impl NetLab {
    /// Creates netns `pflab-<pid>-<n>` joined by veth `pflab<pid%10000>x<n>`
    /// (root side, 10.203.k.1/30) / `eth0` (inside, 10.203.k.2/30, default
    /// route via .1), and starts the lab server inside with every name in
    /// `names` resolving to 10.203.k.2.
    pub fn start(names: &[&str]) -> NetLab {
        sweep_stale();
        let pid = std::process::id();
        let lock = std::fs::File::create(LOCK).unwrap_or_else(|e| panic!("create {LOCK}: {e}"));
        lock.lock().unwrap_or_else(|e| panic!("lock {LOCK}: {e}"));
        let (ns, veth) = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let (ns, veth) = (format!("pflab-{pid}-{n}"), format!("pflab{}x{n}", pid % 10000));
            // Another process whose pid matches ours mod 10000 may hold the
            // veth name.
            if !exists_ns(&ns) && !exists_link(&veth) {
                break (ns, veth);
            }
        };

        let claim = Claim { ns: ns.clone(), veth: veth.clone() };
        let k = free_subnet(pid);
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
        ip(&["addr", "add", &format!("10.203.{k}.1/30"), "dev", &veth]);
        drop(lock);
        ip(&["link", "set", &veth, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("10.203.{k}.2/30"), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.203.{k}.1")]);

        let addr = format!("10.203.{k}.2");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "python3", "-u", SERVER, "--addr", &addr]);
        cmd.args(["--http-port", &HTTP_PORT.to_string()]);
        for name in names {
            cmd.arg("--name").arg(format!("{name}={addr}"));
        }
        let mut server = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn lab server in {ns}: {e}"));

        let requests = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = server.stdout.take().unwrap();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match line.strip_prefix("req ") {
                    Some(req) => seen.lock().unwrap().push(req.to_string()),
                    None if line == "ready" => drop(ready_tx.send(())),
                    None => {}
                }
            }
        });
        let mut stderr = server.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });

        let lab = NetLab { claim, k, server, requests };
        // Disconnected (server exited) and timeout both fail the same way.
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let ns = lab.claim.ns.clone();
            drop(lab); // kills the server, which ends its stderr
            panic!(
                "lab server in {ns} not ready (exited, or 10 s passed); stderr:\n{}",
                errors.join().unwrap_or_default()
            );
        }
        lab
    }

    /// 10.203.k.2, where the server listens.
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 203, self.k, 2)
    }

    pub fn http_port(&self) -> u16 {
        HTTP_PORT
    }

    /// `http://10.203.k.2:8080` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{}", self.addr(), HTTP_PORT, path)
    }

    /// 10.203.k.1, the root namespace's end of the veth.
    pub fn root_side(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 203, self.k, 1)
    }

    /// The HTTP requests the server has logged so far, as `METHOD PATH`.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// [`NetLab::requests`] once at least `n` have been logged, or what was
    /// logged by `within`. The server logs a request before answering it,
    /// but the reader thread may not have taken the line yet.
    pub fn wait_requests(&self, n: usize, within: Duration) -> Vec<String> {
        let t = Instant::now();
        loop {
            let seen = self.requests();
            if seen.len() >= n || t.elapsed() >= within {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A lab's namespace and root-side veth, removed on drop.
struct Claim {
    ns: String,
    veth: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        remove(&self.ns, &self.veth);
    }
}

/// Removes labs a killed test process left: netns `pflab-<pid>-*` whose pid
/// is not alive, anything still running in them, and their root-side veths.
pub fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        let Some((pid, n)) = ns.strip_prefix("pflab-").and_then(|r| r.split_once('-')) else { continue };
        let (Ok(pid), Ok(n)) = (pid.parse::<u32>(), n.parse::<u32>()) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // A server outliving its test keeps the namespace (and veth) alive.
        if let Ok(p) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&p.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        remove(ns, &format!("pflab{}x{n}", pid % 10000));
    }
}

fn remove(ns: &str, veth: &str) {
    // The veth would go with the namespace, but only once nothing runs in
    // it, and asynchronously. Its name may belong to another process's lab
    // (same pid mod 10000), so it is deleted only while its peer is in
    // `ns`, which `ip` can tell only before the namespace loses its name.
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show", "dev", veth]).stderr(Stdio::null()).output() {
        let line = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && line.split_whitespace().skip_while(|w| *w != "link-netns").nth(1) == Some(ns) {
            let _ = Command::new("ip").args(["link", "del", veth]).stderr(Stdio::null()).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
}

/// A k whose 10.203.k.0/30 no root-namespace address or route uses.
fn free_subnet(pid: u32) -> u8 {
    let used = ip(&["-o", "-4", "addr", "show"]) + &ip(&["-4", "route", "show", "table", "all"]);
    let start = pid.wrapping_mul(31).wrapping_add(NEXT.load(Ordering::Relaxed)) % 256;
    (0..256)
        .map(|i| ((start + i) % 256) as u8)
        .find(|k| !used.contains(&format!("10.203.{k}.")))
        .expect("no free 10.203.k.0/30 for a network lab")
}

fn exists_ns(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

fn exists_link(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Runs `ip args`, panicking with its stderr unless it succeeds; its stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("run ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! The sandboxes' network on the host: a network namespace per sandbox with
//! egress, its tap, its way out, and the host-wide rules that keep sandboxes
//! apart.
//!
//! Every guest has the same address (172.16.0.2/30 via 172.16.0.1) and MAC,
//! because every sandbox restores one snapshot. So each sandbox with egress
//! gets a namespace of its own ([`NetSlot`]), made ahead by one thread:
//! - `tap0` (the gateway, 172.16.0.1/30, the gateway MAC), opened by hostd
//!   and handed to the VM's card;
//! - `veth0` with a /30 of its own from `PODFLARE_NET_SUBNET`, its peer
//!   `pfv<n>` in the host's namespace; the guest's traffic is SNATed to the
//!   slot's address, and the guest's resolver (the gateway's port 53) is
//!   DNATed to `PODFLARE_NET_DNS`.
//!
//! On the host, table `inet podflare` (the same for every hostd on the
//! machine): nothing from a `pfv*` link reaches the host itself (hostd's
//! API, loopback services), another sandbox, loopback, link-local
//! (metadata) or multicast addresses, or IPv6; the rest is forwarded and
//! masqueraded. hostd sets `net.ipv4.ip_forward` while any hostd runs.
//!
//! Nothing outlives hostd: a namespace is anonymous (held by hostd's file
//! descriptors only), so it goes, with its tap and veth pair, when its
//! sandbox ends or hostd dies. The last hostd to stop removes the table and
//! puts `ip_forward` back; a killed run's table and setting are taken over
//! by the next start.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, unshare, CloneFlags};
use serde_json::json;

use crate::devices::virtio::net::{GATEWAY_IP, GATEWAY_MAC, PREFIX_LEN};
use crate::obs::Logger;

/// Errors of the host network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A step of making or removing network state failed.
    #[error("sandbox networking: {what}: {why}")]
    Step {
        /// The step.
        what: String,
        /// What failed, with the fix where we know it.
        why: String,
    },
    /// No namespace could be had in time.
    #[error("sandbox networking: no network namespace ready within {0:?}")]
    Timeout(Duration),
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Step { what, why: e.to_string() }
}

/// Settings (`PODFLARE_NETWORK`, `PODFLARE_NET_*`).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// First address of the subnet the slots' /30s come from.
    pub subnet: Ipv4Addr,
    /// Its prefix length (at most 28: four slots).
    pub prefix: u8,
    /// The resolver the gateway's port 53 goes to; `None`: refused.
    pub dns: Option<Ipv4Addr>,
    /// Namespaces kept ready.
    pub ready: usize,
}

impl NetConfig {
    /// How many /30 slots the subnet has.
    pub fn slots(&self) -> u32 {
        1u32 << ((32 - u32::from(self.prefix)) - 2)
    }

    /// The host-side and namespace-side addresses of slot `index`.
    pub fn addresses(&self, index: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.subnet) + index * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    /// Parses `a.b.c.d/len` for [`NetConfig::subnet`] and [`NetConfig::prefix`].
    pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), String> {
        let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a.b.c.d/len"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| format!("{p:?} is not a prefix length"))?;
        if !(8..=28).contains(&prefix) {
            return Err(format!("prefix /{prefix}: from /8 to /28"));
        }
        if u32::from(addr) & ((1u32 << (32 - u32::from(prefix))) - 1) != 0 {
            return Err(format!("{s}: host bits are set"));
        }
        Ok((addr, prefix))
    }

    /// The first IPv4 `nameserver` of a resolv.conf that is not loopback (a
    /// local stub such as 127.0.0.53 cannot be reached from a namespace).
    pub fn resolver_from(resolv_conf: &str) -> Option<Ipv4Addr> {
        resolv_conf
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(|a| !a.is_loopback() && !a.is_unspecified())
    }
}

/// One sandbox's network namespace. Its tap goes to the VM's card; the
/// slot keeps the namespace (and its /30) until it is dropped.
pub struct NetSlot {
    index: u32,
    _ns: File,
    tap: Option<File>,
    free: Arc<Mutex<VecDeque<u32>>>,
}

impl NetSlot {
    /// The tap, for the VM's card (once).
    pub fn take_tap(&mut self) -> Option<File> {
        self.tap.take()
    }

    /// The slot's number (its host-side link is `pfv<n>`).
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for NetSlot {
    fn drop(&mut self) {
        // Last in line: the kernel removes the namespace's links a little
        // after the last descriptor closes.
        lock(&self.free).push_back(self.index);
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct State {
    ready: VecDeque<NetSlot>,
    waiting: VecDeque<std::sync::mpsc::SyncSender<Result<NetSlot, NetError>>>,
    stop: bool,
}

struct Shared {
    cfg: NetConfig,
    log: Logger,
    /// The host's namespace, to come back to after making one.
    root: File,
    state: Mutex<State>,
    wake: Condvar,
    free: Arc<Mutex<VecDeque<u32>>>,
    made: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// The host network of one VMM: the slot maker and the host-wide rules.
pub struct HostNet {
    shared: Arc<Shared>,
    maker: Option<JoinHandle<()>>,
}

/// How long a sandbox waits for a namespace before its create fails.
const TAKE_WAIT: Duration = Duration::from_secs(30);

impl HostNet {
    /// Installs the host-wide rules, makes one namespace (so a machine that
    /// cannot is found now, with a message saying what is missing) and
    /// starts the thread that keeps `cfg.ready` more. Call it from a thread
    /// with no seccomp filter: the maker runs `ip` and `nft`.
    pub fn start(cfg: NetConfig, log: Logger) -> Result<HostNet, NetError> {
        preflight()?;
        host_rules::acquire()?;
        let root = File::open("/proc/thread-self/ns/net").map_err(step("open this thread's network namespace"))?;
        // Start at a slot of our own so hostd processes sharing the subnet
        // rarely try the same link name (a clash is retried anyway).
        let slots = cfg.slots();
        let start = (std::process::id().wrapping_mul(2_654_435_761)) % slots;
        let free = (0..slots).map(|i| (start + i) % slots).collect();
        let shared = Arc::new(Shared {
            cfg,
            log,
            root,
            state: Mutex::new(State { ready: VecDeque::new(), waiting: VecDeque::new(), stop: false }),
            wake: Condvar::new(),
            free: Arc::new(Mutex::new(free)),
            made: Default::default(),
            failed: Default::default(),
        });
        let first = match make_slot(&shared) {
            Ok(s) => s,
            Err(e) => {
                host_rules::release();
                return Err(e);
            }
        };
        lock(&shared.state).ready.push_back(first);
        let s2 = shared.clone();
        let maker = std::thread::Builder::new()
            .name("net-slots".into())
            .spawn(move || maker_loop(&s2))
            .map_err(step("start the namespace thread"))?;
        Ok(HostNet { shared, maker: Some(maker) })
    }

    /// A namespace for a new sandbox: a ready one, else one made now.
    pub fn take(&self) -> Result<NetSlot, NetError> {
        let rx = {
            let mut st = lock(&self.shared.state);
            if let Some(s) = st.ready.pop_front() {
                self.shared.wake.notify_all();
                return Ok(s);
            }
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            st.waiting.push_back(tx);
            self.shared.wake.notify_all();
            rx
        };
        rx.recv_timeout(TAKE_WAIT).map_err(|_| NetError::Timeout(TAKE_WAIT))?
    }

    /// Figures for `GET /v1/capacity`.
    pub fn figures(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let st = lock(&self.shared.state);
        json!({
            "enabled": true,
            "ready": st.ready.len(),
            "made": self.shared.made.load(Relaxed),
            "failed": self.shared.failed.load(Relaxed),
            "dns": self.shared.cfg.dns.map(|a| a.to_string()),
            "subnet": format!("{}/{}", self.shared.cfg.subnet, self.shared.cfg.prefix),
        })
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.stop = true;
            st.ready.clear();
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.maker.take() {
            let _ = t.join();
        }
        host_rules::release();
    }
}

/// What a machine needs before anything is tried, each with its fix.
fn preflight() -> Result<(), NetError> {
    let missing = |why: &str| Err(NetError::Step { what: "checking the host".into(), why: why.into() });
    if !nix::unistd::geteuid().is_root() {
        return missing("hostd is not root: creating namespaces, taps and nftables rules needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run it as root or set PODFLARE_NETWORK=off");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return missing("/dev/net/tun does not exist: load the tun module (modprobe tun) or set PODFLARE_NETWORK=off");
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return missing(&format!("`{tool}` is not installed: run scripts/setup (it installs iproute2 and nftables) or set PODFLARE_NETWORK=off"));
        }
    }
    Ok(())
}

fn maker_loop(shared: &Shared) {
    loop {
        let job = {
            let mut st = lock(&shared.state);
            loop {
                if st.stop {
                    return;
                }
                if let Some(w) = st.waiting.pop_front() {
                    break Some(w);
                }
                if st.ready.len() < shared.cfg.ready {
                    break None;
                }
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let made = make_slot(shared);
        if let Err(e) = &made {
            shared.log.error("cannot make a sandbox network namespace", &[("cause", json!(e.to_string()))]);
        }
        match (job, made) {
            (Some(w), made) => {
                let _ = w.send(made);
            }
            (None, Ok(slot)) => lock(&shared.state).ready.push_back(slot),
            // Not in a hot loop: a sandbox waiting will ask again.
            (None, Err(_)) => {
                let st = lock(&shared.state);
                let _ = shared.wake.wait_timeout(st, Duration::from_secs(5));
            }
        }
    }
}

/// Makes one slot: tries a few numbers (another hostd may hold a link
/// name, or a namespace of ours may still be going away).
fn make_slot(shared: &Shared) -> Result<NetSlot, NetError> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut last = None;
    for _ in 0..4 {
        let Some(index) = lock(&shared.free).pop_front() else {
            return Err(NetError::Step { what: "allocate a slot".into(), why: "every /30 of PODFLARE_NET_SUBNET is in use".into() });
        };
        match make_slot_at(shared, index) {
            Ok(s) => {
                shared.made.fetch_add(1, Relaxed);
                return Ok(s);
            }
            Err(e) => {
                shared.failed.fetch_add(1, Relaxed);
                lock(&shared.free).push_back(index);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(NetError::Timeout(Duration::ZERO)))
}

fn make_slot_at(shared: &Shared, index: u32) -> Result<NetSlot, NetError> {
    // A new namespace for this thread, then straight back: the slot keeps
    // it through a descriptor, and everything else runs in commands.
    unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Step { what: "unshare a network namespace".into(), why: e.to_string() })?;
    let inside = (|| {
        let ns = File::open("/proc/thread-self/ns/net").map_err(step("open the new namespace"))?;
        // Per-namespace settings, written from inside it.
        write_sysctl("net/ipv4/ip_forward", "1")?;
        write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
        let tap = open_tap("tap0")?;
        Ok::<_, NetError>((ns, tap))
    })();
    go_home(shared)?;
    let (ns, tap) = inside?;
    let link = format!("pfv{index}");
    let (host_side, ns_side) = shared.cfg.addresses(index);
    let dotted = |a: [u8; 4]| Ipv4Addr::from(a).to_string();
    let mac = GATEWAY_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let inside_batch = format!(
        "link set lo up\n\
         link set tap0 address {mac} mtu 1500 up\n\
         addr add {gw}/{PREFIX_LEN} dev tap0\n\
         link add veth0 type veth peer name {link} netns {pid}\n\
         addr add {ns_side}/30 dev veth0\n\
         link set veth0 up\n\
         route add default via {host_side}\n",
        gw = dotted(GATEWAY_IP),
        pid = std::process::id(),
    );
    run("configure the namespace", "ip", &["-batch", "-"], &inside_batch, Some((&ns, shared)))?;
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6"), "1");
    let host_batch = format!("addr add {host_side}/30 dev {link}\nlink set {link} up\n");
    run("configure the host side", "ip", &["-batch", "-"], &host_batch, None)?;
    run("install the namespace's rules", "nft", &["-f", "-"], &namespace_rules(&shared.cfg, ns_side), Some((&ns, shared)))?;
    Ok(NetSlot { index, _ns: ns, tap: Some(tap), free: shared.free.clone() })
}

/// The rules inside one namespace: the guest's traffic leaves as the
/// slot's address; its resolver is the configured one; nothing else is
/// reachable in the namespace itself.
fn namespace_rules(cfg: &NetConfig, ns_side: Ipv4Addr) -> String {
    let gw = Ipv4Addr::from(GATEWAY_IP);
    let dns = cfg.dns.map_or(String::new(), |d| {
        format!(
            "iifname \"tap0\" ip daddr {gw} udp dport 53 dnat to {d}\n\
             iifname \"tap0\" ip daddr {gw} tcp dport 53 dnat to {d}\n"
        )
    });
    format!(
        "table ip podflare {{\n\
         chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n{dns}}}\n\
         chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
           oifname \"veth0\" snat to {ns_side}\n}}\n\
         chain input {{ type filter hook input priority filter; policy accept;\n\
           ct state established,related accept\n\
           iifname \"lo\" accept\n\
           reject with icmp type admin-prohibited\n}}\n\
         chain forward {{ type filter hook forward priority filter; policy drop;\n\
           iifname \"tap0\" oifname \"veth0\" accept\n\
           iifname \"veth0\" oifname \"tap0\" ct state established,related accept\n\
           iifname \"tap0\" reject with icmp type admin-prohibited\n}}\n\
         }}\n"
    )
}

fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(format!("/proc/sys/{key}"), value).map_err(step(format!("set {key}")))
}

/// Opens a new tap `name` in this thread's namespace, non-blocking, frames
/// without packet information. It goes when the descriptor closes.
fn open_tap(name: &str) -> Result<File, NetError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(step("open /dev/net/tun"))?;
    // SAFETY: `ifreq` is plain C data for which all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may write back the name into) one
    // `ifreq`; `req` is a valid, initialized one that outlives the call, and
    // `file` is an open tun descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(step("create the tap (TUNSETIFF)")(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Brings this thread back to the host's namespace. If it cannot get home
/// it stops making slots rather than make them in the wrong place.
fn go_home(shared: &Shared) -> Result<(), NetError> {
    setns(&shared.root, CloneFlags::CLONE_NEWNET).map_err(|e| {
        shared.log.error("the namespace thread cannot return to the host namespace", &[("cause", json!(e.to_string()))]);
        lock(&shared.state).stop = true;
        NetError::Step { what: "return to the host namespace".into(), why: e.to_string() }
    })
}

/// Runs `program args` with `input` on stdin, inside namespace `ns` (then
/// this thread returns home through `shared`) if given; an error carries its
/// stderr.
///
/// The child is started from inside the namespace (this thread enters it,
/// spawns, and comes back) rather than entering it itself: a child that
/// must run code before exec makes the standard library fork, and a fork
/// copies the page tables of every VM in the process while holding its
/// address-space lock, which stalls every vCPU's page faults (160 sandboxes:
/// creates crawled at one per ~10 s). Without such code the child is a
/// `posix_spawn` that shares the address space until exec.
fn run(what: &str, program: &str, args: &[&str], input: &str, ns: Option<(&File, &Shared)>) -> Result<(), NetError> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let spawned = match ns {
        Some((ns, shared)) => {
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| NetError::Step { what: format!("{what}: enter the namespace"), why: e.to_string() })?;
            let spawned = cmd.spawn();
            if let Err(e) = go_home(shared) {
                // No zombie left behind: the slot maker stops on this error.
                if let Ok(mut child) = spawned {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e);
            }
            spawned
        }
        None => cmd.spawn(),
    };
    let mut child = spawned.map_err(step(format!("{what}: start {program}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(step(format!("{what}: wait for {program}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetError::Step {
        what: what.to_string(),
        why: format!("{program} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
    })
}

/// The host-wide part: table `inet podflare` and `ip_forward`, shared by
/// every hostd process on the machine through a lock file (each live
/// process holds it shared; whoever can take it alone is the only one).
mod host_rules {
    use super::*;

    const DIR: &str = "/run/podflare";
    const LOCK: &str = "/run/podflare/net.lock";
    /// `ip_forward` as it was before the first hostd set it.
    const SAVED: &str = "/run/podflare/net.ip_forward";
    const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

    /// The same text for every hostd, so any of them may (re)install it.
    pub(super) const RULES: &str = r#"table inet podflare
delete table inet podflare
table inet podflare {
  chain input {
    type filter hook input priority filter - 10; policy accept;
    iifname "pfv*" reject with icmpx type admin-prohibited
  }
  chain forward {
    type filter hook forward priority filter - 10; policy accept;
    iifname "pfv*" oifname "pfv*" reject with icmpx type admin-prohibited
    iifname "pfv*" meta nfproto ipv6 drop
    iifname "pfv*" ip daddr { 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/3 } reject with icmpx type admin-prohibited
    oifname "pfv*" ct state established,related accept
    oifname "pfv*" drop
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    iifname "pfv*" oifname != "pfv*" masquerade
  }
}
"#;

    struct Held {
        users: usize,
        lock: Option<Flock<File>>,
    }

    static HELD: Mutex<Held> = Mutex::new(Held { users: 0, lock: None });

    fn lock_failed(e: nix::errno::Errno) -> NetError {
        NetError::Step { what: format!("lock {LOCK}"), why: e.to_string() }
    }

    /// One more user in this process; the first installs the rules.
    pub(super) fn acquire() -> Result<(), NetError> {
        let mut held = lock(&HELD);
        if held.users > 0 {
            held.users += 1;
            return Ok(());
        }
        std::fs::create_dir_all(DIR).map_err(step(format!("create {DIR}")))?;
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(LOCK).map_err(step(format!("open {LOCK}")))?;
        let shared = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // Alone: whatever a killed run left is ours to take over. Keep a
            // saved value it left (it is the machine's own).
            Ok(alone) => {
                if !std::path::Path::new(SAVED).exists() {
                    let now = std::fs::read_to_string(FORWARD).map_err(step("read ip_forward"))?;
                    std::fs::write(SAVED, now.trim()).map_err(step(format!("write {SAVED}")))?;
                }
                alone.relock(FlockArg::LockShared).map_err(lock_failed)?;
                alone
            }
            Err((file, _)) => Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| lock_failed(e))?,
        };
        std::fs::write(FORWARD, "1").map_err(step("set net.ipv4.ip_forward"))?;
        run("install table inet podflare", "nft", &["-f", "-"], RULES, None)?;
        *held = Held { users: 1, lock: Some(shared) };
        Ok(())
    }

    /// One user fewer; the last in the last process removes the rules and
    /// puts `ip_forward` back.
    pub(super) fn release() {
        let mut held = lock(&HELD);
        held.users = held.users.saturating_sub(1);
        if held.users > 0 {
            return;
        }
        let Some(shared) = held.lock.take() else { return };
        let Ok(file) = shared.unlock() else { return };
        if let Ok(_alone) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            let _ = run("remove table inet podflare", "nft", &["delete", "table", "inet", "podflare"], "", None);
            if let Ok(saved) = std::fs::read_to_string(SAVED) {
                let _ = std::fs::write(FORWARD, saved.trim());
                let _ = std::fs::remove_file(SAVED);
            }
        }
    }

    /// Releases every user of this process (hostd's exit).
    pub(super) fn release_all() {
        let users = lock(&HELD).users;
        for _ in 0..users {
            release();
        }
    }
}

/// Removes the host-wide rules if this is the last hostd (call at exit:
/// drops do not run when the process ends with threads still holding
/// the VMM).
pub fn release_host_rules() {
    host_rules::release_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_slash_30s_of_the_subnet() {
        let (subnet, prefix) = NetConfig::parse_subnet("10.201.0.0/16").unwrap();
        let cfg = NetConfig { subnet, prefix, dns: None, ready: 0 };
        assert_eq!(cfg.slots(), 16384);
        assert_eq!(cfg.addresses(0), ("10.201.0.1".parse().unwrap(), "10.201.0.2".parse().unwrap()));
        assert_eq!(cfg.addresses(16383), ("10.201.255.253".parse().unwrap(), "10.201.255.254".parse().unwrap()));
        assert!(NetConfig::parse_subnet("10.201.0.1/16").is_err(), "host bits");
        assert!(NetConfig::parse_subnet("10.201.0.0/30").is_err(), "too small");
        assert!(NetConfig::parse_subnet("10.201.0.0").is_err());
    }

    #[test]
    fn the_resolver_is_the_first_reachable_nameserver() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver fd00::1\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(NetConfig::resolver_from(conf), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(NetConfig::resolver_from("nameserver 127.0.0.53\n"), None);
    }

    #[test]
    fn namespace_rules_forward_dns_only_when_a_resolver_is_set() {
        let cfg = |dns| NetConfig { subnet: Ipv4Addr::new(10, 201, 0, 0), prefix: 16, dns, ready: 0 };
        let with = namespace_rules(&cfg(Some(Ipv4Addr::new(10, 9, 8, 7))), Ipv4Addr::new(10, 201, 0, 2));
        assert!(with.contains("udp dport 53 dnat to 10.9.8.7") && with.contains("snat to 10.201.0.2"));
        let without = namespace_rules(&cfg(None), Ipv4Addr::new(10, 201, 0, 2));
        assert!(!without.contains("dnat"));
        // nft itself accepts them (a dry run: nothing is installed).
        for rules in [with.as_str(), without.as_str(), host_rules::RULES] {
            run("check rules", "nft", &["-c", "-f", "-"], rules, None).unwrap_or_else(|e| panic!("{e}\n{rules}"));
        }
    }
}

//! VMM settings, read from `PODFLARE_*` environment variables.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::LogFormat;
use crate::obs::Logger;

/// Most vCPUs a guest may have: what the MP table's local APIC entries and
/// the tests cover, far below KVM's own limit.
pub const MAX_GUEST_VCPUS: u8 = 8;

/// Everything the VMM needs to know from the operator.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// Where VMM log lines go, in `PODFLARE_LOG_FORMAT`.
    pub log: Logger,
    /// `PODFLARE_CACHE` (default `/var/lib/podflare`): built kernel, images, snapshots.
    pub cache_dir: PathBuf,
    /// `PODFLARE_RAM_BUILD_WAIT_SECS` (default 20: under the SDK's 30 s
    /// read timeout): how long a create waits for the first build of a RAM
    /// size before it answers 503 and the build goes on.
    pub ram_build_wait: Duration,
    /// `PODFLARE_SPACES_DIR` (default `<cache>/spaces`): frozen sandboxes.
    pub spaces_dir: PathBuf,
    /// `PODFLARE_KERNEL`: guest kernel (default `<cache>/kernel/current`, a link to the built vmlinux).
    pub kernel: PathBuf,
    /// `PODFLARE_TEMPLATES` (default `default,python-datasci`): templates to serve.
    pub templates: Vec<String>,
    /// `PODFLARE_GUEST_RAM_MIB` (default 512): RAM of every template VM.
    pub guest_ram_mib: u64,
    /// `PODFLARE_GUEST_VCPUS` (default 1, at most [`MAX_GUEST_VCPUS`]).
    pub guest_vcpus: u8,
    /// `PODFLARE_BOOT_TIMEOUT_SECS` (default 900): boot to agent ready when building a template.
    pub boot_timeout: Duration,
    /// `PODFLARE_POOL_SIZE` (default 0): restored sandboxes kept ready per template.
    pub pool_size: usize,
    /// `PODFLARE_MAX_SANDBOXES` (default 1000).
    pub max_sandboxes: usize,
    /// `PODFLARE_MAX_GUEST_MEMORY_MIB` (default 80% of host RAM): admission limit
    /// on the sum of guest private memory.
    pub max_guest_memory_mib: u64,
    /// `PODFLARE_MEMORY_FLOOR_MIB` (default 5% of host RAM, at least 512):
    /// when guests have dirtied so much that the host's available memory
    /// falls below this, the sandbox holding the most is destroyed.
    pub memory_floor_mib: u64,
    /// `PODFLARE_GUEST_POLL_MS` (default 10, at most 1000): how long the
    /// REPL keeps polling its shared-memory ring after a request before it
    /// sleeps. Back-to-back execs inside it cost the guest no system call;
    /// the guest's vCPU spins meanwhile. 0: sleep at once.
    pub guest_poll: Duration,
    /// `PODFLARE_VCPU_SLICE_MS` (0 to 100; 0: the kernel's own): the
    /// scheduling slice vCPU threads ask for
    /// ([`super::threads::apply_vcpu_slice`] says why). Unset: 20 ms on PVM,
    /// where a tick is ~2 ms of emulated work and the kernel's ~1.4 ms
    /// slices left ~140 guests of a create burst runnable and making no
    /// progress; the kernel's own on hardware KVM, where a tick is cheap.
    /// Each HTTP exec on PVM costs ~0.35 ms more with it (a REPL's vCPU
    /// polling its ring keeps its CPU longer).
    pub vcpu_slice: Option<Duration>,
    /// Sandbox networking: `PODFLARE_NETWORK` (`on`, the default, or
    /// `off`: no sandbox has a path out, whatever it asks), with
    /// `PODFLARE_NET_SUBNET` (default `10.201.0.0/16`: a /30 per sandbox
    /// with egress, on the host side of its namespace), `PODFLARE_NET_DNS`
    /// (the resolver sandboxes use; default the first non-loopback IPv4
    /// `nameserver` of the host's /etc/resolv.conf; `none`: DNS refused)
    /// and `PODFLARE_NET_READY` (default 4: namespaces made ahead).
    pub network: Option<super::hostnet::NetConfig>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a valid value")),
        _ => Ok(default),
    }
}

fn network_from_env() -> Result<Option<super::hostnet::NetConfig>, String> {
    use super::hostnet::NetConfig;
    match env_or("PODFLARE_NETWORK", "on".to_string())?.as_str() {
        "on" => {}
        "off" => return Ok(None),
        v => return Err(format!("PODFLARE_NETWORK={v:?}: on or off")),
    }
    let subnet = env_or("PODFLARE_NET_SUBNET", "10.201.0.0/16".to_string())?;
    let (subnet, prefix) = NetConfig::parse_subnet(&subnet).map_err(|e| format!("PODFLARE_NET_SUBNET: {e}"))?;
    let dns = match std::env::var("PODFLARE_NET_DNS").as_deref().map(str::trim) {
        Ok("none") => None,
        Ok(v) if !v.is_empty() => Some(v.parse().map_err(|_| format!("PODFLARE_NET_DNS={v:?}: an IPv4 address or none"))?),
        _ => NetConfig::resolver_from(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
    };
    Ok(Some(NetConfig { subnet, prefix, dns, ready: env_or("PODFLARE_NET_READY", 4)? }))
}

fn host_mem_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(4096)
}

impl VmmConfig {
    /// Reads the environment. An unparsable value is an error naming the variable.
    pub fn from_env() -> Result<Self, String> {
        let cache_dir = PathBuf::from(env_or("PODFLARE_CACHE", "/var/lib/podflare".to_string())?);
        let kernel = match std::env::var("PODFLARE_KERNEL") {
            Ok(p) if !p.is_empty() => PathBuf::from(p),
            _ => cache_dir.join("kernel/current"),
        };
        let spaces_dir = match std::env::var("PODFLARE_SPACES_DIR") {
            Ok(p) if !p.is_empty() => PathBuf::from(p),
            _ => cache_dir.join("spaces"),
        };
        let templates = env_or("PODFLARE_TEMPLATES", "default,python-datasci".to_string())?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        // The value was already checked by the HTTP settings; anything but
        // `json` is text.
        let format = match std::env::var("PODFLARE_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        };
        Ok(VmmConfig {
            log: Logger::new(format),
            cache_dir,
            spaces_dir,
            ram_build_wait: Duration::from_secs(env_or("PODFLARE_RAM_BUILD_WAIT_SECS", 20)?),
            kernel,
            templates,
            guest_ram_mib: env_or("PODFLARE_GUEST_RAM_MIB", 512)?,
            guest_vcpus: match env_or("PODFLARE_GUEST_VCPUS", 1u8)? {
                // More than one boots on PVM since the hypercall-based PV
                // features are hidden from such guests (`boot::cpuid_for`);
                // `tests/vmm_smp.rs` restores, forks and keeps both busy.
                n @ 1..=MAX_GUEST_VCPUS => n,
                n => return Err(format!("PODFLARE_GUEST_VCPUS={n}: from 1 to {MAX_GUEST_VCPUS}")),
            },
            boot_timeout: Duration::from_secs(env_or("PODFLARE_BOOT_TIMEOUT_SECS", 900)?),
            pool_size: env_or("PODFLARE_POOL_SIZE", 0)?,
            max_sandboxes: env_or("PODFLARE_MAX_SANDBOXES", 1000)?,
            max_guest_memory_mib: env_or("PODFLARE_MAX_GUEST_MEMORY_MIB", host_mem_mib() * 4 / 5)?,
            memory_floor_mib: env_or("PODFLARE_MEMORY_FLOOR_MIB", (host_mem_mib() / 20).max(512))?,
            guest_poll: match env_or("PODFLARE_GUEST_POLL_MS", 10u64)? {
                ms @ 0..=1000 => Duration::from_millis(ms),
                ms => return Err(format!("PODFLARE_GUEST_POLL_MS={ms}: from 0 to 1000")),
            },
            vcpu_slice: match env_or("PODFLARE_VCPU_SLICE_MS", String::new())?.as_str() {
                "" => None,
                v => match v.parse::<u64>() {
                    Ok(ms @ 0..=100) => Some(Duration::from_millis(ms)),
                    _ => return Err(format!("PODFLARE_VCPU_SLICE_MS={v}: from 0 to 100")),
                },
            },
            network: network_from_env()?,
        })
    }

    /// Root filesystem image of a template.
    pub fn rootfs(&self, template: &str) -> PathBuf {
        self.cache_dir.join("rootfs").join(template).join("current/rootfs.ext4")
    }
}

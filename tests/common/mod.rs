//! Helpers shared by the integration tests that boot real VMs.
#![allow(dead_code)]

pub mod exec;
pub mod http;
pub mod netlab;
pub mod process;
pub mod vector;

use std::path::PathBuf;

/// Opens `/dev/kvm`. Where the device exists, failing to open it fails the
/// test; only a machine without KVM skips (and says so).
pub fn kvm_or_skip() -> Option<kvm_ioctls::Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: /dev/kvm does not exist on this machine");
        return None;
    }
    Some(kvm_ioctls::Kvm::new().expect("/dev/kvm exists but cannot be opened"))
}

/// A file with `contents` in a per-process temp directory.
pub fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podflare-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("temp file");
    path
}

/// The build cache (`PODFLARE_CACHE`, default `/var/lib/podflare`).
pub fn cache_dir() -> PathBuf {
    std::env::var("PODFLARE_CACHE").map(PathBuf::from).unwrap_or_else(|_| "/var/lib/podflare".into())
}

/// Entries in a /proc directory (fds, tasks).
pub fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// This process's resident set, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The real HTTP server over real VMs of the `default` template, in this
/// process, on an ephemeral loopback port, auth off.
pub fn real_server(tune: impl FnOnce(&mut podflare_hostd::config::Config)) -> podflare_hostd::api::ServerHandle {
    real_server_logging(tune, |format| podflare_hostd::obs::Logger::memory(format).0)
}

/// [`real_server`] with the logger `logger` makes for the configured format.
pub fn real_server_logging(
    tune: impl FnOnce(&mut podflare_hostd::config::Config),
    logger: impl FnOnce(podflare_hostd::config::LogFormat) -> podflare_hostd::obs::Logger,
) -> podflare_hostd::api::ServerHandle {
    use podflare_hostd::config::{AuthMode, Config, LogFormat};
    use std::sync::Arc;
    let mut vcfg = podflare_hostd::vmm::VmmConfig::from_env().expect("PODFLARE_* settings");
    vcfg.templates = vec!["default".into()];
    vcfg.pool_size = 0;
    let factory = podflare_hostd::vmm::factory::VmFactory::open(vcfg)
        .expect("template snapshot of `default` (run scripts/setup first)");
    let mut cfg = Config { addr: "127.0.0.1:0".into(), log_format: LogFormat::Json, ..Config::default() };
    tune(&mut cfg);
    let log = logger(cfg.log_format);
    let controller = Arc::new(podflare_hostd::sandbox::Controller::new(Arc::new(factory), &cfg, log.clone()));
    let gate = podflare_hostd::api::Gate::new(&AuthMode::LoopbackDev);
    podflare_hostd::api::serve(cfg.bind().expect("bind"), &cfg, gate, controller, log).expect("serve")
}

/// A hand-made guest's VM: 32 MiB, one vCPU, no kernel (the code is loaded
/// by `Vm::boot_code`), `rootfs` as its disk.
pub fn tiny_spec(rootfs: &std::path::Path) -> podflare_hostd::vmm::vm::VmSpec {
    podflare_hostd::vmm::vm::VmSpec {
        kernel: "/nonexistent".into(),
        rootfs: rootfs.to_path_buf(),
        ram_bytes: 32 << 20,
        vcpus: 1,
        backend: podflare_hostd::vmm::Backend::detect(),
        extra_cmdline: String::new(),
        disk: None,
    }
}

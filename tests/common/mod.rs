//! Helpers shared by the integration tests that boot real VMs.
#![allow(dead_code)]

pub mod http;

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

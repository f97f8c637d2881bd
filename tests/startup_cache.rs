//! hostd refuses a cache directory that someone else could write (they
//! could point a sandbox's disk at any host file), before any VM work.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_world_writable_cache_stops_the_start_with_a_fix() {
    let dir = std::env::temp_dir().join(format!("podflare-open-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_podflare-hostd"))
        .env("PODFLARE_CACHE", &dir)
        .env("PODFLARE_HOSTD_ADDR", "127.0.0.1:0")
        .output()
        .expect("run hostd");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a world-writable cache: {stderr}");
    assert!(stderr.contains("writable by group or others") && stderr.contains("chmod go-w"), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

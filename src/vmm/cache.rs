//! The cache directory (`PODFLARE_CACHE`): who may write it, and what a
//! killed run left behind in it.
//!
//! Everything a VM runs comes from here: the kernel, the base images (behind
//! `current` links), the writable disk's file system and the template
//! snapshots. Whoever can write any of
//! these directories can point a sandbox's disk at any file on the host, so
//! hostd refuses to start unless each is owned by root or by hostd's own
//! user and writable by nobody else.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{VmmConfig, VmmError};

/// Mode bits that let group or others write.
const GROUP_OTHER_WRITE: u32 = 0o022;

/// Checks that `path` (if it exists) is owned by root or `uid` and not
/// writable by group or others. Follows links, as the VMM does.
pub fn check_private(path: &Path, uid: u32) -> Result<(), String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if meta.uid() != 0 && meta.uid() != uid {
        return Err(format!(
            "{} is owned by uid {}, not by root or by hostd's user (uid {uid}); fix: chown {uid} {}",
            path.display(),
            meta.uid(),
            path.display()
        ));
    }
    if meta.mode() & GROUP_OTHER_WRITE != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}): anyone who can write it can point a sandbox at any host file; fix: chmod go-w {}",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// The directories and files of the cache a VM's contents come from.
fn trusted_paths(cfg: &VmmConfig) -> Vec<PathBuf> {
    let root = &cfg.cache_dir;
    // `scratch` holds the file system every sandbox's writable disk starts as.
    let mut paths = vec![root.clone(), root.join("kernel"), root.join("rootfs"), root.join("snapshots"), root.join("scratch")];
    paths.push(cfg.kernel.clone());
    if let Some(dir) = cfg.kernel.parent() {
        paths.push(dir.to_path_buf());
    }
    for t in &cfg.templates {
        paths.push(root.join("rootfs").join(t));
        paths.push(root.join("snapshots").join(t));
        let image = cfg.rootfs(t);
        if let Some(dir) = image.parent() {
            paths.push(dir.to_path_buf());
        }
        paths.push(image);
    }
    paths
}

/// Refuses a cache that someone else could write.
pub fn check(cfg: &VmmConfig) -> Result<(), VmmError> {
    let uid = nix::unistd::geteuid().as_raw();
    for p in trusted_paths(cfg) {
        check_private(&p, uid).map_err(|why| VmmError::Config(format!("PODFLARE_CACHE: {why}")))?;
    }
    Ok(())
}

/// Removes what a killed run left: snapshot directories half written by a
/// process that no longer exists (`<key>.tmp<pid>`). Other processes may be
/// writing theirs right now, so only dead writers' are removed. Returns the
/// paths removed.
pub fn remove_leftovers(cfg: &VmmConfig) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(templates) = std::fs::read_dir(cfg.cache_dir.join("snapshots")) else { return removed };
    for t in templates.flatten() {
        let Ok(entries) = std::fs::read_dir(t.path()) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if writer_gone(&path) && std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

/// Whether `path` is a `<name>.tmp<pid>` whose writer no longer runs (a
/// killed run's half-written leftover; a live writer's is left alone).
pub fn writer_gone(path: &Path) -> bool {
    writer_pid(path).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// The pid in a `<key>.tmp<pid>` name.
fn writer_pid(path: &Path) -> Option<u32> {
    path.extension()?.to_str()?.strip_prefix("tmp")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("podflare-cache-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn writable_by_others_is_refused() {
        let uid = nix::unistd::geteuid().as_raw();
        let d = temp("mode");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private(&d, uid).is_ok());
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_private(&d, uid).unwrap_err();
        assert!(err.contains("chmod go-w"), "{err}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check_private(&d, uid).is_err(), "group-writable too");
        assert!(check_private(&d.join("missing"), uid).is_ok(), "what does not exist yet is built by us");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn only_dead_writers_leftovers_go() {
        let root = temp("leftovers");
        let snaps = root.join("snapshots/default");
        std::fs::create_dir_all(snaps.join("abc")).unwrap();
        // pid 0 is never a process; our own pid is alive.
        std::fs::create_dir_all(snaps.join("abc.tmp0")).unwrap();
        let mine = snaps.join(format!("abc.tmp{}", std::process::id()));
        std::fs::create_dir_all(&mine).unwrap();
        let mut cfg = VmmConfig::from_env().unwrap();
        cfg.cache_dir = root.clone();
        let removed = remove_leftovers(&cfg);
        assert_eq!(removed, vec![snaps.join("abc.tmp0")]);
        assert!(snaps.join("abc").is_dir() && mine.is_dir());
        let _ = std::fs::remove_dir_all(&root);
    }
}

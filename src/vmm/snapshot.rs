//! The snapshot file: a framed, versioned, checksummed record of a paused VM.
//!
//! A snapshot is a directory with two files:
//! - `memory`: guest RAM, sparse (zero pages are holes), mapped `MAP_PRIVATE`
//!   by every VM restored from it;
//! - `state`: this module's frame around the JSON of [`SnapshotFile`]:
//!
//! ```text
//! magic "PFSNAP\r\n" | format u32 LE | payload length u64 LE | sha256(payload) | payload
//! ```
//!
//! Loading refuses a wrong magic, an unknown format version, a payload over
//! the size cap, a checksum mismatch, and metadata that does not match this
//! host (backend, CPU model, kernel or image), each with its own error.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::vm::MachineState;
use super::Backend;

const MAGIC: &[u8; 8] = b"PFSNAP\r\n";
/// Bumped on any change to the payload's meaning.
pub const FORMAT_VERSION: u32 = 3;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// Device and vCPU state is a few hundred KiB at most; anything bigger is not ours.
const MAX_PAYLOAD: u64 = 64 << 20;

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a snapshot file, or cut short.
    #[error("snapshot {0} is truncated or not a snapshot file")]
    NotASnapshot(String),
    /// Written by another format version.
    #[error("snapshot {path} has format version {found}, this hostd reads {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
    /// Payload too large.
    #[error("snapshot {0} payload exceeds the size cap")]
    TooLarge(String),
    /// Checksum mismatch.
    #[error("snapshot {0} is corrupt (checksum mismatch)")]
    Corrupt(String),
    /// Payload did not decode.
    #[error("snapshot {path} payload does not decode: {reason}")]
    Decode {
        /// The file.
        path: String,
        /// serde's reason.
        reason: String,
    },
    /// Taken on another backend, CPU, kernel or image.
    #[error("snapshot {path} does not match this host: {what}")]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        what: String,
    },
}

/// What a snapshot was taken from; must equal the restoring host's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Hardware KVM or PVM.
    pub backend: Backend,
    /// `model name` of the host CPU.
    pub cpu_model: String,
    /// Identity of the kernel (content-addressed path, size, mtime).
    pub kernel_id: String,
    /// Identity of the base image.
    pub rootfs_id: String,
    /// Guest RAM bytes (the memory file's size).
    pub ram_bytes: u64,
    /// When taken (Unix seconds), for logs.
    pub taken_unix: u64,
}

/// The payload of a `state` file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotFile {
    /// Where it came from.
    pub meta: SnapshotMeta,
    /// KVM and device state.
    pub machine: MachineState,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.display().to_string(), source }
}

/// Encodes a snapshot into its framed byte form.
pub fn encode(snap: &SnapshotFile) -> Vec<u8> {
    frame(MAGIC, snap)
}

/// Decodes and checks a framed snapshot (`path` only names it in errors).
pub fn decode(bytes: &[u8], path: &str) -> Result<SnapshotFile, SnapshotError> {
    unframe(MAGIC, bytes, path)
}

/// Frames `value` as JSON behind `magic`, the format version, its length
/// and its SHA-256 (snapshot `state` files, frozen spaces' `state` files).
pub fn frame<T: Serialize>(magic: &[u8; 8], value: &T) -> Vec<u8> {
    // Our own plain structs always serialize.
    let payload = serde_json::to_vec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// Checks and decodes what [`frame`] wrote with the same `magic`: a wrong
/// magic, version, length or checksum is refused before any JSON is read.
pub fn unframe<T: serde::de::DeserializeOwned>(magic: &[u8; 8], bytes: &[u8], path: &str) -> Result<T, SnapshotError> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != magic {
        return Err(SnapshotError::NotASnapshot(path.to_string()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path: path.to_string(), found: version });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(path.to_string()));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(SnapshotError::NotASnapshot(path.to_string()));
    }
    if Sha256::digest(payload).as_slice() != &bytes[20..52] {
        return Err(SnapshotError::Corrupt(path.to_string()));
    }
    serde_json::from_slice(payload)
        .map_err(|e| SnapshotError::Decode { path: path.to_string(), reason: e.to_string() })
}

/// Bytes a framed file may have at most.
pub const MAX_FRAMED_BYTES: u64 = MAX_PAYLOAD + HEADER_LEN as u64;

/// Checks a decoded snapshot's metadata against what this host expects
/// (backend, CPU, kernel, base image, RAM size).
pub fn check_meta(m: &SnapshotMeta, path: &str, expect: &SnapshotMeta) -> Result<(), SnapshotError> {
    let what = if m.backend != expect.backend {
        Some(format!("taken on {} KVM, this host is {}", m.backend.name(), expect.backend.name()))
    } else if m.cpu_model != expect.cpu_model {
        Some(format!("CPU {:?}, this host has {:?}", m.cpu_model, expect.cpu_model))
    } else if m.kernel_id != expect.kernel_id {
        Some("another guest kernel".to_string())
    } else if m.rootfs_id != expect.rootfs_id {
        Some("another base image".to_string())
    } else if m.ram_bytes != expect.ram_bytes {
        Some(format!("{} bytes of RAM, want {}", m.ram_bytes, expect.ram_bytes))
    } else {
        None
    };
    match what {
        Some(what) => Err(SnapshotError::Mismatch { path: path.to_string(), what }),
        None => Ok(()),
    }
}

/// Writes the `state` file atomically (temp file, fsync, rename).
pub fn write_state(path: &Path, snap: &SnapshotFile) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&encode(snap)).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a `state` file and checks it against what this host expects.
pub fn read_state(path: &Path, expect: &SnapshotMeta) -> Result<SnapshotFile, SnapshotError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.len() > MAX_FRAMED_BYTES {
        return Err(SnapshotError::TooLarge(path.display().to_string()));
    }
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode_state(&bytes, &path.display().to_string(), expect)
}

/// The checks of [`read_state`] on bytes already read: the frame, then the
/// metadata against what this host expects (`path` only names it in errors).
pub fn decode_state(bytes: &[u8], path: &str, expect: &SnapshotMeta) -> Result<SnapshotFile, SnapshotError> {
    let snap = decode(bytes, path)?;
    check_meta(&snap.meta, path, expect)?;
    Ok(snap)
}

/// The host CPU's model name, recorded in snapshots.
pub fn host_cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_rejects_each_kind_of_damage() {
        // A payload-free frame is enough to test the envelope.
        let payload = b"{}";
        let mut good = Vec::new();
        good.extend_from_slice(MAGIC);
        good.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        good.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        good.extend_from_slice(&Sha256::digest(payload));
        good.extend_from_slice(payload);
        // The envelope is fine; the payload is not a SnapshotFile.
        assert!(matches!(decode(&good, "x"), Err(SnapshotError::Decode { .. })));

        assert!(matches!(decode(&good[..10], "x"), Err(SnapshotError::NotASnapshot(_))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad, "x"), Err(SnapshotError::NotASnapshot(_))));
        let mut bad = good.clone();
        bad[8] = 99;
        assert!(matches!(decode(&bad, "x"), Err(SnapshotError::Version { found: 99, .. })));
        let mut bad = good.clone();
        *bad.last_mut().unwrap() = b']';
        assert!(matches!(decode(&bad, "x"), Err(SnapshotError::Corrupt(_))));
        let mut bad = good.clone();
        bad[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&bad, "x"), Err(SnapshotError::TooLarge(_))));
        let truncated = &good[..good.len() - 1];
        assert!(matches!(decode(truncated, "x"), Err(SnapshotError::NotASnapshot(_))));
    }
}

//! Spaces: sandboxes frozen to disk, resumed later as new sandboxes.
//!
//! A space is a directory `$PODFLARE_CACHE/spaces/<id>/` holding `memory`
//! (guest RAM as large as the VM's, holding only the VM's own pages at
//! their guest offsets, holes elsewhere: every other page is the
//! template's), `disk` (its writable disk, sparse) and `state` (framed and
//! checksummed like a snapshot's: the space's record, the template
//! snapshot's identity, vCPU/VM/device state).
//! It is written under `<id>.tmp<pid>`, both files fsynced, renamed into
//! place and the directory fsynced, so a listed space is whole; a `.tmp`
//! left by a killed run is removed at the next start. The record carries
//! the CRC-32 of the memory runs and of the disk's data: a resume reads
//! them back and refuses a space whose bytes changed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::memory::{self, PageRun};
use super::snapshot::{self, SnapshotError, SnapshotMeta};
use super::vm::{Frozen, MachineState};
use crate::obs::Logger;

const SPACE_MAGIC: &[u8; 8] = b"PFSPACE\n";

/// What can go wrong with a space.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// No space has this id (never was, consumed, deleted, or dropped).
    #[error("unknown space {0:?}")]
    Unknown(String),
    /// What it needs is not ready yet (its template's RAM size is being
    /// built); it stays for a later try.
    #[error("{0}")]
    NotYet(String),
    /// Its template (in its RAM size) is not served by this host as it is
    /// configured now; the space stays (a host serving it can resume it).
    #[error("{0}")]
    Unservable(String),
    /// Another request is resuming or deleting it right now.
    #[error("space {0:?} is being resumed or deleted by another request")]
    Busy(String),
    /// Its files are damaged or belong to another build; it was removed.
    #[error("space {id:?} cannot be resumed and was removed: {why}")]
    Unusable {
        /// The space.
        id: String,
        /// What is wrong with it.
        why: String,
    },
    /// Writing or reading its files failed (disk full, I/O).
    #[error("space {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpaceError + '_ {
    move |source| SpaceError::Io { path: path.display().to_string(), source }
}

/// What a space is, apart from its VM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpaceRecord {
    /// `spc_<32 hex>`.
    pub id: String,
    /// The template it was restored from (its snapshot's memory lies under
    /// the space's pages).
    pub template: String,
    /// Its guest RAM (MiB): which size of the template lies under it.
    pub ram_mib: u64,
    /// The sandbox it was frozen from.
    pub source_sandbox: String,
    /// When it was frozen (Unix seconds).
    pub created_unix: u64,
    /// Guest pages `memory` holds.
    pub runs: Vec<PageRun>,
    /// Non-zero bytes in `memory`.
    pub data_bytes: u64,
    /// CRC-32 of the runs' bytes in `memory`, in run order.
    pub memory_crc32: u32,
    /// CRC-32 of `disk` ([`super::scratch::checksum`]).
    pub disk_crc32: u32,
    /// The size its disk's file system was grown to (the device's write
    /// limit), for the listing; the device state carries it too.
    pub disk_bytes: u64,
    /// The channel's next stream number.
    pub next_stream: u32,
    /// The sandbox layer's own record (limits, flags, terminal sessions).
    pub sandbox: Value,
}

#[derive(Serialize, Deserialize)]
struct SpaceState {
    record: SpaceRecord,
    meta: SnapshotMeta,
    machine: MachineState,
}

/// Why [`Spaces::take`] refused a space, and so what becomes of it.
enum Refusal {
    /// Its template is being built: it stays.
    Later(String),
    /// Its template is not served here: it stays.
    Keep(String),
    /// Its files are damaged or belong to another build: it is removed.
    Gone(String),
}
use Refusal::{Gone, Keep, Later};

/// Why a space's template could not be had for a resume.
pub enum TemplateLookup {
    /// Not served here, or it failed to build: the space cannot be resumed.
    Missing(String),
    /// Being built: the space stays, a later resume may find it.
    NotYet(String),
}

/// A space read back for a resume: checked against the template snapshot
/// it must lie over, its memory file open.
pub struct Loaded {
    /// Its record.
    pub record: SpaceRecord,
    /// vCPU, VM and device state.
    pub machine: MachineState,
    /// `memory`, open read-only.
    pub memory: File,
    /// `disk`, open read-only (a resume copies it).
    pub disk: File,
}

struct Entry {
    record: SpaceRecord,
    bytes_on_disk: u64,
    busy: bool,
}

/// Every space of this host.
pub struct Spaces {
    dir: PathBuf,
    index: Mutex<BTreeMap<String, Entry>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Bytes a directory's files take on disk (allocated blocks: holes are free).
fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

fn fsync_dir(dir: &Path) -> Result<(), SpaceError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl Spaces {
    /// The store under `dir` (created, mode 0700): half-written spaces a
    /// killed run left (`<id>.tmp<pid>`, that pid gone) are removed, every other one is read and checked
    /// (frame, checksum, memory file size); one that fails is removed too,
    /// with a log line saying why.
    pub fn open(dir: PathBuf, log: &Logger) -> Result<Spaces, SpaceError> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        let mut index = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.contains(".tmp") {
                // Another hostd on this directory may be writing it now.
                if super::cache::writer_gone(&path) && std::fs::remove_dir_all(&path).is_ok() {
                    log.info("removed a space a killed run left half written", &[("dir", json!(path.display().to_string()))]);
                }
                continue;
            }
            match read_state(&path, &name) {
                Ok(st) => {
                    let bytes_on_disk = disk_bytes(&path);
                    index.insert(name, Entry { record: st.record, bytes_on_disk, busy: false });
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&path);
                    log.warn("removed an unreadable space", &[("space", json!(name)), ("cause", json!(e.to_string()))]);
                }
            }
        }
        if !index.is_empty() {
            log.info("spaces on disk", &[("count", json!(index.len())), ("dir", json!(dir.display().to_string()))]);
        }
        Ok(Spaces { dir, index: Mutex::new(index) })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The listing of `GET /v1/capacity`, oldest first.
    pub fn list(&self) -> Vec<Value> {
        let index = self.index();
        let mut all: Vec<&Entry> = index.values().collect();
        all.sort_by_key(|e| e.record.created_unix);
        all.iter()
            .map(|e| {
                json!({
                    "id": e.record.id,
                    "template": e.record.template,
                    "ram_mib": e.record.ram_mib,
                    "disk_bytes": e.record.disk_bytes,
                    "bytes_on_disk": e.bytes_on_disk,
                    "created_unix": e.record.created_unix,
                    "source_sandbox": e.record.source_sandbox,
                })
            })
            .collect()
    }

    /// Bytes all spaces take on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        self.index().values().map(|e| e.bytes_on_disk).sum()
    }

    /// Freezes a VM into a new space: `freeze` writes the VM's pages and
    /// its disk into the two files it is given and returns the rest (the VM
    /// paused); this makes the files durable and lists the space. On an error nothing is left
    /// on disk and nothing is listed (the caller lets the VM run on).
    #[allow(clippy::too_many_arguments)]
    pub fn freeze(
        &self,
        template: &str,
        ram_mib: u64,
        meta: &SnapshotMeta,
        source_sandbox: &str,
        sandbox: Value,
        disk_size: u64,
        freeze: impl FnOnce(File, &File) -> Result<Frozen, super::VmmError>,
    ) -> Result<(SpaceRecord, std::time::Duration, u64), super::VmmError> {
        let id = format!("spc_{}", random_hex32().map_err(super::VmmError::Io)?);
        let tmp = self.dir.join(format!("{id}.tmp{}", std::process::id()));
        let written = (|| {
            std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
            let mem_path = tmp.join("memory");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&mem_path)
                .map_err(io_err(&mem_path))?;
            let disk_path = tmp.join("disk");
            let disk =
                std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&disk_path).map_err(io_err(&disk_path))?;
            // The disk is written and fsynced by the VM while it is paused.
            let frozen = freeze(file.try_clone().map_err(io_err(&mem_path))?, &disk).map_err(|e| SpaceError::Io {
                path: mem_path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let crc = memory::checksum_runs(&file, &frozen.runs)
                .map_err(|e| SpaceError::Io { path: mem_path.display().to_string(), source: std::io::Error::other(e.to_string()) })?;
            file.sync_all().map_err(io_err(&mem_path))?;
            let record = SpaceRecord {
                id: id.clone(),
                template: template.to_string(),
                ram_mib,
                source_sandbox: source_sandbox.to_string(),
                created_unix: now_unix(),
                runs: frozen.runs.clone(),
                data_bytes: frozen.data_bytes,
                memory_crc32: crc,
                disk_crc32: frozen.disk_crc32,
                disk_bytes: disk_size,
                next_stream: frozen.next_stream,
                sandbox,
            };
            let paused = frozen.paused;
            let state = SpaceState { record, meta: meta.clone(), machine: frozen.machine };
            let state_path = tmp.join("state");
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&state_path).map_err(io_err(&state_path))?;
            std::io::Write::write_all(&mut f, &snapshot::frame(SPACE_MAGIC, &state)).map_err(io_err(&state_path))?;
            f.sync_all().map_err(io_err(&state_path))?;
            fsync_dir(&tmp)?;
            let dest = self.dir.join(&id);
            std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
            fsync_dir(&self.dir)?;
            Ok::<_, SpaceError>((state.record, paused, disk_bytes(&dest)))
        })();
        match written {
            Ok((record, paused, bytes)) => {
                self.index().insert(id, Entry { record: record.clone(), bytes_on_disk: bytes, busy: false });
                Ok((record, paused, bytes))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(super::VmmError::Guest(e.to_string()))
            }
        }
    }

    /// Takes `id` for a resume: it stays listed but busy until
    /// [`Spaces::consumed`] or [`Spaces::release`]. Its state is read and
    /// checked: the frame, the template snapshot it must lie over
    /// (`template` gives the snapshot metadata of a template this host
    /// serves), the memory file's size and checksum. A space that fails is
    /// removed and the error says why.
    pub fn take(&self, id: &str, template: impl Fn(&str, u64) -> Result<SnapshotMeta, TemplateLookup>) -> Result<Loaded, SpaceError> {
        {
            let mut index = self.index();
            let e = index.get_mut(id).ok_or_else(|| SpaceError::Unknown(id.to_string()))?;
            if e.busy {
                return Err(SpaceError::Busy(id.to_string()));
            }
            e.busy = true;
        }
        let dir = self.dir.join(id);
        let checked = (|| {
            let st = read_state(&dir, id).map_err(|e| Gone(e.to_string()))?;
            let expect = template(&st.record.template, st.record.ram_mib).map_err(|e| match e {
                TemplateLookup::NotYet(why) => Later(why),
                TemplateLookup::Missing(why) => Keep(format!(
                    "space {id:?} cannot be resumed here: its template {:?} in {} MiB is not available ({why}); the space is kept",
                    st.record.template, st.record.ram_mib
                )),
            })?;
            let bad = |why: String| Err::<Loaded, Refusal>(Gone(why));
            if let Err(e) = snapshot::check_meta(&st.meta, &dir.display().to_string(), &expect) {
                return bad(e.to_string());
            }
            let path = dir.join("memory");
            let memory = File::open(&path).map_err(|e| Gone(format!("{}: {e}", path.display())))?;
            let len = memory.metadata().map_err(|e| Gone(format!("{}: {e}", path.display())))?.len();
            if len != st.meta.ram_bytes {
                return bad(format!("its memory file is {len} bytes, the guest has {}", st.meta.ram_bytes));
            }
            let pages = st.meta.ram_bytes / memory::PAGE_BYTES;
            if st.record.runs.iter().any(|r| r.pages == 0 || r.first.checked_add(r.pages).is_none_or(|end| end > pages)) {
                return bad("its page runs lie outside guest RAM".into());
            }
            let crc = memory::checksum_runs(&memory, &st.record.runs).map_err(|e| Gone(e.to_string()))?;
            if crc != st.record.memory_crc32 {
                return bad("its memory file does not match its checksum".into());
            }
            let path = dir.join("disk");
            let disk = File::open(&path).map_err(|e| Gone(format!("{}: {e}", path.display())))?;
            let len = disk.metadata().map_err(|e| Gone(format!("{}: {e}", path.display())))?.len();
            if len != super::scratch::CAPACITY_BYTES {
                return bad(format!("its disk file is {len} bytes, the device has {}", super::scratch::CAPACITY_BYTES));
            }
            let crc = super::scratch::checksum(&disk).map_err(|e| Gone(format!("{}: {e}", path.display())))?;
            if crc != st.record.disk_crc32 {
                return bad("its disk file does not match its checksum".into());
            }
            Ok(Loaded { record: st.record, machine: st.machine, memory, disk })
        })();
        checked.map_err(|e| match e {
            Later(why) => {
                self.release(id);
                SpaceError::NotYet(why)
            }
            Keep(why) => {
                self.release(id);
                SpaceError::Unservable(why)
            }
            Gone(why) => {
                self.remove(id);
                SpaceError::Unusable { id: id.to_string(), why }
            }
        })
    }

    /// A resume from `id` succeeded: the space is gone (a running VM may
    /// still map its memory file; the kernel keeps it until then).
    pub fn consumed(&self, id: &str) {
        self.remove(id);
    }

    /// A resume from `id` failed on our side: the space stays.
    pub fn release(&self, id: &str) {
        if let Some(e) = self.index().get_mut(id) {
            e.busy = false;
        }
    }

    /// `DELETE /v1/spaces/{id}`.
    pub fn delete(&self, id: &str) -> Result<(), SpaceError> {
        {
            let index = self.index();
            let e = index.get(id).ok_or_else(|| SpaceError::Unknown(id.to_string()))?;
            if e.busy {
                return Err(SpaceError::Busy(id.to_string()));
            }
        }
        self.remove(id);
        Ok(())
    }

    fn remove(&self, id: &str) {
        self.index().remove(id);
        let dir = self.dir.join(id);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = fsync_dir(&self.dir);
    }
}

fn read_state(dir: &Path, id: &str) -> Result<SpaceState, SnapshotError> {
    let path = dir.join("state");
    let name = path.display().to_string();
    let io = |source| SnapshotError::Io { path: name.clone(), source };
    let len = std::fs::metadata(&path).map_err(io)?.len();
    if len > snapshot::MAX_FRAMED_BYTES {
        return Err(SnapshotError::TooLarge(name));
    }
    let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io { path: name.clone(), source })?;
    let st: SpaceState = snapshot::unframe(SPACE_MAGIC, &bytes, &name)?;
    if st.record.id != id {
        return Err(SnapshotError::Decode { path: name, reason: format!("it names space {:?}", st.record.id) });
    }
    let mem = dir.join("memory");
    let mem_len = std::fs::metadata(&mem).map_err(|source| SnapshotError::Io { path: mem.display().to_string(), source })?.len();
    if mem_len != st.meta.ram_bytes {
        return Err(SnapshotError::NotASnapshot(format!("{} ({mem_len} bytes, want {})", mem.display(), st.meta.ram_bytes)));
    }
    let disk = dir.join("disk");
    let disk_len = std::fs::metadata(&disk).map_err(|source| SnapshotError::Io { path: disk.display().to_string(), source })?.len();
    if disk_len != super::scratch::CAPACITY_BYTES {
        return Err(SnapshotError::NotASnapshot(format!("{} ({disk_len} bytes, want {})", disk.display(), super::scratch::CAPACITY_BYTES)));
    }
    Ok(st)
}

fn random_hex32() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex(&b))
}

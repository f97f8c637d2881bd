//! Persist: save a running VM into a snapshot directory, and restore VMs
//! from one. Templates, fork children and (later) spaces all go through here.
//!
//! A snapshot directory holds `state` (see [`super::snapshot`]), `memory`
//! (guest RAM as a sparse file) and `disk` (the writable disk at the same
//! instant, sparse; see [`super::scratch`]). It is written under a temporary name and
//! renamed into place, so a reader sees all of it or nothing.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::Kvm;

use super::scratch::{self, ScratchDisk};
use super::snapshot::{self, SnapshotFile, SnapshotMeta};
use super::vm::{self, Disks, Vm};
use super::{memory, VmmError};

/// Pauses `vm`, writes its snapshot (state + sparse memory) to `dir`
/// atomically, and leaves the VM paused. Used for templates and for
/// snapshots of running sandboxes.
pub fn save_vm(vm: &Vm, dir: &Path, mut meta: SnapshotMeta) -> Result<SnapshotFile, VmmError> {
    vm.pause()?;
    let machine = vm.save_state()?;
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| VmmError::File { path: tmp.display().to_string(), source: e })?;
    memory::write_sparse(vm.memory(), &tmp.join("memory"))?;
    // Paused, so the device thread has nothing to serve: the disk is the
    // one the memory just written saw.
    let disk_path = tmp.join("disk");
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&disk_path)
        .and_then(|f| vm.disk().write_into(&f))
        .map_err(|e| VmmError::File { path: disk_path.display().to_string(), source: e });
    disk?;
    meta.taken_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    meta.ram_bytes = memory::ram_bytes(vm.memory());
    let snap = SnapshotFile { meta, machine };
    snapshot::write_state(&tmp.join("state"), &snap)?;
    let _ = std::fs::remove_dir_all(dir);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| VmmError::File { path: parent.display().to_string(), source: e })?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| VmmError::File { path: dir.display().to_string(), source: e })?;
    Ok(snap)
}

/// Restores a VM from a snapshot directory written by [`save_vm`] and
/// resumes it. The memory file is mapped private: nothing is copied; the
/// disk is copied (its data only) into an unnamed file beside the snapshot.
pub fn restore_vm_from(kvm: &Kvm, name: &str, rootfs: &Path, dir: &Path, expect: &SnapshotMeta) -> Result<Vm, VmmError> {
    let snap = snapshot::read_state(&dir.join("state"), expect)?;
    let path = dir.join("memory");
    let file = File::open(&path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })?;
    let disk = disk_copy(&dir.join("disk"), dir.parent().unwrap_or(dir))?;
    restore(kvm, name, Disks { rootfs: Arc::new(vm::open_rootfs(rootfs)?), disk }, Arc::new(file), &snap)
}

/// A VM's own copy of the disk file at `path`, as an unnamed file in `dir`.
/// Its write limit comes from the device state restored with it.
pub fn disk_copy(path: &Path, dir: &Path) -> Result<ScratchDisk, VmmError> {
    let err = |p: &Path| {
        let p = p.display().to_string();
        move |source| VmmError::File { path: p, source }
    };
    let base = File::open(path).map_err(err(path))?;
    ScratchDisk::copy_of(&base, dir, scratch::BASE_FS_BYTES).map_err(err(dir))
}

/// Restores one VM from `snap` with `memory` (the snapshot's memory file,
/// mapped `MAP_PRIVATE`: pages stay shared until the guest writes them) and
/// `disks` (the very base image the snapshot was taken with, a copy of its
/// writable disk), and resumes it. Every create comes through here.
pub fn restore(kvm: &Kvm, name: &str, disks: Disks, memory: Arc<File>, snap: &SnapshotFile) -> Result<Vm, VmmError> {
    let mem = memory::private_file_mapping(memory, snap.meta.ram_bytes)?;
    let vm = Vm::restore(kvm, name, disks, mem, &snap.machine)?;
    vm.resume()?;
    Ok(vm)
}


/// Restores one fork child of the VM `source` was captured from: the
/// template's memory file mapped `MAP_PRIVATE` with the source's image layers
/// laid over it (both shared until the child writes), its saved state, a channel
/// continuing the parent's. The child stays paused: a fork resumes all its
/// children at the end, so running ones do not slow the restore of the rest.
pub fn restore_fork_child(
    kvm: &Kvm,
    name: &str,
    rootfs: Arc<File>,
    template_memory: Arc<File>,
    source: &vm::ForkSource,
) -> Result<Vm, VmmError> {
    let disk = source.disk.copy().map_err(|e| VmmError::Guest(format!("copying the fork's disk: {e}")))?;
    let mem = memory::private_file_mapping(template_memory, source.ram_bytes)?;
    for (run, k) in &source.plan {
        let layer = source.layers.get(*k).ok_or_else(|| memory::MemoryError::Map(format!("fork plan names layer {k} of {}", source.layers.len())))?;
        // SAFETY: `mem` is a fresh mapping no VM uses yet and nobody
        // references.
        unsafe { memory::map_image_runs(&mem, layer, std::slice::from_ref(run)) }?;
    }
    Vm::restore_fork_child(kvm, name, Disks { rootfs, disk }, mem, source)
}

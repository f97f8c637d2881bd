//! Persist: save a running VM into a snapshot directory, and restore VMs
//! from one. Templates, fork children and (later) spaces all go through here.
//!
//! A snapshot directory holds `state` (see [`super::snapshot`]) and `memory`
//! (guest RAM as a sparse file). It is written under a temporary name and
//! renamed into place, so a reader sees all of it or nothing.

use std::fs::File;
use std::path::Path;

use kvm_ioctls::Kvm;

use super::snapshot::{self, SnapshotFile, SnapshotMeta};
use super::vm::{self, Vm};
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
/// resumes it. The memory file is mapped private: nothing is copied.
pub fn restore_vm_from(kvm: &Kvm, name: &str, rootfs: &Path, dir: &Path, expect: &SnapshotMeta) -> Result<Vm, VmmError> {
    let snap = snapshot::read_state(&dir.join("state"), expect)?;
    let path = dir.join("memory");
    let file = File::open(&path).map_err(|e| VmmError::File { path: path.display().to_string(), source: e })?;
    restore(kvm, name, vm::open_rootfs(rootfs)?, file, &snap)
}

/// Restores one VM from `snap` with `memory` (the snapshot's memory file,
/// mapped `MAP_PRIVATE`: pages stay shared until the guest writes them) and
/// `rootfs` (the very image the snapshot was taken with), and resumes it.
/// Every create, fork child and resumed space comes through here.
pub fn restore(kvm: &Kvm, name: &str, rootfs: File, memory: File, snap: &SnapshotFile) -> Result<Vm, VmmError> {
    let mem = memory::private_file_mapping(memory, snap.meta.ram_bytes)?;
    let vm = Vm::restore(kvm, name, rootfs, mem, &snap.machine)?;
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
    rootfs: File,
    template_memory: File,
    source: &vm::ForkSource,
) -> Result<Vm, VmmError> {
    let mem = memory::private_file_mapping(template_memory, source.ram_bytes)?;
    for (run, k) in &source.plan {
        let layer = source.layers.get(*k).ok_or_else(|| memory::MemoryError::Map(format!("fork plan names layer {k} of {}", source.layers.len())))?;
        // SAFETY: `mem` is a fresh mapping no VM uses yet and nobody
        // references.
        unsafe { memory::map_image_runs(&mem, layer, std::slice::from_ref(run)) }?;
    }
    Vm::restore_fork_child(kvm, name, rootfs, mem, source)
}

//! The virtual machine monitor: KVM VMs, vCPUs, boot, snapshot and restore.
//!
//! Code map: `memory` (guest RAM and the KVM slot: the only memory `unsafe`),
//! `boot` (Linux 64-bit boot protocol, CPUID, MSRs), `vcpu` (vCPU threads),
//! `state` (KVM state save/restore), `vm` (one VM: fds, devices, threads),
//! `snapshot` (the framed snapshot file), `templates` (template snapshots,
//! restore-on-create, warm pool, admission: the `GuestFactory`).

pub mod boot;
pub mod channel;
pub mod config;
pub mod device_manager;
pub mod memory;
pub mod snapshot;
pub mod state;
pub mod templates;
pub mod vcpu;
pub mod vm;

use std::sync::{Arc, Mutex};

use channel::Channel;
use crate::guest::GuestFactory;
pub use config::VmmConfig;

/// Which kind of KVM this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Backend {
    /// Hardware virtualization (VMX/SVM).
    Hardware,
    /// PVM: software virtualization with an emulated guest kernel mode.
    Pvm,
}

impl Backend {
    /// Detects the backend: the `kvm_pvm` module is loaded on PVM hosts.
    pub fn detect() -> Backend {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            Backend::Pvm
        } else {
            Backend::Hardware
        }
    }

    /// Short name for logs and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Hardware => "hardware",
            Backend::Pvm => "pvm",
        }
    }
}

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` is missing or unusable.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A file we need is missing or unreadable.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Boot setup.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// KVM state save/restore.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Device setup.
    #[error("device: {0}")]
    Device(#[from] crate::devices::DeviceError),
    /// Snapshot file.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A vCPU thread misbehaved.
    #[error("vCPU: {0}")]
    Vcpu(String),
    /// The guest did not come up or answer.
    #[error("guest: {0}")]
    Guest(String),
    /// Bad settings.
    #[error("configuration: {0}")]
    Config(String),
    /// OS-level failure.
    #[error("I/O: {0}")]
    Io(#[source] std::io::Error),
}

/// Running, shut down, or failed: shared by a VM's threads.
pub struct VmStatus {
    state: Mutex<Option<String>>,
    channel: Channel,
}

impl VmStatus {
    fn new(channel: Channel) -> Self {
        VmStatus { state: Mutex::new(None), channel }
    }

    /// Records a clean stop (guest powered off or reset).
    pub fn exit(&self, why: &str) {
        self.set(why.to_string());
    }

    /// Records a failure of this VM only; open execs end with an error.
    pub fn fail(&self, why: String) {
        self.set(why);
    }

    fn set(&self, why: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(why.clone());
        }
        drop(s);
        self.channel.fail(&why);
    }

    /// Why the VM stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Opens `/dev/kvm`, prepares (or loads cached) template snapshots and
/// returns the factory the sandbox manager creates guests with.
pub fn start_factory(cfg: VmmConfig) -> Result<Arc<dyn GuestFactory>, VmmError> {
    let factory = templates::VmFactory::open(cfg)?;
    Ok(Arc::new(factory))
}

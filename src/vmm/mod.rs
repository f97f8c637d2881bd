//! The virtual machine monitor: KVM VMs, vCPUs, boot, snapshot and restore.
//!
//! Code map: `memory` (guest RAM and the KVM slot: the only memory `unsafe`),
//! `boot` (Linux 64-bit boot protocol, CPUID, MSRs), `mptable` (the MP
//! table: local APICs, IO-APIC, interrupt wiring), `vcpu` (vCPU threads),
//! `state` (KVM state save/restore), `vm` (one VM's lifecycle),
//! `device_manager` (the device table, typed device state, the device
//! thread), `channel` (host side of the agent protocol), `snapshot` (the
//! framed snapshot file), `persist` (save a VM, the one restore path),
//! `template` (template snapshots), `factory` (the `GuestFactory`: restore on
//! create, warm pool), `admission` (admission and memory pressure), `cache`
//! (the cache directory's safety and leftovers).

pub mod admission;
pub mod boot;
pub mod cache;
pub mod channel;
pub mod config;
pub mod device_manager;
pub mod memory;
pub mod mptable;
pub mod snapshot;
pub mod sized;
pub mod space;
pub mod state;
pub mod factory;
pub mod hostnet;
pub mod persist;
pub mod scratch;
pub mod template;
pub mod threads;
pub mod vcpu;
pub mod vm;

use std::sync::{Arc, Mutex};

use channel::Channel;
use serde_json::json;

use crate::guest::GuestFactory;
use crate::obs::{Level, Logger};
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
    /// A VM thread could not install its seccomp filter (it did not run).
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Sandbox networking on the host.
    #[error(transparent)]
    Net(#[from] hostnet::NetError),
}

/// Who a VM is in log lines: its name, the sandbox it serves, the logger.
struct VmLabel {
    log: Logger,
    sandbox: Option<String>,
}

/// Running, shut down, or failed: shared by a VM's threads.
pub struct VmStatus {
    state: Mutex<Option<String>>,
    channel: Channel,
    vm: String,
    label: Mutex<VmLabel>,
    /// KVM_RUN returns that hostd handled (device accesses, halts): the
    /// exits of a VM that reach user space, counted for benchmarks.
    exits: std::sync::atomic::AtomicU64,
}

impl VmStatus {
    fn new(vm: &str, channel: Channel) -> Self {
        VmStatus {
            state: Mutex::new(None),
            channel,
            vm: vm.to_string(),
            // Until labelled, lines go to stderr as text.
            label: Mutex::new(VmLabel { log: Logger::new(crate::config::LogFormat::Text), sandbox: None }),
            exits: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sets the logger and the sandbox id this VM's lines carry.
    pub fn label(&self, log: Logger, sandbox: Option<String>) {
        *self.label.lock().unwrap_or_else(|p| p.into_inner()) = VmLabel { log, sandbox };
    }

    /// The sandbox id this VM serves, if labelled with one.
    pub fn sandbox(&self) -> Option<String> {
        self.label.lock().unwrap_or_else(|p| p.into_inner()).sandbox.clone()
    }

    /// Records a clean stop (guest powered off or reset).
    pub fn exit(&self, why: &str) {
        if self.set(why.to_string()) {
            self.log(Level::Info, "VM stopped", why);
        }
    }

    /// Records a failure of this VM only; open execs end with an error.
    pub fn fail(&self, why: String) {
        if self.set(why.clone()) {
            self.log(Level::Error, "VM failed", &why);
        }
    }

    fn log(&self, level: Level, msg: &str, cause: &str) {
        let label = self.label.lock().unwrap_or_else(|p| p.into_inner());
        let sandbox = label.sandbox.as_deref().map_or(serde_json::Value::Null, |s| json!(s));
        label.log.log(level, msg, &[("vm", json!(self.vm)), ("sandbox", sandbox), ("cause", json!(cause))]);
    }

    /// Records the first stop reason; true if this call set it.
    fn set(&self, why: String) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let first = s.is_none();
        if first {
            *s = Some(why.clone());
        }
        drop(s);
        self.channel.fail(&why);
        first
    }

    /// Counts one exit that reached hostd.
    pub fn count_exit(&self) {
        self.exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Exits that reached hostd so far (all vCPUs).
    pub fn exits(&self) -> u64 {
        self.exits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the VM stopped, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Opens `/dev/kvm`, prepares (or loads cached) template snapshots and
/// returns the factory the sandbox manager creates guests with.
pub fn start_factory(cfg: VmmConfig) -> Result<Arc<dyn GuestFactory>, VmmError> {
    let factory = factory::VmFactory::open(cfg)?;
    Ok(Arc::new(factory))
}

//! The virtual machine monitor: KVM VMs, vCPUs, boot, snapshot and restore.

pub mod config;

use std::sync::Arc;

use crate::sandbox::vm_seam::GuestFactory;
pub use config::VmmConfig;

/// Errors of the VMM as a whole.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Not built yet.
    #[error("the VMM is not available: {0}")]
    Unavailable(String),
}

/// Opens `/dev/kvm`, prepares (or loads cached) template snapshots and
/// returns the factory the sandbox manager creates guests with.
pub fn start_factory(cfg: VmmConfig) -> Result<Arc<dyn GuestFactory>, VmmError> {
    let _ = cfg;
    Err(VmmError::Unavailable("work in progress".into()))
}

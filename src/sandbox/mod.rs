//! Sandboxes: registry, lifecycle, exec queue, replay, and the seam to guests.

pub mod vm_seam;

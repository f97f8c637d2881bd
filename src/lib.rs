//! podflare-hostd: an HTTP host agent that is its own KVM virtual machine monitor.
//!
//! Code map: `config` (environment, the loopback rule), `api` (HTTP transport,
//! auth gate, router), `sandbox` (registry, lifecycle, pool, exec queue),
//! `vmm` (KVM: memory, vCPUs, boot, snapshot), `devices` (bus, serial, virtio),
//! `channel` (host side of the guest agent protocol).
#![warn(missing_docs)]

pub mod api;
pub mod channel;
pub mod config;
pub mod devices;
pub mod sandbox;
pub mod vmm;

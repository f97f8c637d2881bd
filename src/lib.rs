//! podflare-hostd: an HTTP host agent that is its own KVM virtual machine monitor.
//!
//! Layers point down only: `api` (HTTP transport, auth gate, router) ->
//! `sandbox` (registry, lifecycle, exec queue, replay) -> `vmm` (KVM: memory,
//! vCPUs, boot, snapshot, persist, templates, the guest channel) -> `devices`
//! (bus, serial, virtio). Neutral, usable from every layer: `config`
//! (environment, the loopback rule), `guest` (the seam between the sandbox
//! layer and a running guest, and the bounded streams guest output travels
//! in), `obs` (logging), `seccomp` (the filters each thread kind installs).
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod devices;
pub mod guest;
pub mod obs;
pub mod sandbox;
pub mod seccomp;
pub mod vmm;

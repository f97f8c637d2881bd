//! Observability: log lines in the operator's chosen format, and the
//! readiness notification a service manager waits for. Neutral: every layer
//! may use it, and it uses none of them.

pub mod log;
pub mod notify;

pub use log::{Level, Logger};

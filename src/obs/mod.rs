//! Observability: log lines in the operator's chosen format, metrics, and
//! the readiness notification a service manager waits for. Neutral: every layer
//! may use it, and it uses none of them.

pub mod log;
pub mod metrics;
pub mod notify;

pub use log::{Level, Logger};
pub use metrics::Metrics;

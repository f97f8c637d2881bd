//! Observability: log lines in the operator's chosen format. Neutral: every
//! layer may use it, and it uses none of them.

pub mod log;

pub use log::{Level, Logger};

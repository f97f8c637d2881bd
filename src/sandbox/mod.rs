//! Sandboxes: registry, lifecycle, exec queue, replay, and the seam to guests.
//!
//! The HTTP layer parses requests into [`Action`]s; the [`Controller`]
//! executes them against the [`Manager`] and answers with a [`Reply`].
//! Nothing here knows about HTTP.

pub mod action;
pub mod controller;
pub mod exec;
pub mod instance;
pub mod manager;
pub mod params;
pub mod pty;
pub mod queue;
pub mod replay;

pub use action::{Action, Reply};
pub use params::{CreateParams, PtyCommand, PtyReadParams, PtySpec, ResumeParams};
pub use controller::Controller;
pub use exec::{ExecStream, StreamItem};
pub use manager::Manager;

use crate::guest::{CapacityReason, GuestError};
use crate::obs::metrics::Outcome;

/// Why a sandbox operation failed. The API maps each kind to a status.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No live sandbox has this id.
    #[error("unknown sandbox {0:?}")]
    UnknownSandbox(String),
    /// No space has this id.
    #[error("unknown space {0:?}")]
    UnknownSpace(String),
    /// Not now: retry later (a RAM size's template is being built).
    #[error("{0}")]
    Unavailable(String),
    /// The space cannot be resumed or deleted now (another request has it)
    /// or at all (its files are damaged; it was removed).
    #[error("{0}")]
    SpaceConflict(String),
    /// The template is not served by this host.
    #[error("template {template:?} is not available; this host serves: {}", served.join(", "))]
    UnknownTemplate {
        /// Requested name.
        template: String,
        /// Names this host serves.
        served: Vec<String>,
    },
    /// `PODFLARE_MAX_STREAMS` exec streams are already open.
    #[error("host at capacity: {max} exec streams are already open (PODFLARE_MAX_STREAMS); retry shortly")]
    TooManyStreams {
        /// The limit.
        max: usize,
    },
    /// This sandbox already holds `PODFLARE_MAX_STREAMS_PER_SANDBOX` streams.
    #[error("sandbox at capacity: {max} exec streams of this sandbox are already open (PODFLARE_MAX_STREAMS_PER_SANDBOX); retry when one ends")]
    TooManySandboxStreams {
        /// The limit.
        max: usize,
    },
    /// No terminal session of this sandbox has this id.
    #[error("unknown pty session {0:?}")]
    UnknownPty(String),
    /// The sandbox already keeps `MAX_SESSIONS` sessions, none exited.
    #[error("sandbox at capacity: {max} terminal sessions of this sandbox are running; kill one first")]
    TooManyPtySessions {
        /// The limit.
        max: usize,
    },
    /// The host cannot take another sandbox (memory or count).
    #[error("host at capacity: {1}")]
    Capacity(CapacityReason, String),
    /// An exec's code does not fit in one frame to the guest.
    #[error("too large: the exec request would be {bytes} bytes once encoded for the guest; the limit is {limit} bytes")]
    CodeTooLarge {
        /// Encoded size.
        bytes: usize,
        /// The protocol's limit.
        limit: usize,
    },
    /// The endpoint exists in the contract but this host does not serve it yet.
    #[error("{0} is not implemented yet on this host")]
    NotImplemented(&'static str),
    /// merge_into between sandboxes of different templates (the winner's
    /// VM could not serve the parent's template).
    #[error("cannot merge sandbox {winner:?} (template {winner_template:?}) into {parent:?} (template {parent_template:?}): both must come from the same template")]
    MergeAcrossTemplates {
        /// The parent id.
        parent: String,
        /// Its template.
        parent_template: String,
        /// The winner id.
        winner: String,
        /// Its template.
        winner_template: String,
    },
    /// A guest failed in a way that is our fault, not the caller's.
    #[error("guest failure")]
    Guest(#[source] GuestError),
    /// Our own fault outside the guest.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SandboxError {
    /// How an operation that failed with this error is counted.
    pub fn outcome(&self) -> Outcome {
        match self {
            SandboxError::TooManyStreams { .. }
            | SandboxError::TooManySandboxStreams { .. }
            | SandboxError::TooManyPtySessions { .. }
            | SandboxError::Capacity(..)
            | SandboxError::Unavailable(_) => Outcome::Refused,
            SandboxError::Guest(_) | SandboxError::Internal(_) => Outcome::Failed,
            _ => Outcome::Rejected,
        }
    }

    /// Sorts a guest error into caller mistakes, capacity, and our faults.
    pub fn from_guest(e: GuestError) -> Self {
        match e {
            GuestError::UnknownTemplate(t) => SandboxError::UnknownTemplate { template: t, served: Vec::new() },
            GuestError::Capacity(reason, why) => SandboxError::Capacity(reason, why),
            GuestError::Unsupported(what) => SandboxError::NotImplemented(what),
            GuestError::UnknownSpace(id) => SandboxError::UnknownSpace(id),
            GuestError::Unavailable(why) => SandboxError::Unavailable(why),
            GuestError::SpaceConflict(why) => SandboxError::SpaceConflict(why),
            other => SandboxError::Guest(other),
        }
    }
}

//! The vocabulary between transport and logic: the HTTP layer parses a request
//! into an [`Action`], the [`Controller`](super::Controller) executes it and
//! answers with a [`Reply`]. Everything here is already validated.

use super::exec::ExecStream;
use super::pty::PtyStream;
use super::params::{CreateParams, PtyReadParams, PtySpec, ResumeParams};
use crate::guest::Language;

/// One parsed API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GET /v1/healthz`.
    Healthz,
    /// `GET /v1/capacity`.
    Capacity,
    /// `GET /metrics`.
    Metrics,
    /// `GET /v1/sandboxes`.
    ListSandboxes,
    /// `GET /v1/sandboxes/{id}`.
    GetSandbox {
        /// Sandbox id.
        id: String,
    },
    /// `POST /v1/sandboxes`.
    Create(CreateParams),
    /// `DELETE /v1/sandboxes/{id}`.
    Delete {
        /// Sandbox id.
        id: String,
    },
    /// `POST /v1/sandboxes/{id}/exec`.
    Exec {
        /// Sandbox id.
        id: String,
        /// Interpreter.
        language: Language,
        /// Source.
        code: String,
    },
    /// `GET /v1/sandboxes/{id}/replay`.
    Replay {
        /// Sandbox id.
        id: String,
    },
    /// `POST /v1/sandboxes/{id}/fork`.
    Fork {
        /// Parent id.
        id: String,
        /// Children wanted, 1..=32.
        n: u32,
    },
    /// `POST /v1/sandboxes/{parent}/merge_into/{winner}`.
    MergeInto {
        /// Id that survives, now driving the winner's VM.
        parent: String,
        /// Id that disappears.
        winner: String,
    },
    /// `POST /v1/spaces/{space}/resume`.
    ResumeSpace {
        /// Space id.
        space: String,
        /// Parameters.
        params: ResumeParams,
    },
    /// `DELETE /v1/spaces/{space}`.
    DeleteSpace {
        /// Space id.
        space: String,
    },
    /// `POST /v1/sandboxes/{id}/pty`.
    PtyCreate {
        /// Sandbox id.
        id: String,
        /// Session parameters.
        spec: PtySpec,
    },
    /// `GET /v1/sandboxes/{id}/pty`.
    PtyList {
        /// Sandbox id.
        id: String,
    },
    /// `POST .../pty/{pty}/input`.
    PtyInput {
        /// Sandbox id.
        id: String,
        /// Session id.
        pty: String,
        /// Decoded `data_b64`.
        data: Vec<u8>,
    },
    /// `POST .../pty/{pty}/resize`.
    PtyResize {
        /// Sandbox id.
        id: String,
        /// Session id.
        pty: String,
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// `POST .../pty/{pty}/kill`.
    PtyKill {
        /// Sandbox id.
        id: String,
        /// Session id.
        pty: String,
    },
    /// `GET .../pty/{pty}/attach`.
    PtyAttach {
        /// Sandbox id.
        id: String,
        /// Session id.
        pty: String,
    },
    /// `POST .../pty/{pty}/read`.
    PtyRead {
        /// Sandbox id.
        id: String,
        /// Session id.
        pty: String,
        /// Parameters.
        params: PtyReadParams,
    },
}

impl Action {
    /// The sandbox this action addresses, for logs.
    pub fn sandbox_id(&self) -> Option<&str> {
        match self {
            Action::Healthz | Action::Capacity | Action::Create(_) => None,
            Action::Metrics | Action::ListSandboxes => None,
            Action::ResumeSpace { .. } | Action::DeleteSpace { .. } => None,
            Action::Delete { id }
            | Action::GetSandbox { id }
            | Action::Exec { id, .. }
            | Action::Replay { id }
            | Action::Fork { id, .. }
            | Action::PtyCreate { id, .. }
            | Action::PtyList { id }
            | Action::PtyInput { id, .. }
            | Action::PtyResize { id, .. }
            | Action::PtyKill { id, .. }
            | Action::PtyAttach { id, .. }
            | Action::PtyRead { id, .. } => Some(id),
            Action::MergeInto { parent, .. } => Some(parent),
        }
    }
}

/// A successful answer, still independent of HTTP framing.
pub enum Reply {
    /// 200 `text/plain`.
    Text(&'static str),
    /// 200 JSON.
    Json(serde_json::Value),
    /// 200 metrics in the OpenMetrics text format.
    Metrics(String),
    /// 204, no body.
    NoContent,
    /// 200 NDJSON, complete (already framed lines ending in `\n`).
    Ndjson(Vec<u8>),
    /// 200 NDJSON, produced as the exec runs.
    Stream(ExecStream),
    /// 200 NDJSON, a terminal session's events for one client.
    Pty(PtyStream),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Text(t) => write!(f, "Text({t:?})"),
            Reply::Json(v) => write!(f, "Json({v})"),
            Reply::Metrics(t) => write!(f, "Metrics({} bytes)", t.len()),
            Reply::NoContent => write!(f, "NoContent"),
            Reply::Ndjson(b) => write!(f, "Ndjson({} bytes)", b.len()),
            Reply::Stream(_) => write!(f, "Stream"),
            Reply::Pty(_) => write!(f, "Pty"),
        }
    }
}

//! Validated request parameters (not yet clamped to the host's limits).

/// Create parameters as the client sent them (validated, not yet clamped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateParams {
    /// `template`; `None` means `default`.
    pub template: Option<String>,
    /// `timeout_seconds` (positive).
    pub timeout_seconds: Option<u64>,
    /// `idle_timeout_seconds` (positive).
    pub idle_timeout_seconds: Option<u64>,
    /// `ram_mib` (positive).
    pub ram_mib: Option<u64>,
    /// `rootfs_gb` (positive).
    pub rootfs_gb: Option<u64>,
    /// `persistent` (default false).
    pub persistent: bool,
    /// `egress` (default true).
    pub egress: bool,
}

/// `POST /v1/spaces/{space}/resume` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeParams {
    /// `timeout_seconds`.
    pub timeout_seconds: Option<u64>,
    /// `idle_timeout_seconds`.
    pub idle_timeout_seconds: Option<u64>,
    /// `persistent`.
    pub persistent: bool,
    /// `egress`.
    pub egress: bool,
}

/// What a PTY session runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyCommand {
    /// `shellCmd`, run under `bash -lc`.
    Shell(String),
    /// `argv`, executed directly.
    Argv(Vec<String>),
    /// Neither given: a login shell.
    LoginShell,
}

/// `POST /v1/sandboxes/{id}/pty` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySpec {
    /// Command.
    pub command: PtyCommand,
    /// Columns (default 80).
    pub cols: u16,
    /// Rows (default 24).
    pub rows: u16,
    /// Working directory.
    pub cwd: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// `POST .../pty/{pty}/read` parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PtyReadParams {
    /// Return output after this sequence number.
    pub since_seq: u64,
    /// At most this many bytes (default 65536).
    pub max_bytes: u64,
    /// Long-poll time in ms (default 10000, capped at 30000).
    pub timeout_ms: u64,
}

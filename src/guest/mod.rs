//! The seam between the sandbox manager and a running guest.
//!
//! The manager (registry, lifecycle, exec queue, replay) talks to a guest only
//! through these two traits. The one real implementation lives in `crate::vmm`
//! (`factory::VmFactory` / `factory::RunningGuest`); unit tests of the manager
//! and the HTTP layer plug in a small in-process fake so they run without
//! `/dev/kvm`. Neutral: the sandbox layer and the VMM both use it, and it uses
//! neither.

pub mod stream;

pub use podflare_proto::Language;
pub use stream::{Flow, StreamRx, StreamTx, Weigh};

/// Bytes of exec output one stream may hold before the guest is made to
/// wait (its output stays in its own queues until the reader catches up).
pub const EXEC_STREAM_LIMIT: usize = 4 << 20;

/// Most bytes of one frame to the guest (the protocol's payload limit).
pub const MAX_FRAME_PAYLOAD: usize = podflare_proto::MAX_PAYLOAD;

/// Bytes of the exec request frame's payload for `code`: the JSON of
/// `{"language": ..., "code": ...}` as serde_json writes it, counted without
/// building it (the code may be tens of MiB).
pub fn exec_request_len(language: Language, code: &str) -> usize {
    let lang = match language {
        Language::Python => "python",
        Language::Bash => "bash",
    };
    let escaped: usize = code
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum();
    r#"{"language":"","code":""}"#.len() + lang.len() + escaped
}

/// Output of one exec, in the order the guest produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecChunk {
    /// Raw stdout bytes (not split into lines; the manager does that).
    Stdout(Vec<u8>),
    /// Raw stderr bytes.
    Stderr(Vec<u8>),
    /// The command is running (terminal sessions say so once; execs never).
    Started,
    /// The command finished with this status. Always the last chunk.
    Exit(i32),
    /// The guest failed mid-stream (crashed, channel broke, timed out).
    /// Always the last chunk; the manager reports it as a stderr line plus a
    /// non-zero exit.
    Failed(String),
}

impl Weigh for ExecChunk {
    fn weight(&self) -> usize {
        // The fixed part keeps a flood of empty chunks bounded too.
        64 + match self {
            ExecChunk::Stdout(b) | ExecChunk::Stderr(b) => b.len(),
            ExecChunk::Failed(m) => m.len(),
            ExecChunk::Exit(_) | ExecChunk::Started => 0,
        }
    }
}

/// Why a guest operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Unknown template name.
    #[error("unknown template {0:?}")]
    UnknownTemplate(String),
    /// Host cannot take another sandbox now (memory or count).
    #[error("host at capacity: {1}")]
    Capacity(CapacityReason, String),
    /// The VM died or its channel broke.
    #[error("sandbox failed: {0}")]
    Failed(String),
    /// Our own fault (I/O, KVM).
    #[error("internal error: {0}")]
    Internal(String),
    /// No space has this id.
    #[error("unknown space {0:?}")]
    UnknownSpace(String),
    /// Not now, later: what it needs is being prepared (a RAM size's template).
    #[error("{0}")]
    Unavailable(String),
    /// The space is busy (another request has it) or unusable (damaged; removed).
    #[error("{0}")]
    SpaceConflict(String),
    /// This kind of guest cannot do that.
    #[error("{0} is not supported by this guest")]
    Unsupported(&'static str),
}

/// Which limit refused a sandbox (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapacityReason {
    /// `PODFLARE_MAX_SANDBOXES` live sandboxes already.
    SandboxCount,
    /// Host memory (`PODFLARE_MAX_GUEST_MEMORY_MIB`), or it cannot be read.
    Memory,
}

impl CapacityReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityReason::SandboxCount => "sandbox_count",
            CapacityReason::Memory => "memory",
        }
    }
}

/// A terminal session to start in a guest (already validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyStart {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
    /// Working directory.
    pub cwd: Option<String>,
    /// Extra environment, in order.
    pub env: Vec<(String, String)>,
}

/// Drives one running terminal session of a guest.
pub trait PtyControl: Send + Sync {
    /// Bytes typed into the terminal.
    fn input(&self, data: &[u8]) -> Result<(), GuestError>;
    /// A new terminal size (the session's foreground processes get SIGWINCH).
    fn resize(&self, cols: u16, rows: u16) -> Result<(), GuestError>;
    /// SIGKILL to the session's process group; its output still ends with `Exit`.
    fn kill(&self) -> Result<(), GuestError>;
    /// What names this session inside its guest: a fork child of that
    /// guest runs the same session under the same name
    /// ([`Guest::pty_reopen`]).
    fn handle(&self) -> u64;
}

/// What a create asks for, after the API layer has validated and clamped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Template name (`default`, `python-datasci`).
    pub template: String,
    /// Network egress allowed.
    pub egress: bool,
    /// The sandbox id this guest will serve (for log lines).
    pub sandbox_id: String,
    /// RAM asked for (MiB, already within the host's maximum); `None`: the
    /// template's own size. The VMM may round it up to a size it builds.
    /// A fork child or a resumed space has its source's, whatever this says.
    pub ram_mib: Option<u64>,
    /// Writable disk asked for (GB, already within the host's maximum);
    /// `None`: the template's own (the smallest). Like `ram_mib`, a fork
    /// child or a resumed space keeps its source's.
    pub rootfs_gb: Option<u64>,
}

/// A frozen sandbox on disk, as the sandbox layer lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceInfo {
    /// `spc_<32 hex>`.
    pub id: String,
    /// Its template.
    pub template: String,
    /// Bytes its files take on disk.
    pub bytes_on_disk: u64,
    /// When it was frozen (Unix seconds).
    pub created_unix: u64,
    /// The sandbox it was frozen from.
    pub source_sandbox: String,
    /// What the sandbox layer stored with it ([`Guest::freeze`]).
    pub sandbox: serde_json::Value,
}

/// Creates guests. One per hostd process; shared by all worker threads.
pub trait GuestFactory: Send + Sync {
    /// Template names this host can serve.
    fn templates(&self) -> Vec<String>;
    /// Starts a guest from the template's snapshot (or the warm pool).
    fn create(&self, spec: &GuestSpec) -> Result<Box<dyn Guest>, GuestError>;
    /// Pool and host counters for `GET /v1/capacity` (a JSON object).
    fn capacity(&self) -> serde_json::Value;
    /// MiB the host is short of its memory floor, when guests have dirtied
    /// too much: the sandbox layer then destroys the sandboxes holding the
    /// most until it is not. `None` when memory is fine.
    fn memory_pressure(&self) -> Option<u64> {
        None
    }
    /// Every frozen space of this host (a JSON object each, oldest first).
    fn spaces(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }
    /// Resumes `space` as a new guest (serving `spec.sandbox_id`) and
    /// consumes it; on an error the space stays, unless it was unusable.
    fn resume_space(&self, space: &str, spec: &GuestSpec) -> Result<(Box<dyn Guest>, SpaceInfo), GuestError> {
        let _ = spec;
        Err(GuestError::UnknownSpace(space.to_string()))
    }
    /// Removes `space` from disk.
    fn delete_space(&self, space: &str) -> Result<(), GuestError> {
        Err(GuestError::UnknownSpace(space.to_string()))
    }
    /// Host CPU time used by the VMs' own threads (vCPUs, devices) since
    /// start, ended threads included; zero for guests without threads.
    fn vm_threads_cpu(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// One running guest. Dropping it destroys the VM and frees everything.
pub trait Guest: Send + Sync {
    /// Starts one exec. Chunks arrive on the stream as the guest produces
    /// them (bounded: see [`EXEC_STREAM_LIMIT`]); the last one is `Exit` or
    /// `Failed`. The caller runs execs of one
    /// sandbox one at a time.
    fn exec(&self, language: Language, code: &str) -> Result<StreamRx<ExecChunk>, GuestError>;
    /// Host memory this guest holds privately (bytes), for capacity reports.
    fn private_memory_bytes(&self) -> u64;
    /// The guest's RAM (MiB), when it is a VM.
    fn ram_mib(&self) -> Option<u64> {
        None
    }
    /// Ends the guest's channel at once: calls blocked on it (an exec start
    /// waiting for a guest that does not read) and later ones fail, and a
    /// running exec ends with `why`. The sandbox layer calls it when it
    /// destroys a sandbox, before it lets go; the VM itself is freed when the
    /// last holder drops the guest.
    fn shutdown(&self, why: &str) {
        let _ = why;
    }
    /// Copies this running guest into one child per spec: each starts from
    /// this guest's memory, processes and files, gets its own clock and
    /// entropy, and shares nothing written afterwards. All or nothing: on
    /// an error no child is left.
    fn fork(&self, specs: &[GuestSpec]) -> Result<Vec<Box<dyn Guest>>, GuestError> {
        let _ = specs;
        Err(GuestError::Unsupported("fork"))
    }
    /// Freezes this guest into a new space on disk, with `sandbox` (the
    /// sandbox layer's own record) stored beside it. On success the guest is
    /// stopped for good and the caller drops it; on an error it runs on and
    /// nothing is left on disk.
    fn freeze(&self, source_sandbox: &str, sandbox: serde_json::Value) -> Result<SpaceInfo, GuestError> {
        let _ = (source_sandbox, sandbox);
        Err(GuestError::Unsupported("freezing into a space"))
    }
    /// The guest now serves another sandbox id (merge hands a child's guest
    /// to its parent's id): its log lines name that one.
    fn relabel(&self, sandbox_id: &str) {
        let _ = sandbox_id;
    }
    /// Starts a terminal session: its output arrives on the stream
    /// (`Started` once it runs, then `Stdout`, then `Exit`; or `Failed`),
    /// and the control drives it.
    fn pty(&self, start: &PtyStart) -> Result<(StreamRx<ExecChunk>, Box<dyn PtyControl>), GuestError> {
        let _ = start;
        Err(GuestError::Unsupported("pty"))
    }
    /// In a fork child: reaches the session its parent ran under `handle`
    /// (the child's copy of it): output from now on, and its controls.
    fn pty_reopen(&self, handle: u64) -> Result<(StreamRx<ExecChunk>, Box<dyn PtyControl>), GuestError> {
        let _ = handle;
        Err(GuestError::Unsupported("pty"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_request_len_is_what_serde_writes() {
        for code in ["", "print(1)", "a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é\u{2028}", "x".repeat(1000).as_str()] {
            for language in [Language::Python, Language::Bash] {
                let real = serde_json::to_vec(&podflare_proto::ExecRequest { language, code: code.into() }).unwrap();
                assert_eq!(exec_request_len(language, code), real.len(), "{code:?}");
            }
        }
    }
}

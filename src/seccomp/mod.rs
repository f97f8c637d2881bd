//! seccomp filters per thread kind (neutral: every layer installs its own
//! threads' filter, and this module uses no layer).
//!
//! Every long-lived thread installs the filter of its kind first thing
//! ([`install`]): the HTTP accept thread and workers, the reaper, the pool
//! filler, each VM's device thread and vCPU threads. Linux filters bind the
//! calling thread and every thread it creates afterwards, and stack; so a
//! VM's device and vCPU threads, created by an HTTP worker or the pool
//! filler, run under that thread's filters and narrow them with their own.
//!
//! Each kind gets three filters (see [`rules`]):
//! - a short list of syscalls nothing here ever makes (exec, fork, ptrace,
//!   mount, modules, BPF, ...): **kill the process**, as they can only be
//!   an intrusion;
//! - `clone3` answered `ENOSYS`, so glibc falls back to `clone`, whose
//!   flags a filter can check (threads yes, processes no);
//! - the kind's allow-list, everything else answered **`EPERM`**: a
//!   syscall this list missed fails one operation with a clear error
//!   rather than killing every VM in the process.
//!
//! Not filtered: the main thread (it reads settings, builds templates in
//! scoped threads before serving anything, then only waits) and those
//! template builders; the VMs they boot have filtered threads as usual.
//!
//! `PODFLARE_SECCOMP=0` turns every filter off ([`set_enabled`]); the
//! binary warns loudly when it is.

mod kvm;
mod rules;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{BackendError, BpfProgram};

/// The kinds of threads hostd runs, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The HTTP accept thread: accepts, polls, reads nothing but sockets.
    HttpAccept,
    /// An HTTP worker: requests, and the controller behind them, which
    /// restores VMs (KVM, snapshot mappings, the VM's threads).
    HttpWorker,
    /// The sandbox reaper: destroys expired sandboxes (VM teardown).
    Reaper,
    /// The warm-pool filler: restores VMs ahead of demand.
    PoolFiller,
    /// A VM's device thread: queue work on eventfd notifications.
    Device,
    /// A vCPU thread: KVM_RUN and the device exits it handles.
    Vcpu,
    /// The template builder: boots a template in a new RAM size on first
    /// use and writes its snapshot into the cache.
    TemplateBuilder,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::HttpAccept,
        ThreadKind::HttpWorker,
        ThreadKind::Reaper,
        ThreadKind::PoolFiller,
        ThreadKind::Device,
        ThreadKind::Vcpu,
        ThreadKind::TemplateBuilder,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// A filter could not be built or installed. The thread must not go on
/// with its work: it would run unfiltered.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter did not compile to BPF (a bug in the rules).
    #[error("cannot build the seccomp filter of {kind:?} threads: {source}")]
    Build {
        /// Whose filter.
        kind: ThreadKind,
        /// What seccompiler said.
        #[source]
        source: BackendError,
    },
    /// The kernel refused the filter (no seccomp support, or the calling
    /// thread's existing filters forbid prctl/seccomp).
    #[error("cannot install the seccomp filter of {kind:?} threads: {source}")]
    Install {
        /// Whose filter.
        kind: ThreadKind,
        /// What the kernel said.
        #[source]
        source: seccompiler::Error,
    },
    /// A probe thread could not be started or died.
    #[error("seccomp probe of {kind:?} threads: {why}")]
    Probe {
        /// Whose filter.
        kind: ThreadKind,
        /// What went wrong.
        why: String,
    },
}

/// On by default: the process-wide operator choice `PODFLARE_SECCOMP`.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns filters on or off for every thread started from now on. A
/// property of the whole process (one operator setting), set once by the
/// binary before it starts any thread.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Release);
}

/// Whether [`install`] installs anything.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The compiled filters of each kind, built once per process (they embed
/// our pid, for tgkill).
static PROGRAMS: [OnceLock<[BpfProgram; 3]>; ThreadKind::ALL.len()] = [const { OnceLock::new() }; ThreadKind::ALL.len()];

/// The BPF programs of `kind`, in install order.
pub fn programs(kind: ThreadKind) -> Result<&'static [BpfProgram; 3], SeccompError> {
    let cell = &PROGRAMS[kind.index()];
    if let Some(p) = cell.get() {
        return Ok(p);
    }
    let build = |source| SeccompError::Build { kind, source };
    let [a, b, c] = rules::filters(kind).map_err(build)?;
    let compile = |f| BpfProgram::try_from(f).map_err(build);
    let built = [compile(a)?, compile(b)?, compile(c)?];
    // Two threads may race to build; both results are the same.
    Ok(cell.get_or_init(|| built))
}

/// Installs `kind`'s filters on the calling thread (and so on every thread
/// it creates later). Does nothing when filters are off. On an error the
/// caller must stop this thread's work.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    for p in programs(kind)? {
        seccompiler::apply_filter(p).map_err(|source| SeccompError::Install { kind, source })?;
    }
    Ok(())
}

/// Installs every kind's filter, each on a throwaway thread: run at
/// start-up, so a kernel without seccomp or a broken rule stops the
/// binary before it serves, rather than one thread later.
pub fn probe_all() -> Result<(), SeccompError> {
    for kind in ThreadKind::ALL {
        let t = std::thread::Builder::new()
            .name("seccomp-probe".into())
            .spawn(move || install(kind))
            .map_err(|e| SeccompError::Probe { kind, why: e.to_string() })?;
        t.join().map_err(|_| SeccompError::Probe { kind, why: "the probe thread panicked".into() })??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_to_bpf_within_the_kernel_limits() {
        for kind in ThreadKind::ALL {
            let progs = programs(kind).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            for p in progs {
                // BPF_MAXINSNS: the kernel refuses longer programs.
                assert!(!p.is_empty() && p.len() <= 4096, "{kind:?}: {} instructions", p.len());
            }
        }
    }

    #[test]
    fn allow_lists_differ_where_the_kinds_do() {
        let allowed = |k| rules::allowed(k).expect("rules");
        let has = |k, nr: libc::c_long| allowed(k).contains_key(&nr);
        // Only the accept thread accepts; only VM builders make eventfds.
        assert!(has(ThreadKind::HttpAccept, libc::SYS_accept4) && !has(ThreadKind::HttpWorker, libc::SYS_accept4));
        assert!(has(ThreadKind::HttpWorker, libc::SYS_eventfd2) && has(ThreadKind::PoolFiller, libc::SYS_eventfd2));
        for k in [ThreadKind::HttpAccept, ThreadKind::Reaper, ThreadKind::Device, ThreadKind::Vcpu] {
            assert!(!has(k, libc::SYS_eventfd2) && !has(k, libc::SYS_clone), "{k:?}");
        }
        // Of these, only the reaper opens files (read-only: its memory watchdog reads /proc).
        assert!(has(ThreadKind::Reaper, libc::SYS_openat));
        for k in [ThreadKind::HttpAccept, ThreadKind::Device, ThreadKind::Vcpu] {
            assert!(!has(k, libc::SYS_openat), "{k:?}");
        }
        // Nobody opens sockets.
        for k in ThreadKind::ALL {
            assert!(!has(k, libc::SYS_socket) && !has(k, libc::SYS_connect), "{k:?}");
        }
    }

    #[test]
    fn the_never_list_is_in_no_allow_list() {
        let never = rules::never().expect("never");
        for kind in ThreadKind::ALL {
            let allowed = rules::allowed(kind).expect("rules");
            for nr in never.keys().filter(|nr| **nr != libc::SYS_clone) {
                assert!(!allowed.contains_key(nr), "{kind:?} allows syscall {nr}, which kills");
            }
        }
    }
}

//! Starting child processes and collecting their exit statuses.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them.
//! One reaper thread calls `waitpid(-1)` and hands each status to whoever
//! registered that pid at spawn time; statuses of orphans are dropped. A child
//! is registered while the table lock is held across `posix_spawn`, so the
//! reaper cannot reap it before its owner is on file.
//!
//! `posix_spawn` (glibc: `clone(CLONE_VM|CLONE_VFORK)` + exec) is used rather
//! than fork: copying the agent's page tables is emulated kernel work on PVM.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Condvar, Mutex, OnceLock};

/// Called once with the child's exit code (`128 + signal` for a signal death).
pub type OnExit = Box<dyn FnOnce(i32) + Send>;

struct Table {
    owners: Mutex<HashMap<libc::pid_t, OnExit>>,
    /// Signalled after a spawn, so a reaper with no children wakes up.
    spawned: Condvar,
}

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| Table {
        owners: Mutex::new(HashMap::new()),
        spawned: Condvar::new(),
    })
}

/// What to start.
pub struct Command<'a> {
    /// Absolute path of the program (no PATH search).
    pub program: &'a str,
    /// argv, including argv[0].
    pub args: &'a [&'a str],
    /// `KEY=value` strings.
    pub env: &'a [String],
    /// Working directory.
    pub cwd: &'a str,
    /// Descriptors the child gets as 0, 1, 2 (and optionally 3).
    pub fds: &'a [RawFd],
    /// Put the child in a new process group (so Cancel can kill its tree).
    pub new_group: bool,
    /// A terminal device (a pty slave's path) for a terminal session: the
    /// child becomes a session leader (so also a new process group), opens
    /// it as 0, which makes it the controlling terminal, copies it to 1 and
    /// 2, and closes every other descriptor. `fds` must then be empty.
    pub terminal: Option<&'a str>,
    /// Start it at `SCHED_IDLE` (it runs only when nothing else wants the
    /// CPU), from before its exec: for work done ahead of need.
    pub idle: bool,
}

fn cstrings<'a>(items: impl IntoIterator<Item = &'a str>) -> io::Result<Vec<CString>> {
    items
        .into_iter()
        .map(|s| {
            CString::new(s)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
        })
        .collect()
}

/// Starts `cmd`; `on_exit` runs on the reaper thread when it exits.
pub fn spawn(cmd: &Command<'_>, on_exit: OnExit) -> io::Result<libc::pid_t> {
    let program = cstrings([cmd.program])?.remove(0);
    let argv_c = cstrings(cmd.args.iter().copied())?;
    let env_c = cstrings(cmd.env.iter().map(String::as_str))?;
    let cwd = cstrings([cmd.cwd])?.remove(0);
    let terminal = match cmd.terminal {
        Some(path) if cmd.fds.is_empty() => Some(cstrings([path])?.remove(0)),
        Some(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a terminal session takes no other descriptors",
            ))
        }
        None => None,
    };
    let mut argv: Vec<*mut libc::c_char> = argv_c.iter().map(|s| s.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = env_c.iter().map(|s| s.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());

    // A source fd that is also a lower target slot would be overwritten by an
    // earlier dup2 before it is read: move such sources above the slots first.
    let mut moved = Vec::new();
    let mut sources = cmd.fds.to_vec();
    for (target, src) in sources.iter_mut().enumerate() {
        if (*src as usize) < cmd.fds.len() && *src as usize != target {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open; the copy is owned here.
            let copy =
                unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, cmd.fds.len() as libc::c_int) };
            if copy < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `copy` is a fresh descriptor owned by nobody else.
            moved.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(copy) });
            *src = copy;
        }
    }

    let mut owners = table().owners.lock().unwrap_or_else(|e| e.into_inner());
    let mut pid: libc::pid_t = 0;
    // SAFETY: the file-action and attribute objects are initialised before use
    // and destroyed after; every pointer (program, argv, envp, cwd, terminal)
    // points at NUL-terminated strings owned by this frame that outlive
    // posix_spawn, which copies what it needs before returning.
    let rc = unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut fa);
        libc::posix_spawnattr_init(&mut attr);
        for (target, &fd) in sources.iter().enumerate() {
            // glibc clears close-on-exec even for dup2(n, n).
            libc::posix_spawn_file_actions_adddup2(&mut fa, fd, target as libc::c_int);
        }
        let mut flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        if let Some(tty) = &terminal {
            // glibc runs setsid() before the file actions, so the open below
            // (no O_NOCTTY) is a session leader's first terminal open: the
            // kernel makes the terminal its controlling one, as TIOCSCTTY would.
            // setsid() also makes a new process group; SETPGROUP must not be
            // added (setpgid on a session leader fails).
            flags |= libc::POSIX_SPAWN_SETSID as libc::c_int;
            libc::posix_spawn_file_actions_addopen(&mut fa, 0, tty.as_ptr(), libc::O_RDWR, 0);
            libc::posix_spawn_file_actions_adddup2(&mut fa, 0, 1);
            libc::posix_spawn_file_actions_adddup2(&mut fa, 0, 2);
            // The agent's own descriptors are close-on-exec, but one inherited
            // without the flag (a test harness's socket) must not reach a shell.
            libc::posix_spawn_file_actions_addclosefrom_np(&mut fa, 3);
        } else if cmd.new_group {
            flags |= libc::POSIX_SPAWN_SETPGROUP;
            libc::posix_spawnattr_setpgroup(&mut attr, 0);
        }
        if cmd.idle {
            flags |= libc::POSIX_SPAWN_SETSCHEDULER;
            libc::posix_spawnattr_setschedpolicy(&mut attr, libc::SCHED_IDLE);
            let param = libc::sched_param { sched_priority: 0 };
            libc::posix_spawnattr_setschedparam(&mut attr, &param);
        }
        libc::posix_spawn_file_actions_addchdir_np(&mut fa, cwd.as_ptr());
        // The Rust runtime ignores SIGPIPE in the agent; children expect the default.
        let mut def: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut def);
        libc::sigaddset(&mut def, libc::SIGPIPE);
        libc::posix_spawnattr_setsigdefault(&mut attr, &def);
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut mask);
        libc::posix_spawnattr_setsigmask(&mut attr, &mask);
        libc::posix_spawnattr_setflags(&mut attr, flags as libc::c_short);
        let rc = libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &fa,
            &attr,
            argv.as_ptr(),
            envp.as_ptr(),
        );
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::posix_spawnattr_destroy(&mut attr);
        rc
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    owners.insert(pid, on_exit);
    drop(owners);
    drop(moved);
    table().spawned.notify_one();
    Ok(pid)
}

/// Decodes a `waitpid` status into a shell-style exit code.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

/// Reaps children forever (run on its own thread).
pub fn reap_forever() -> ! {
    let t = table();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes the status into our local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                // No children at all: sleep until the next spawn.
                let owners = t.owners.lock().unwrap_or_else(|e| e.into_inner());
                let _ = t
                    .spawned
                    .wait_timeout(owners, std::time::Duration::from_secs(5));
            }
            continue;
        }
        // Taking the lock waits out a spawn in progress, whose pid may be this one.
        let owner = t
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        if let Some(on_exit) = owner {
            on_exit(exit_code(status));
        }
    }
}

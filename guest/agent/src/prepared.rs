//! Prepared bash shells: started ahead, each waiting to run one exec.
//!
//! A `bash -c CODE` costs ~2 s on PVM (fork+exec and bash's start-up are
//! emulated guest-kernel work). So the agent keeps [`POOL_TARGET`] shells
//! started ahead, each blocked in `read` on its own "go" pipe. They are in
//! the template snapshot, so every restored or forked sandbox has them. An
//! exec takes one, writes its code into the shell's code file (a memfd: a
//! `read` from a seekable file takes it in 4 KiB blocks, from a pipe it would
//! be one byte per syscall), and writes one byte to the go pipe. The shell
//! runs the code with `eval` and reports `$?` on its status socket from an
//! EXIT trap; the exec's Exit goes out as soon as that status arrives, while
//! the shell's exit (mm teardown, ~0.4 s) finishes in the background. A
//! shell runs one exec and exits: no state carries from one exec to the next.
//!
//! Descriptors of a prepared shell (the agent keeps the other ends):
//! 0 /dev/null, 1 stdout pipe, 2 stderr pipe, 3 status socket (the shell's end),
//! 4 go pipe (read end), 5 stdin pipe (read end), 6 the code memfd. The
//! bootstrap closes 4, 5 and 6 before the user's code runs (5 becomes 0
//! first when the exec asked for stdin); 3 stays open for the EXIT trap.
//!
//! The code file holds one header line, `<i|n> <seed>`: whether the exec
//! wants stdin, and a fresh `RANDOM` seed (every copy of a template would
//! otherwise share the prepared shell's generator state), then the code.
//!
//! Refills run at `SCHED_IDLE` priority (so a refill never slows an exec)
//! and start only after the exec that used a shell has sent its Exit. An
//! exec that finds no shell ready waits for the one being spawned, else it
//! spawns `bash -c CODE` as before; an exec never fails for want of a shell.
//!
//! What user code sees that differs from `bash -c CODE` (everything else,
//! `$0`, `$LINENO`, `$SECONDS`, `$BASH_EXECUTION_STRING`, environment, cwd,
//! process group, stdin, exit codes of `exit N` / `set -e` / a normal end,
//! is the same):
//! - syntax errors say `bash: eval: line N:` where `bash -c` says
//!   `bash: -c: line N:` (same line numbers);
//! - `trap` lists our EXIT trap; fd 3 (the status socket) is open and
//!   inherited; `/proc/$$/cmdline` is the bootstrap; `$_` starts as `__h`;
//!   `ps` shows the other shells waiting;
//! - `trap` also lists traps on HUP, INT, QUIT, USR1, USR2, ALRM and TERM:
//!   bash runs its EXIT trap before it dies of such a signal, with the last
//!   command's `$?`, so each of these traps notes 128+N for the EXIT trap
//!   to report, puts the signal back to its default and sends it again (the
//!   shell dies of it, as with `bash -c`). A user trap on one of them
//!   replaces ours, as it would replace the default; SIGKILL (Cancel,
//!   `kill -9`, OOM) runs no trap and the reaper's status counts;
//! - user code that writes a number line to fd 3 sets its own exec's
//!   reported status; other bytes there are ignored (the reaper decides);
//! - a user EXIT trap, `exec PROGRAM` or closing fd 3 makes the exec end
//!   when the shell is reaped, as every exec did before.

use crate::console;
use crate::spawn::{self, Command};
use crate::sys;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How many shells to keep ready: one for an exec and one for the next
/// exec that arrives before the refill (a bash start-up, seconds) is done.
pub const POOL_TARGET: usize = 2;

/// The script every prepared shell runs (`bash -c BOOTSTRAP bash`, so `$0`
/// is `bash` as for `bash -c CODE`). Step by step:
/// - a catchable fatal signal notes its status for the EXIT trap and is
///   sent again with its default action (see the module docs);
/// - the EXIT trap reports `$?` (or that noted status) on fd 3. It points stdout at fd 3 with
///   `exec` (no save and restore of fd 1: the shell is exiting) after
///   closing stderr, so if the user's code closed fd 3 the failed
///   redirection prints nothing and nothing lands in the user's output.
///   Then it waits on fd 3 (a socket) until the agent hangs up after
///   sending Exit: the shell's exit (its mm teardown, ~0.4 s of emulated
///   kernel work on one vCPU) would otherwise compete with the agent's
///   sending of that Exit; the agent moves it to `SCHED_IDLE` first.
///   SIGPIPE is ignored there: an agent that hung up early (the user's
///   code wrote garbage to fd 3) makes the write fail, not kill the shell,
///   whose own exit status the reaper then reports;
/// - wait for the go byte on fd 4;
/// - read the code file into `BASH_EXECUTION_STRING` (what `bash -c` sets
///   it to), split off the header line;
/// - take fd 5 as stdin if asked, close the bootstrap's descriptors;
/// - seed `RANDOM`, reset `SECONDS` (it counts from the shell's start),
///   drop the helper variables, and `eval` the code.
///
/// The trailing comment marks the shell in `/proc/PID/cmdline` (the tests
/// read it to know which path served an exec).
pub const BOOTSTRAP: &str = concat!(
    r#"trap '__s=${__k:-$?}; trap "" PIPE; exec 2>&- 1>&3 && builtin echo $__s && builtin read -r -n 1 -u 3 __s' EXIT; "#,
    r#"for __k in HUP:1 INT:2 QUIT:3 USR1:10 USR2:12 ALRM:14 TERM:15; do "#,
    r#"trap "__k=$((128 + ${__k#*:})); trap - ${__k%:*}; builtin kill -${__k%:*} \$\$" ${__k%:*}; done; unset __k; "#,
    r#"read -r -n 1 -u 4 __g; "#,
    r#"IFS= read -r -d '' -u 6 BASH_EXECUTION_STRING; "#,
    r#"__h=${BASH_EXECUTION_STRING%%$'\n'*}; "#,
    r#"BASH_EXECUTION_STRING=${BASH_EXECUTION_STRING#*$'\n'}; "#,
    r#"case $__h in i*) exec 0<&5 4<&- 5<&- 6<&-;; *) exec 4<&- 5<&- 6<&-;; esac; "#,
    r#"RANDOM=${__h#* }; SECONDS=0; unset __g __h; "#,
    r#"eval "$BASH_EXECUTION_STRING" # podflare-agent prepared shell"#,
);

/// What the code file holds for one exec: header line, then the code.
pub fn code_file_contents(code: &str, want_stdin: bool, seed: u32) -> Vec<u8> {
    let mut out = format!("{} {seed}\n", if want_stdin { 'i' } else { 'n' }).into_bytes();
    out.extend_from_slice(code.as_bytes());
    out
}

/// Whether a prepared shell can run `code`: `read -d ''` stops at a NUL
/// byte, and `bash -c` cannot take one either (the spawn path reports it).
pub fn can_run(code: &str) -> bool {
    !code.contains('\0')
}

/// Bytes of a status report kept before it is given up as garbage: the
/// trap writes at most "255\n".
const STATUS_MAX: usize = 8;

/// What the status socket has said so far.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StatusReader {
    buf: Vec<u8>,
    /// The report cannot come any more (EOF, or bytes that are not one).
    pub gone: bool,
}

impl StatusReader {
    /// Feeds bytes read from the status socket; returns the exit status once
    /// a whole line `0`..`255` has arrived. Anything else (a user's code
    /// writing to fd 3) makes the report unusable: the exit status then
    /// comes from the reaper, as for a shell that died without its trap.
    pub fn push(&mut self, bytes: &[u8]) -> Option<i32> {
        if self.gone {
            return None;
        }
        self.buf.extend_from_slice(bytes);
        if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let parsed = std::str::from_utf8(&self.buf[..end])
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u8>().ok());
            match parsed {
                Some(code) => return Some(i32::from(code)),
                None => self.gone = true,
            }
        } else if self.buf.len() > STATUS_MAX {
            self.gone = true;
        }
        None
    }
}

/// Who learns a shell's exit status, and the status if it came first.
#[derive(Default)]
struct ExitSlot {
    code: Option<i32>,
    notify: Option<spawn::OnExit>,
}

/// One shell waiting for its exec.
pub struct Shell {
    /// Its pid, also its process group (Cancel kills the group).
    pub pid: libc::pid_t,
    /// Read end of its stdout (non-blocking).
    pub out: OwnedFd,
    /// Read end of its stderr (non-blocking).
    pub err: OwnedFd,
    /// The agent's end of its status socket (non-blocking).
    pub status: OwnedFd,
    /// Write end of its stdin pipe (non-blocking).
    pub stdin: OwnedFd,
    go: OwnedFd,
    code: OwnedFd,
    slot: Arc<Mutex<ExitSlot>>,
}

fn lock_slot(slot: &Mutex<ExitSlot>) -> std::sync::MutexGuard<'_, ExitSlot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shell {
    /// Starts one shell (slow: a process spawn and bash's start-up).
    fn spawn(env: &[String], devnull: &OwnedFd) -> io::Result<Shell> {
        let (out, out_w) = sys::pipe()?;
        let (err, err_w) = sys::pipe()?;
        // A socket pair, not a pipe: the trap waits on it for the agent to
        // hang up once the exec's Exit is out (see BOOTSTRAP).
        let (status, status_w) = sys::socketpair()?;
        let (go_r, go) = sys::pipe()?;
        let (stdin_r, stdin) = sys::pipe()?;
        let code = sys::memfd("podflare-bash-code")?;
        for fd in [&out, &err, &status, &stdin] {
            sys::set_nonblock(fd)?;
        }
        let slot = Arc::new(Mutex::new(ExitSlot::default()));
        let on_exit = slot.clone();
        let pid = spawn::spawn(
            &Command {
                program: "/bin/bash",
                args: &["bash", "-c", BOOTSTRAP, "bash"],
                env,
                cwd: "/root",
                fds: &[
                    devnull.as_raw_fd(),
                    out_w.as_raw_fd(),
                    err_w.as_raw_fd(),
                    status_w.as_raw_fd(),
                    go_r.as_raw_fd(),
                    stdin_r.as_raw_fd(),
                    code.as_raw_fd(),
                ],
                new_group: true,
                terminal: None,
                // Its start-up is background work: any exec runs first. The
                // exec that takes the shell puts it back to normal priority.
                idle: true,
            },
            Box::new(move |status| {
                let notify = {
                    let mut s = lock_slot(&on_exit);
                    s.code = Some(status);
                    s.notify.take()
                };
                if let Some(notify) = notify {
                    notify(status);
                }
            }),
        )?;
        Ok(Shell {
            pid,
            out,
            err,
            status,
            stdin,
            go,
            code,
            slot,
        })
    }

    /// Whether it has exited (someone killed it while it waited).
    fn exited(&self) -> bool {
        lock_slot(&self.slot).code.is_some()
    }

    /// Hands the shell `code` and lets it run. `on_exit` gets the exit
    /// status from the reaper (used when the trap's report never comes).
    /// Fails, with nothing run and `on_exit` dropped, if the shell is gone.
    pub fn start(
        self,
        code: &str,
        want_stdin: bool,
        seed: u32,
        on_exit: spawn::OnExit,
    ) -> io::Result<StartedShell> {
        if self.exited() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "prepared shell exited",
            ));
        }
        sys::pwrite_all(
            self.code.as_raw_fd(),
            &code_file_contents(code, want_stdin, seed),
        )?;
        // Back to the priority every exec runs at, before it runs user code.
        let _ = sys::set_sched_idle(self.pid, false);
        // Only the shell holds the go pipe's read end: a shell that died
        // makes this fail (EPIPE) and nothing runs.
        sys::write_all(self.go.as_raw_fd(), b"g")?;
        // Registered only now, so a failed start never reports a dead
        // shell's status for an exec that fell back to a spawn; a shell that
        // ended meanwhile already has its status on file.
        let ended = {
            let mut s = lock_slot(&self.slot);
            match s.code {
                Some(code) => Some((code, on_exit)),
                None => {
                    s.notify = Some(on_exit);
                    None
                }
            }
        };
        if let Some((code, on_exit)) = ended {
            on_exit(code);
        }
        Ok(StartedShell {
            pid: self.pid,
            out: self.out,
            err: self.err,
            status: self.status,
            stdin: self.stdin,
            go: self.go,
            code: self.code,
        })
    }
}

/// A shell running its exec: the agent's ends of its descriptors.
pub struct StartedShell {
    /// Its pid, also its process group.
    pub pid: libc::pid_t,
    /// Read end of its stdout (non-blocking).
    pub out: OwnedFd,
    /// Read end of its stderr (non-blocking).
    pub err: OwnedFd,
    /// The agent's end of its status socket (non-blocking).
    pub status: OwnedFd,
    /// Write end of its stdin pipe (non-blocking).
    pub stdin: OwnedFd,
    /// Write end of the go pipe; kept until the exec is over (each close
    /// is a syscall, better spent after the Exit).
    pub go: OwnedFd,
    /// The code file; see [`never_ran`].
    pub code: OwnedFd,
}

/// Whether a shell that has died never read its code file: it was killed
/// while it waited, after the pool handed it out, so nothing of the exec
/// ran and the exec can run elsewhere. Its `read` moves the file offset it
/// shares with the agent's descriptor (the agent writes with `pwrite`,
/// which leaves the offset alone). The go byte cannot tell: a killed
/// shell that had not run yet still takes a byte written before it runs.
/// Asked only once the reaper has the shell's status.
pub fn never_ran(code_file: &OwnedFd) -> bool {
    matches!(sys::file_offset(code_file.as_raw_fd()), Ok(0))
}

/// The shells ready for execs, and the thread that refills them.
pub struct Pool {
    env: Vec<String>,
    target: usize,
    state: Mutex<PoolState>,
    /// Signalled when a refill is wanted, and when a spawn ended.
    changed: Condvar,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Shell>,
    /// The filler is starting a shell (a process spawn: ~1 s on PVM).
    spawning: bool,
}

/// How long an exec that finds no shell ready waits for the one the filler
/// is spawning, rather than spawning a bash of its own beside it (two
/// spawns at once on one vCPU take about as long each as both in turn).
pub const SPAWN_WAIT: Duration = Duration::from_secs(5);

impl Pool {
    /// A pool of `target` shells started with `env`; its filler thread
    /// starts filling at once.
    pub fn start(env: Vec<String>, target: usize) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            env,
            target,
            state: Mutex::new(PoolState::default()),
            changed: Condvar::new(),
        });
        let filler = pool.clone();
        let started = std::thread::Builder::new()
            .name("bash-pool".into())
            .stack_size(256 << 10)
            .spawn(move || filler.fill_forever());
        if let Err(e) = started {
            // Execs then take the spawn path: slower, never failing.
            console::line(&format!("podflare-agent: cannot start the bash pool: {e}"));
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A shell for an exec: a ready one, else the one being spawned (at
    /// most `wait` for it), else `None`. A shell may still be in its
    /// start-up: the exec then waits for that rest, still less than a
    /// spawn. Does not start a refill: the caller asks for one with
    /// [`Pool::refill`] once its exec has finished.
    pub fn take(&self, wait: Duration) -> Option<Shell> {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            while let Some(shell) = st.ready.pop_front() {
                if !shell.exited() {
                    return Some(shell);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !st.spawning || left.is_zero() {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Asks the filler to bring the pool back to its target.
    pub fn refill(&self) {
        self.changed.notify_all();
    }

    /// Waits until the pool holds its target (at most `limit`), so the
    /// template snapshot has its shells. Returns how many are ready.
    pub fn wait_full(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        while st.ready.len() < self.target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.ready.len()
    }

    fn fill_forever(&self) {
        let devnull = loop {
            match sys::open("/dev/null", libc::O_RDWR) {
                Ok(fd) => break fd,
                Err(e) => {
                    console::line(&format!("podflare-agent: bash pool: /dev/null: {e}"));
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
        };
        let mut failures: u32 = 0;
        loop {
            {
                let mut st = self.lock();
                loop {
                    // Shells killed while they waited are of no use.
                    st.ready.retain(|s| !s.exited());
                    if st.ready.len() < self.target {
                        break;
                    }
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.spawning = true;
            }
            let spawned = Shell::spawn(&self.env, &devnull);
            // One lock for both, so a waiting exec never sees "not
            // spawning" before the new shell is in the pool.
            let failed = {
                let mut st = self.lock();
                st.spawning = false;
                match spawned {
                    Ok(shell) => {
                        st.ready.push_back(shell);
                        None
                    }
                    Err(e) => Some(e),
                }
            };
            // Wakes execs waiting for this spawn (on a failure they take
            // the spawn path) and `wait_full`.
            self.changed.notify_all();
            if let Some(e) = failed {
                // No bash in the image, or out of descriptors: back off
                // so the (emulated, slow) guest kernel is not kept busy.
                failures = failures.saturating_add(1);
                if failures == 1 {
                    console::line(&format!("podflare-agent: bash pool: {e}"));
                }
                std::thread::sleep(Duration::from_secs(u64::from(failures.min(6)).pow(2)));
            } else {
                failures = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_parse_and_garbage_is_given_up() {
        let mut r = StatusReader::default();
        assert_eq!(r.push(b"1"), None);
        assert_eq!(r.push(b"37\n"), Some(137));
        for ok in [&b"0\n"[..], b"255\n", b"3\nrest"] {
            let expect = std::str::from_utf8(ok)
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .parse()
                .ok();
            assert_eq!(StatusReader::default().push(ok), expect);
        }
        for bad in [
            &b"256\n"[..],
            b"-1\n",
            b"\n",
            b"x\n",
            b" 3\n",
            b"123456789",
            b"\xff\n",
        ] {
            let mut r = StatusReader::default();
            assert_eq!(r.push(bad), None, "{bad:?}");
            assert!(r.gone, "{bad:?}");
            assert_eq!(r.push(b"0\n"), None, "nothing counts after garbage");
        }
    }

    #[test]
    fn code_file_has_a_header_line() {
        assert_eq!(code_file_contents("echo hi", false, 7), b"n 7\necho hi");
        assert_eq!(
            code_file_contents("a\nb\n", true, u32::MAX),
            b"i 4294967295\na\nb\n"
        );
        assert!(can_run("echo \u{e9}") && !can_run("echo \0"));
    }

    #[test]
    fn bootstrap_is_one_line_with_its_marker() {
        // One line: the user's code is `eval`ed, so its line numbers in
        // error messages are its own.
        assert!(!BOOTSTRAP.contains('\n'));
        assert!(BOOTSTRAP.ends_with("# podflare-agent prepared shell"));
        assert!(BOOTSTRAP.starts_with("trap '"));
    }
}

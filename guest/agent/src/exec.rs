//! Bash execs on port 0: one fresh bash per stream, in its own process
//! group, output streamed as it comes, then the exit code. The bash is a
//! prepared shell from the pool (`prepared.rs`) when one is ready, else a
//! `bash -c CODE` spawned for the exec.

use crate::frames::put_header;
use crate::port::{Port, MAX_WRITE};
use crate::prepared::{self, Pool, StatusReader};
use crate::spawn::{self, Command};
use crate::sys;
use podflare_proto::{Kind, HEADER_LEN};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

/// What the agent needs to run execs; shared by the reader and exec threads.
pub struct Execs {
    port: Arc<Port>,
    env: Vec<String>,
    devnull: OwnedFd,
    running: Mutex<HashMap<u32, Arc<Running>>>,
    /// Prepared shells; `None`: every exec spawns its bash.
    pool: Option<Arc<Pool>>,
}

/// The agent's ends of an exec's bash, however it was started.
struct Child {
    pid: libc::pid_t,
    out: OwnedFd,
    err: OwnedFd,
    /// Write end of its stdin, when the exec asked for stdin.
    stdin: Option<OwnedFd>,
    /// A prepared shell's status socket: its EXIT trap reports `$?` there,
    /// before the (slow) exit of the process.
    status: Option<OwnedFd>,
    /// A prepared shell's code file, to learn whether it died before it
    /// took the exec (see `prepared::never_ran`).
    code_file: Option<OwnedFd>,
    /// Closed when the exec is over.
    _keep: Vec<OwnedFd>,
}

/// How an exec's child ended as far as the agent is concerned.
enum Ended {
    /// Exit was sent.
    Reported,
    /// A prepared shell died before it took the code: nothing ran and
    /// nothing was sent, so the exec runs again in another bash.
    NeverRan,
}

/// Prepared shells tried for one exec (each found dead) before the spawn path.
const MAX_DEAD_SHELLS: usize = 4;

/// One running exec, as seen by the reader thread (Cancel, Stdin) and the
/// reaper (exit status). Both wake the exec's thread through `wake`.
struct Running {
    wake: OwnedFd,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pid: Option<libc::pid_t>,
    cancelled: bool,
    exit: Option<i32>,
    /// `None`: the exec did not ask for stdin (its stdin is /dev/null).
    stdin: Option<StdinQueue>,
}

#[derive(Default)]
struct StdinQueue {
    pending: Vec<u8>,
    close: bool,
}

impl Running {
    fn wake(&self) {
        // An eventfd write only fails if the counter would overflow, which a
        // counter of wake-ups cannot reach.
        let _ = sys::write_all(self.wake.as_raw_fd(), &1u64.to_ne_bytes());
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Execs {
    /// Exec service writing to `port`, starting children with `env`,
    /// taking prepared shells from `pool` when it has one ready.
    pub fn new(
        port: Arc<Port>,
        env: Vec<String>,
        pool: Option<Arc<Pool>>,
    ) -> io::Result<Arc<Self>> {
        let devnull = sys::open("/dev/null", libc::O_RDWR)?;
        Ok(Arc::new(Self {
            port,
            env,
            devnull,
            running: Mutex::new(HashMap::new()),
            pool,
        }))
    }

    fn get(&self, stream: u32) -> Option<Arc<Running>> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stream)
            .cloned()
    }

    /// Whether `stream` is a running exec.
    pub fn has(&self, stream: u32) -> bool {
        self.get(stream).is_some()
    }

    fn error(&self, stream: u32, msg: &str) {
        let _ = self.port.send(Kind::Error, stream, msg.as_bytes());
    }

    /// Starts `bash -c code` as stream `stream`. Runs on its own thread so the
    /// reader stays free while the spawn (slow on PVM) is in progress.
    pub fn start(self: &Arc<Self>, stream: u32, code: String, want_stdin: bool) {
        let wake = match sys::eventfd() {
            Ok(fd) => fd,
            Err(e) => return self.error(stream, &format!("exec: eventfd: {e}")),
        };
        let state = State {
            stdin: want_stdin.then(StdinQueue::default),
            ..State::default()
        };
        let run = Arc::new(Running {
            wake,
            state: Mutex::new(state),
        });
        {
            let mut map = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if map.contains_key(&stream) {
                drop(map);
                return self.error(stream, "exec: stream id already running");
            }
            map.insert(stream, run.clone());
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("exec-{stream}"))
            .stack_size(256 << 10)
            .spawn(move || {
                if let Err(e) = me.run(stream, &run, &code) {
                    me.error(stream, &format!("exec: {e}"));
                }
                me.running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&stream);
            });
        if let Err(e) = spawned {
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream);
            self.error(stream, &format!("exec: thread: {e}"));
        }
    }

    /// Kills the stream's process group; its exit (137) is reported as usual.
    pub fn cancel(&self, stream: u32) {
        if let Some(run) = self.get(stream) {
            let mut st = run.lock();
            st.cancelled = true;
            if let Some(pid) = st.pid {
                sys::kill_group(pid, libc::SIGKILL);
            }
        }
    }

    /// Queues bytes for the stream's stdin (ignored if it has none).
    pub fn stdin(&self, stream: u32, data: &[u8]) {
        if let Some(run) = self.get(stream) {
            let mut st = run.lock();
            if let Some(q) = st.stdin.as_mut().filter(|q| !q.close) {
                q.pending.extend_from_slice(data);
                drop(st);
                run.wake();
            }
        }
    }

    /// Closes the stream's stdin once queued bytes are written.
    pub fn close_stdin(&self, stream: u32) {
        if let Some(run) = self.get(stream) {
            let mut st = run.lock();
            if let Some(q) = st.stdin.as_mut() {
                q.close = true;
                drop(st);
                run.wake();
            }
        }
    }

    fn run(&self, stream: u32, run: &Arc<Running>, code: &str) -> io::Result<()> {
        let want_stdin = run.lock().stdin.is_some();
        let mut dead_shells = 0;
        let result = loop {
            let prepared = if dead_shells < MAX_DEAD_SHELLS {
                self.start_prepared(run, code, want_stdin)
            } else {
                None
            };
            let child = match prepared {
                Some(child) => child,
                None => self.spawn_bash(run, code, want_stdin)?,
            };
            {
                let mut st = run.lock();
                st.pid = Some(child.pid);
                if st.cancelled {
                    sys::kill_group(child.pid, libc::SIGKILL);
                }
            }
            match self.pump(stream, run, child) {
                Ok(Ended::NeverRan) => {
                    dead_shells += 1;
                    let mut st = run.lock();
                    st.exit = None;
                    st.pid = None;
                }
                Ok(Ended::Reported) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        // The refill starts only now, after this exec's Exit went out (it
        // runs at idle priority, so it does not slow the next exec either).
        if let Some(pool) = &self.pool {
            pool.refill();
        }
        result
    }

    /// Runs `code` in a prepared shell, if one is ready and can run it.
    fn start_prepared(&self, run: &Arc<Running>, code: &str, want_stdin: bool) -> Option<Child> {
        let pool = self.pool.as_ref()?;
        if !prepared::can_run(code) {
            return None;
        }
        // A fresh seed per exec: every copy of the template holds the same
        // prepared shells, and so the same `RANDOM` state.
        let seed = sys::random_u32()
            .unwrap_or_else(|_| (sys::realtime_ns() as u32) ^ ((sys::realtime_ns() >> 32) as u32));
        while let Some(shell) = pool.take(prepared::SPAWN_WAIT) {
            let notify = run.clone();
            let on_exit: spawn::OnExit = Box::new(move |code| {
                notify.lock().exit = Some(code);
                notify.wake();
            });
            // A shell that died while it waited: try the next one.
            if let Ok(started) = shell.start(code, want_stdin, seed, on_exit) {
                let mut keep = vec![started.go];
                let stdin = if want_stdin {
                    Some(started.stdin)
                } else {
                    keep.push(started.stdin);
                    None
                };
                return Some(Child {
                    pid: started.pid,
                    out: started.out,
                    err: started.err,
                    stdin,
                    status: Some(started.status),
                    code_file: Some(started.code),
                    _keep: keep,
                });
            }
        }
        None
    }

    /// Spawns `bash -c code` for this exec (no prepared shell ready).
    fn spawn_bash(&self, run: &Arc<Running>, code: &str, want_stdin: bool) -> io::Result<Child> {
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        sys::set_nonblock(&out_r)?;
        sys::set_nonblock(&err_r)?;
        let (stdin_r, stdin_w) = if want_stdin {
            let (r, w) = sys::pipe()?;
            sys::set_nonblock(&w)?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let child_stdin = stdin_r
            .as_ref()
            .map_or(self.devnull.as_raw_fd(), |fd| fd.as_raw_fd());
        let notify = run.clone();
        let pid = spawn::spawn(
            &Command {
                program: "/bin/bash",
                args: &["bash", "-c", code],
                env: &self.env,
                cwd: "/root",
                fds: &[child_stdin, out_w.as_raw_fd(), err_w.as_raw_fd()],
                new_group: true,
                terminal: None,
                idle: false,
            },
            Box::new(move |code| {
                notify.lock().exit = Some(code);
                notify.wake();
            }),
        )?;
        // Only the child holds the write ends now, so EOF means it (and
        // everything that inherited them) closed its output.
        drop((out_w, err_w, stdin_r));
        Ok(Child {
            pid,
            out: out_r,
            err: err_r,
            stdin: stdin_w,
            status: None,
            code_file: None,
            _keep: Vec::new(),
        })
    }

    /// Moves the exec's output to the port and stdin to the child until the
    /// exit status is known, then sends the rest of the output and Exit.
    fn pump(&self, stream: u32, run: &Arc<Running>, child: Child) -> io::Result<Ended> {
        let Child {
            out,
            err,
            stdin: mut stdin_w,
            status: mut status_r,
            code_file,
            _keep,
            ..
        } = child;
        let mut status = StatusReader::default();
        let mut buf = vec![0u8; MAX_WRITE];
        let mut open = [Some(out), Some(err)];
        let kinds = [Kind::Stdout, Kind::Stderr];
        loop {
            let fd_of = |o: &Option<OwnedFd>| o.as_ref().map_or(-1, |fd| fd.as_raw_fd());
            let stdin_fd = match (&stdin_w, run.lock().stdin.as_ref()) {
                (Some(w), Some(q)) if !q.pending.is_empty() => w.as_raw_fd(),
                _ => -1,
            };
            let mut pfd = [
                pollfd(fd_of(&open[0]), libc::POLLIN),
                pollfd(fd_of(&open[1]), libc::POLLIN),
                pollfd(run.wake.as_raw_fd(), libc::POLLIN),
                pollfd(stdin_fd, libc::POLLOUT),
                // Kept open after a garbled report, just not read: closing
                // it would kill the shell with SIGPIPE when its trap writes.
                pollfd(
                    if status.gone { -1 } else { fd_of(&status_r) },
                    libc::POLLIN,
                ),
            ];
            sys::poll(&mut pfd, -1)?;
            // The trap's report: the exit status, while the process may
            // still be exiting (its mm teardown takes ~0.4 s on PVM).
            let mut reported = None;
            if pfd[4].revents != 0 {
                if let Some(fd) = &status_r {
                    let mut bytes = [0u8; 16];
                    match sys::read(fd.as_raw_fd(), &mut bytes) {
                        Ok(n) if n > 0 => reported = status.push(&bytes[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // EOF with no report (the user's code replaced our
                        // EXIT trap, or a signal killed the shell): the
                        // reaper's status decides.
                        _ => status.gone = true,
                    }
                    // Hang up on a garbled report: a trap waiting for that
                    // ends, one yet to write ignores SIGPIPE; either way
                    // the reaper's status counts.
                    if status.gone {
                        status_r = None;
                    }
                }
            }
            for i in 0..2 {
                if pfd[i].revents != 0 {
                    if let Some(fd) = &open[i] {
                        if !self.forward(fd.as_raw_fd(), kinds[i], stream, &mut buf)? {
                            open[i] = None;
                        }
                    }
                }
            }
            if pfd[2].revents != 0 {
                let mut counter = [0u8; 8];
                let _ = sys::read(run.wake.as_raw_fd(), &mut counter);
            }
            // Feed stdin (non-blocking); close it when asked and drained.
            let exit = {
                let mut st = run.lock();
                if let (Some(w), Some(q)) = (&stdin_w, st.stdin.as_mut()) {
                    if !q.pending.is_empty() {
                        // SAFETY: `pending` is valid readable memory of its length.
                        let n = unsafe {
                            libc::write(w.as_raw_fd(), q.pending.as_ptr().cast(), q.pending.len())
                        };
                        if n > 0 {
                            q.pending.drain(..n as usize);
                        } else if n < 0
                            && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
                        {
                            // The child closed its stdin: drop what it will never read.
                            q.pending.clear();
                            q.close = true;
                        }
                    }
                    if q.close && q.pending.is_empty() {
                        stdin_w = None;
                    }
                }
                st.exit
            };
            // The reaper's status, when it is there, is the process's own
            // (a catchable signal runs the EXIT trap with a stale `$?`).
            if reported.is_none() && exit.is_some() {
                if let Some(file) = &code_file {
                    if prepared::never_ran(file) {
                        return Ok(Ended::NeverRan);
                    }
                }
            }
            if let Some(code) = exit.or(reported) {
                // The child is gone. What it wrote before exiting is already
                // in the pipes: take it without blocking (a background process
                // may keep a pipe open forever) and send it with Exit in one write.
                let mut tail = Vec::new();
                for i in 0..2 {
                    if let Some(fd) = &open[i] {
                        drain_into(fd.as_raw_fd(), kinds[i], stream, &mut buf, &mut tail);
                    }
                }
                let start = tail.len();
                tail.resize(start + HEADER_LEN + 4, 0);
                put_header(&mut tail[start..], Kind::Exit, stream, 4);
                tail[start + HEADER_LEN..].copy_from_slice(&code.to_le_bytes());
                let sent = self.port.write_raw(&tail);
                if reported.is_some() && exit.is_none() {
                    // The shell waits in its trap for us to hang up (when
                    // `_keep` and the status socket close, right after
                    // this): its exit then runs at idle priority, behind
                    // the next exec. It is blocked, not reaped: the pid is
                    // still its own.
                    if let Some(pid) = run.lock().pid {
                        let _ = sys::set_sched_idle(pid, true);
                    }
                }
                return sent.map(|()| Ended::Reported);
            }
        }
    }

    /// Forwards one read of `fd` as a frame. `Ok(false)` at EOF.
    fn forward(&self, fd: RawFd, kind: Kind, stream: u32, buf: &mut [u8]) -> io::Result<bool> {
        match sys::read(fd, &mut buf[HEADER_LEN..]) {
            Ok(0) => Ok(false),
            Ok(n) => {
                put_header(buf, kind, stream, n);
                self.port.write_raw(&buf[..HEADER_LEN + n])?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(_) => Ok(false),
        }
    }
}

/// Appends frames for everything readable on `fd` right now.
fn drain_into(fd: RawFd, kind: Kind, stream: u32, buf: &mut [u8], out: &mut Vec<u8>) {
    while let Ok(n) = sys::read(fd, &mut buf[HEADER_LEN..]) {
        if n == 0 {
            break;
        }
        put_header(buf, kind, stream, n);
        out.extend_from_slice(&buf[..HEADER_LEN + n]);
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

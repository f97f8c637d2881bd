//! Terminal sessions on port 0: a program on a new pseudo-terminal, its
//! output streamed as `Stdout` as it comes, `Stdin` typed into it, `Resize`
//! and `Cancel` applied to it, then its exit code.
//!
//! Each session has its own thread, as a bash exec does: it owns the master
//! side and blocks in `poll` on it and on an eventfd through which the
//! reader thread (input) and the reaper (exit status) wake it. Nothing here
//! depends on the host connection, so a session carries on across a snapshot,
//! restore or fork of the VM like any other process.

use crate::frames::put_header;
use crate::port::{Sink, MAX_WRITE};
use crate::spawn::{self, Command};
use crate::sys;
use podflare_proto::{Kind, PtyRequest, PtySize, HEADER_LEN};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Set on top of the agent's child environment (before the request's own).
const TERM: &str = "TERM=xterm-256color";
/// Working directory when the request names none (the same as bash execs').
const DEFAULT_CWD: &str = "/root";
/// Search path when the environment has none (execvp's default).
const DEFAULT_PATH: &str = "/bin:/usr/bin";
/// Once the session leader has exited, the session ends as soon as no slave
/// descriptor is open (reads give EIO). A background process that still
/// holds the terminal must not keep it alive: then the session ends when the
/// terminal has been quiet this long...
const QUIET: Duration = Duration::from_millis(200);
/// ...or this long after the leader's exit, whichever comes first.
const LINGER_MAX: Duration = Duration::from_secs(2);

/// Terminal sessions, shared by the reader thread and the session threads.
pub struct Ptys {
    out: Arc<dyn Sink>,
    env: Vec<String>,
    sessions: Mutex<HashMap<u32, Arc<Session>>>,
}

/// One session as the reader thread (Stdin, Resize, Cancel), the reaper
/// (exit status) and its own thread see it.
struct Session {
    wake: OwnedFd,
    /// The master side, set once by the session thread when it exists.
    master: OnceLock<OwnedFd>,
    state: Mutex<State>,
}

struct State {
    /// Latest size asked for; applied when the terminal is created.
    size: PtySize,
    pid: Option<libc::pid_t>,
    cancelled: bool,
    exit: Option<i32>,
    /// Input not yet accepted by the terminal.
    input: Vec<u8>,
    /// No slave descriptor is open any more: input has no reader.
    hung_up: bool,
}

impl Session {
    fn wake(&self) {
        // An eventfd write only fails if the counter would overflow, which a
        // counter of wake-ups cannot reach.
        let _ = sys::write_all(self.wake.as_raw_fd(), &1u64.to_ne_bytes());
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Ptys {
    /// Session service writing frames to `out`, starting children with `env`
    /// (`KEY=value` strings).
    pub fn new(out: Arc<dyn Sink>, env: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            out,
            env,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<u32, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, stream: u32) -> Option<Arc<Session>> {
        self.map().get(&stream).cloned()
    }

    /// Whether `stream` is a running session.
    pub fn has(&self, stream: u32) -> bool {
        self.map().contains_key(&stream)
    }

    fn send(&self, kind: Kind, stream: u32, payload: &[u8]) -> io::Result<()> {
        let mut f = vec![0u8; HEADER_LEN + payload.len()];
        put_header(&mut f, kind, stream, payload.len());
        f[HEADER_LEN..].copy_from_slice(payload);
        self.out.send_frames(&f)
    }

    fn error(&self, stream: u32, msg: &str) {
        let _ = self.send(Kind::Error, stream, msg.as_bytes());
    }

    /// Starts session `stream`. Runs on its own thread so the reader stays
    /// free while the spawn (slow on PVM) is in progress.
    pub fn start(self: &Arc<Self>, stream: u32, req: PtyRequest) {
        let wake = match sys::eventfd() {
            Ok(fd) => fd,
            Err(e) => return self.error(stream, &format!("pty: eventfd: {e}")),
        };
        let session = Arc::new(Session {
            wake,
            master: OnceLock::new(),
            state: Mutex::new(State {
                size: req.size,
                pid: None,
                cancelled: false,
                exit: None,
                input: Vec::new(),
                hung_up: false,
            }),
        });
        {
            let mut map = self.map();
            if map.contains_key(&stream) {
                drop(map);
                return self.error(stream, "pty: stream id already running");
            }
            map.insert(stream, session.clone());
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("pty-{stream}"))
            .stack_size(256 << 10)
            .spawn(move || {
                if let Err(msg) = me.run(stream, &session, &req) {
                    me.error(stream, &msg);
                }
                // Dropping the last reference closes the master: whatever
                // still holds the slave gets a hangup.
                me.map().remove(&stream);
            });
        if let Err(e) = spawned {
            self.map().remove(&stream);
            self.error(stream, &format!("pty: thread: {e}"));
        }
    }

    /// Queues input for the session's terminal. `false`: no such session.
    pub fn stdin(&self, stream: u32, data: &[u8]) -> bool {
        let Some(s) = self.get(stream) else {
            return false;
        };
        let mut st = s.lock();
        if !st.hung_up && !data.is_empty() {
            st.input.extend_from_slice(data);
            drop(st);
            s.wake();
        }
        true
    }

    /// `CloseStdin` on a terminal does nothing: a terminal has no end of
    /// input of its own (the program sees EOF when it reads an EOF character,
    /// `\x04` by default, which the host can send as input). `false`: no such
    /// session.
    pub fn close_stdin(&self, stream: u32) -> bool {
        self.has(stream)
    }

    /// Sets the session's terminal size. `false`: no such session.
    pub fn resize(&self, stream: u32, size: PtySize) -> bool {
        let Some(s) = self.get(stream) else {
            return false;
        };
        // Under the state lock, so this and the session thread's first
        // setting cannot apply an older size last.
        let mut st = s.lock();
        st.size = size;
        if let Some(master) = s.master.get() {
            let _ = sys::set_winsize(master, size.rows, size.cols);
        }
        true
    }

    /// Kills the session's process group (the leader's, which `setsid` made
    /// its pid); the session still ends with `Exit` (137). `false`: no such
    /// session.
    pub fn cancel(&self, stream: u32) -> bool {
        let Some(s) = self.get(stream) else {
            return false;
        };
        let mut st = s.lock();
        st.cancelled = true;
        if let Some(pid) = st.pid {
            sys::kill_group(pid, libc::SIGKILL);
        }
        true
    }

    /// The session thread: start, `Started`, pump, `Exit`. `Err` is the
    /// message of the `Error` frame that ends the stream instead.
    fn run(&self, stream: u32, s: &Arc<Session>, req: &PtyRequest) -> Result<(), String> {
        let master = self.start_child(s, req)?;
        self.send(Kind::Started, stream, &[])
            .map_err(|e| format!("pty: {e}"))?;
        let code = self
            .pump(stream, s, master)
            .map_err(|e| format!("pty: {e}"))?;
        self.send(Kind::Exit, stream, &code.to_le_bytes())
            .map_err(|e| format!("pty: {e}"))
    }

    /// Creates the terminal and starts the program on it; returns the master.
    fn start_child<'s>(
        &self,
        s: &'s Arc<Session>,
        req: &PtyRequest,
    ) -> Result<&'s OwnedFd, String> {
        let Some(argv0) = req.argv.first() else {
            return Err("spawn failed: empty argv".into());
        };
        let env = session_env(&self.env, &req.env)?;
        let cwd = req.cwd.as_deref().unwrap_or(DEFAULT_CWD);
        let path = env
            .iter()
            .rev()
            .find_map(|v| v.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let program = find_program(argv0, path, cwd).map_err(|e| spawn_failed(&e, argv0))?;

        let pty_err = |e: io::Error| format!("pty: {e}");
        let created = sys::pty_open().map_err(pty_err)?;
        sys::pty_unlock(&created).map_err(pty_err)?;
        let slave = sys::pty_slave_path(&created).map_err(pty_err)?;
        let master = s.master.get_or_init(|| created);
        {
            // The size is set before the program starts, so its first look
            // at the terminal sees it.
            let st = s.lock();
            sys::set_winsize(master, st.size.rows, st.size.cols).map_err(pty_err)?;
        }

        let args: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        // Weak: an exit status arriving after the session ended must not
        // keep its terminal open.
        let notify: Weak<Session> = Arc::downgrade(s);
        let pid = spawn::spawn(
            &Command {
                program: &program,
                args: &args,
                env: &env,
                cwd,
                fds: &[],
                new_group: false,
                terminal: Some(&slave),
                idle: false,
            },
            Box::new(move |code| {
                if let Some(s) = notify.upgrade() {
                    s.lock().exit = Some(code);
                    s.wake();
                }
            }),
        )
        .map_err(|e| match std::fs::metadata(cwd) {
            // posix_spawn reports a failed chdir and a failed exec alike:
            // tell them apart for the person reading the message.
            Err(ce) => format!("spawn failed: cwd {cwd}: {}", describe(&ce)),
            Ok(m) if !m.is_dir() => format!("spawn failed: cwd {cwd}: Not a directory"),
            Ok(_) => spawn_failed(&e, argv0),
        })?;
        let mut st = s.lock();
        st.pid = Some(pid);
        if st.cancelled {
            sys::kill_group(pid, libc::SIGKILL);
        }
        Ok(master)
    }

    /// Moves bytes between the terminal and the port until the session ends;
    /// returns the leader's exit code.
    fn pump(&self, stream: u32, s: &Session, master: &OwnedFd) -> io::Result<i32> {
        let mut buf = vec![0u8; MAX_WRITE];
        // False once reads give EIO: no slave descriptor is open any more.
        let mut reading = true;
        let mut exited_at: Option<Instant> = None;
        let mut last_output = Instant::now();
        loop {
            let (exit, want_write) = {
                let st = s.lock();
                (st.exit, reading && !st.input.is_empty())
            };
            let mut timeout = -1;
            if let Some(code) = exit {
                if !reading {
                    return Ok(code);
                }
                let now = Instant::now();
                let exited = *exited_at.get_or_insert(now);
                let deadline = (last_output.max(exited) + QUIET).min(exited + LINGER_MAX);
                if now >= deadline {
                    return Ok(code);
                }
                // Rounded up, so the deadline has passed when poll returns.
                timeout = (deadline - now).as_millis().min(60_000) as libc::c_int + 1;
            }
            let mut events = libc::POLLIN;
            if want_write {
                events |= libc::POLLOUT;
            }
            let master_fd: RawFd = if reading { master.as_raw_fd() } else { -1 };
            let mut pfd = [
                pollfd(master_fd, events),
                pollfd(s.wake.as_raw_fd(), libc::POLLIN),
            ];
            sys::poll(&mut pfd, timeout)?;
            if pfd[1].revents != 0 {
                let mut counter = [0u8; 8];
                let _ = sys::read(s.wake.as_raw_fd(), &mut counter);
            }
            if pfd[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                match sys::read(master.as_raw_fd(), &mut buf[HEADER_LEN..]) {
                    Ok(n) if n > 0 => {
                        put_header(&mut buf, Kind::Stdout, stream, n);
                        self.out.send_frames(&buf[..HEADER_LEN + n])?;
                        last_output = Instant::now();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // EIO (the kernel returns it only once the output is
                    // drained): the terminal has no slave side left.
                    _ => reading = false,
                }
            }
            // Feed queued input without blocking: when it arrives (a wake-up)
            // and when the terminal has room again (POLLOUT), not on every
            // output chunk.
            let mut st = s.lock();
            if !reading {
                st.hung_up = true;
                st.input = Vec::new();
            } else if !st.input.is_empty()
                && (pfd[1].revents != 0 || pfd[0].revents & libc::POLLOUT != 0)
            {
                match sys::write(master.as_raw_fd(), &st.input) {
                    Ok(n) => {
                        st.input.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The terminal is hanging up: its next read says so.
                    Err(_) => st.input.clear(),
                }
            }
        }
    }
}

/// The agent's child environment, then `TERM`, then the request's pairs;
/// a later value of a name replaces the earlier one.
fn session_env(base: &[String], extra: &[(String, String)]) -> Result<Vec<String>, String> {
    let mut env: Vec<String> = base.to_vec();
    let mut set = |name: &str, entry: String| {
        env.retain(|v| !matches!(v.split_once('='), Some((k, _)) if k == name));
        env.push(entry);
    };
    set("TERM", TERM.to_string());
    for (k, v) in extra {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("spawn failed: bad environment variable name {k:?}"));
        }
        if v.contains('\0') {
            return Err(format!("spawn failed: NUL byte in the value of {k}"));
        }
        set(k, format!("{k}={v}"));
    }
    Ok(env)
}

/// Finds the program `name` the way execvp would in the child: as given if
/// it contains a slash, else the first executable regular file of that name
/// in the directories of `path` (relative ones taken from `cwd`, the
/// child's working directory). One `stat` per directory tried.
fn find_program(name: &str, path: &str, cwd: &str) -> io::Result<String> {
    if name.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if name.contains('/') {
        return Ok(name.to_string());
    }
    let mut denied = false;
    for dir in path.split(':') {
        let candidate = match dir {
            "" => format!("{cwd}/{name}"),
            d if d.starts_with('/') => format!("{d}/{name}"),
            d => format!("{cwd}/{d}/{name}"),
        };
        if let Ok(m) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
            denied = true;
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

/// "spawn failed: No such file or directory (bash)".
fn spawn_failed(e: &io::Error, argv0: &str) -> String {
    format!("spawn failed: {} ({argv0})", describe(e))
}

/// An error's text without Rust's " (os error N)" suffix.
fn describe(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podflare_proto::{exit_code, Decoder};
    use std::sync::{Condvar, Once};

    /// Collects frames instead of a port.
    #[derive(Default)]
    struct Collect {
        bytes: Mutex<Vec<u8>>,
        more: Condvar,
    }

    impl Sink for Collect {
        fn send_frames(&self, bytes: &[u8]) -> io::Result<()> {
            self.bytes.lock().unwrap().extend_from_slice(bytes);
            self.more.notify_all();
            Ok(())
        }
    }

    /// What one stream produced.
    #[derive(Debug, Default)]
    struct Outcome {
        started: bool,
        out: String,
        exit: Option<i32>,
        error: Option<String>,
        /// Kinds in arrival order.
        kinds: Vec<Kind>,
    }

    impl Collect {
        fn outcome(&self, stream: u32) -> Outcome {
            let mut d = Decoder::new();
            d.push(&self.bytes.lock().unwrap());
            let mut o = Outcome::default();
            let mut out = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                if f.stream != stream {
                    continue;
                }
                o.kinds.push(f.kind);
                match f.kind {
                    Kind::Started => o.started = true,
                    Kind::Stdout => out.extend_from_slice(&f.payload),
                    Kind::Exit => o.exit = Some(exit_code(&f.payload)),
                    Kind::Error => o.error = Some(String::from_utf8_lossy(&f.payload).into()),
                    other => panic!("unexpected {other:?} on a pty stream"),
                }
            }
            o.out = String::from_utf8_lossy(&out).into_owned();
            o
        }

        /// Waits (bounded) until `done` holds for the stream's outcome.
        fn wait(&self, stream: u32, limit: Duration, done: impl Fn(&Outcome) -> bool) -> Outcome {
            let end = Instant::now() + limit;
            loop {
                let o = self.outcome(stream);
                if done(&o) || Instant::now() >= end {
                    return o;
                }
                let g = self.bytes.lock().unwrap();
                let _ = self
                    .more
                    .wait_timeout(g, Duration::from_millis(50))
                    .unwrap();
            }
        }

        fn finished(&self, stream: u32) -> Outcome {
            self.wait(stream, Duration::from_secs(20), |o| {
                o.exit.is_some() || o.error.is_some()
            })
        }
    }

    fn service() -> (Arc<Ptys>, Arc<Collect>) {
        static REAPER: Once = Once::new();
        REAPER.call_once(|| {
            std::thread::spawn(|| spawn::reap_forever());
        });
        let sink = Arc::new(Collect::default());
        (Ptys::new(sink.clone(), crate::env::child_env(false)), sink)
    }

    fn req(argv: &[&str], rows: u16, cols: u16) -> PtyRequest {
        PtyRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            size: PtySize { cols, rows },
            cwd: Some("/".into()),
            env: vec![],
        }
    }

    #[test]
    fn size_is_set_before_start_and_output_streams() {
        let (p, sink) = service();
        p.start(
            1,
            req(&["sh", "-c", "stty size; echo hi; echo $TERM"], 40, 120),
        );
        let o = sink.finished(1);
        assert_eq!(o.exit, Some(0), "{o:?}");
        assert_eq!(o.out, "40 120\r\nhi\r\nxterm-256color\r\n");
        assert_eq!(o.kinds.first(), Some(&Kind::Started));
        assert_eq!(o.kinds.last(), Some(&Kind::Exit));
        // The session leaves the table right after its Exit.
        let end = Instant::now() + Duration::from_secs(5);
        while p.has(1) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!p.has(1));
    }

    #[test]
    fn the_program_has_a_controlling_terminal_and_its_own_session() {
        let (p, sink) = service();
        // A descriptor without close-on-exec, as a harness may pass the agent.
        let devnull = sys::open("/dev/null", libc::O_RDONLY).unwrap();
        // SAFETY: plain syscall on a descriptor this test owns; the copy is
        // closed below.
        let leaky = unsafe { libc::dup(devnull.as_raw_fd()) };
        assert!(leaky > 2);
        // `tty` names the terminal; /dev/tty opens only with a controlling
        // one; fields 5 and 6 of /proc/PID/stat are the process group and
        // the session, both the shell's own pid after setsid.
        p.start(
            2,
            req(
                &[
                    "sh",
                    "-c",
                    "tty; echo x >/dev/tty && echo ctty; set -- $(cat /proc/$$/stat); \
                     [ $5 -eq $$ ] && [ $6 -eq $$ ] && echo leader; ls /proc/$$/fd",
                ],
                24,
                80,
            ),
        );
        let o = sink.finished(2);
        // SAFETY: `leaky` is this test's own copy, closed once.
        unsafe { libc::close(leaky) };
        assert_eq!(o.exit, Some(0), "{o:?}");
        let lines: Vec<&str> = o.out.split("\r\n").collect();
        assert!(lines[0].starts_with("/dev/pts/"), "{o:?}");
        assert_eq!(&lines[1..4], ["x", "ctty", "leader"], "{o:?}");
        // The terminal and nothing else.
        let fds: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(fds, ["0", "1", "2"], "{o:?}");
    }

    #[test]
    fn env_cwd_and_path_lookup() {
        let (p, sink) = service();
        let mut r = req(&["sh", "-c", "pwd; echo $A $TERM"], 24, 80);
        r.cwd = Some("/tmp".into());
        r.env = vec![
            ("A".into(), "1".into()),
            ("TERM".into(), "dumb".into()),
            ("A".into(), "2".into()),
        ];
        p.start(3, r);
        let o = sink.finished(3);
        assert_eq!(
            (o.out.as_str(), o.exit),
            ("/tmp\r\n2 dumb\r\n", Some(0)),
            "{o:?}"
        );
    }

    #[test]
    fn start_failures_are_one_error_frame() {
        let (p, sink) = service();
        p.start(4, req(&["no-such-program-here"], 24, 80));
        p.start(5, req(&["/no/such/file"], 24, 80));
        let mut bad_cwd = req(&["sh", "-c", "true"], 24, 80);
        bad_cwd.cwd = Some("/no/such/dir".into());
        p.start(6, bad_cwd);
        let mut bad_env = req(&["sh"], 24, 80);
        bad_env.env = vec![("A=B".into(), "x".into())];
        p.start(7, bad_env);
        p.start(8, req(&[], 24, 80));
        let expect = [
            (
                4,
                "spawn failed: No such file or directory (no-such-program-here)",
            ),
            (5, "spawn failed: No such file or directory (/no/such/file)"),
            (
                6,
                "spawn failed: cwd /no/such/dir: No such file or directory",
            ),
            (7, "spawn failed: bad environment variable name \"A=B\""),
            (8, "spawn failed: empty argv"),
        ];
        for (stream, msg) in expect {
            let o = sink.finished(stream);
            assert_eq!(o.kinds, [Kind::Error], "{o:?}");
            assert_eq!(o.error.as_deref(), Some(msg));
        }
    }

    #[test]
    fn input_resize_and_cancel() {
        let (p, sink) = service();
        p.start(
            9,
            req(
                &["sh", "-c", "read a; stty size; echo got=$a; sleep 60"],
                24,
                80,
            ),
        );
        let o = sink.wait(9, Duration::from_secs(20), |o| o.started);
        assert!(o.started, "{o:?}");
        assert!(p.resize(9, PtySize { cols: 30, rows: 10 }));
        assert!(p.stdin(9, b"hel"));
        assert!(p.stdin(9, b"lo\n"));
        assert!(p.close_stdin(9), "CloseStdin is accepted (and ignored)");
        let o = sink.wait(9, Duration::from_secs(20), |o| o.out.contains("got="));
        // The terminal echoes the typed line, then the program's output.
        assert_eq!(o.out, "hello\r\n10 30\r\ngot=hello\r\n", "{o:?}");
        let t = Instant::now();
        assert!(p.cancel(9));
        let o = sink.finished(9);
        assert_eq!(o.exit, Some(128 + libc::SIGKILL), "{o:?}");
        assert!(t.elapsed() < Duration::from_secs(10));
        // Frames for streams that are not sessions are left to the execs.
        assert!(!p.stdin(99, b"x") && !p.cancel(99) && !p.resize(99, PtySize { cols: 1, rows: 1 }));
    }

    /// A background process that keeps the terminal open (it ignores the
    /// hangup) ends the session a short moment after the leader exits.
    #[test]
    fn a_background_holder_does_not_keep_the_session() {
        let (p, sink) = service();
        let t = Instant::now();
        p.start(
            10,
            req(
                &["sh", "-c", "trap '' HUP; sleep 30 & echo bg=$!; exit 3"],
                24,
                80,
            ),
        );
        let o = sink.finished(10);
        let bg: Option<libc::pid_t> = o
            .out
            .trim()
            .strip_prefix("bg=")
            .and_then(|v| v.parse().ok());
        let mut held = false;
        if let Some(pid) = bg {
            // SAFETY: plain syscalls on the test's own background sleep.
            unsafe {
                held = libc::kill(pid, 0) == 0;
                libc::kill(pid, libc::SIGKILL);
            }
        }
        assert_eq!(o.exit, Some(3), "{o:?}");
        assert!(held, "the holder was still running at Exit: {o:?}");
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }

    /// A background holder that keeps writing ends the session at the cap.
    #[test]
    fn a_chatty_background_holder_is_cut_off() {
        let (p, sink) = service();
        // The loop ends by itself once the terminal is gone (echo fails).
        p.start(
            11,
            req(
                &[
                    "sh",
                    "-c",
                    "trap '' HUP; (while echo x; do sleep 0.05; done) & sleep 0.2",
                ],
                24,
                80,
            ),
        );
        let o = sink.wait(11, Duration::from_secs(20), |o| o.started);
        let t = Instant::now();
        let o2 = sink.finished(11);
        assert_eq!(o2.exit, Some(0), "{o:?} {o2:?}");
        assert!(t.elapsed() >= LINGER_MAX, "{:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    }

    #[test]
    fn env_merging_and_program_lookup() {
        let base = vec![
            "PATH=/bin".to_string(),
            "TERM=xterm".to_string(),
            "X=1".into(),
        ];
        let env = session_env(
            &base,
            &[("X".into(), "2".into()), ("Y".into(), "a=b".into())],
        )
        .unwrap();
        assert_eq!(env, ["PATH=/bin", "TERM=xterm-256color", "X=2", "Y=a=b"]);
        assert!(session_env(&base, &[("".into(), "v".into())]).is_err());
        assert!(session_env(&base, &[("K".into(), "a\0b".into())]).is_err());
        assert_eq!(
            find_program("sh", "/nonexistent::/bin", "/").unwrap(),
            "/bin/sh"
        );
        assert_eq!(find_program("./x", "/bin", "/").unwrap(), "./x");
        let e = find_program("no-such-program-here", "/bin", "/").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // A directory of that name is not a program.
        let e = find_program("tmp", "/", "/").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        assert_eq!(
            describe(&io::Error::from_raw_os_error(libc::ENOENT)),
            "No such file or directory"
        );
    }
}

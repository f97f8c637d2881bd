//! Bash execs on port 0: one fresh `bash -c CODE` per stream, in its own
//! process group, output streamed as it comes, then the exit code.

use crate::frames::put_header;
use crate::port::{Port, MAX_WRITE};
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
}

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
    /// Exec service writing to `port`, starting children with `env`.
    pub fn new(port: Arc<Port>, env: Vec<String>) -> io::Result<Arc<Self>> {
        let devnull = sys::open("/dev/null", libc::O_RDWR)?;
        Ok(Arc::new(Self {
            port,
            env,
            devnull,
            running: Mutex::new(HashMap::new()),
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
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        sys::set_nonblock(&out_r)?;
        sys::set_nonblock(&err_r)?;
        let want_stdin = run.lock().stdin.is_some();
        let (stdin_r, mut stdin_w) = if want_stdin {
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
            },
            Box::new(move |code| {
                notify.lock().exit = Some(code);
                notify.wake();
            }),
        )?;
        // Only the child holds the write ends now, so EOF means it (and
        // everything that inherited them) closed its output.
        drop((out_w, err_w, stdin_r));
        {
            let mut st = run.lock();
            st.pid = Some(pid);
            if st.cancelled {
                sys::kill_group(pid, libc::SIGKILL);
            }
        }

        let mut buf = vec![0u8; MAX_WRITE];
        let mut open = [Some(out_r), Some(err_r)];
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
            ];
            sys::poll(&mut pfd, -1)?;
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
            if let Some(code) = exit {
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
                return self.port.write_raw(&tail);
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

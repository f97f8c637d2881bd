//! The HTTP/1.1 transport, bounded in every dimension a client controls.
//!
//! Threads: one accept thread and `PODFLARE_HTTP_WORKERS` workers; no
//! thread per connection, no async runtime.
//!
//! - The accept thread ([`accept`]) accepts while fewer than
//!   `PODFLARE_MAX_CONNECTIONS` are open (past that: 503 and close), and
//!   keeps every connection that waits for bytes in one `poll` set with a
//!   deadline: the head timeout from the connect or from a request's first
//!   byte, the body timeout since the last body byte, the idle timeout
//!   between requests.
//! - A connection with bytes to read goes on one queue ([`worker::Queue`]).
//!   A worker reads what is there without blocking ([`conn`]), parks the
//!   connection again if the request is incomplete, or answers one request
//!   and puts the connection at the queue's tail if more is buffered
//!   (pipelining takes turns), else back to the accept thread. So a silent
//!   or slow client holds a slot and a bounded buffer, never a worker.
//! - Writes block with a deadline ([`response`]): a client that does not
//!   read holds a worker for the write timeout at most; an exec stream it
//!   stops reading is drained without writing.
//!
//! Each thread installs its seccomp filter before anything else
//! ([`crate::seccomp`]); [`serve`] returns only once every one has, and
//! fails (stopping them all) if one could not.
//!
//! Heads are parsed by httparse and bounded ([`request`]): 64 KiB and 100
//! headers, else 431; bodies by `PODFLARE_MAX_BODY_MIB`, else 413, checked
//! on the declared length before a byte of body is read.

pub mod accept;
pub mod conn;
pub mod request;
pub mod response;
pub mod worker;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use self::accept::Acceptor;
use self::conn::Limits;
use self::worker::{Ctx, Queue};
use super::auth::Gate;
use crate::config::Config;
use crate::obs::Logger;
use crate::sandbox::Controller;
use crate::seccomp::{self, SeccompError, ThreadKind};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener (or the internal wake-up socket) could not be set up.
    #[error("cannot serve on the listener")]
    Listen(#[source] io::Error),
    /// A thread could not be spawned.
    #[error("cannot start the server's threads")]
    Spawn(#[source] io::Error),
    /// The accept thread died (a bug): no new connections are taken.
    #[error("the server stopped accepting connections: {0}")]
    Stopped(String),
    /// A server thread could not install its seccomp filter; the server
    /// did not start (no thread serves unfiltered).
    #[error("a server thread cannot install its seccomp filter")]
    Seccomp(#[source] SeccompError),
}

/// A running server. Dropping it leaves the threads running; call
/// [`ServerHandle::shutdown`] to stop them.
pub struct ServerHandle {
    addr: SocketAddr,
    ctx: Arc<Ctx>,
    acceptor: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops; an error says why it stopped by itself.
    pub fn join(self) -> Result<(), ServerError> {
        let accept_died = self.acceptor.join().is_err();
        if accept_died && !self.ctx.queue.stopping.load(Ordering::Acquire) {
            self.ctx.queue.stop();
            return Err(ServerError::Stopped("the accept thread panicked (a bug; see the log)".into()));
        }
        for w in self.workers {
            let _ = w.join();
        }
        Ok(())
    }

    /// Stops accepting, lets workers finish their current turn, and waits.
    pub fn shutdown(self) {
        self.stopper().stop();
        let _ = self.join();
    }

    /// A handle that stops the server from another thread; [`ServerHandle::join`]
    /// then returns once the workers are done.
    pub fn stopper(&self) -> Stopper {
        Stopper { ctx: Arc::clone(&self.ctx) }
    }
}

/// Stops a running server from any thread (a signal thread, say).
#[derive(Clone)]
pub struct Stopper {
    ctx: Arc<Ctx>,
}

impl Stopper {
    /// Stops accepting; workers leave after their current turn.
    pub fn stop(&self) {
        self.ctx.queue.stop();
        // Best effort: the accept thread also wakes once a second.
        let _ = io::Write::write(&mut &self.ctx.waker, &[1]);
    }
}

/// Serves the API on `listener`: one accept thread and `cfg.http_workers`
/// workers, with the timeouts and caps of `cfg`.
pub fn serve(
    listener: TcpListener,
    cfg: &Config,
    gate: Gate,
    controller: Arc<Controller>,
    log: Logger,
) -> Result<ServerHandle, ServerError> {
    let addr = listener.local_addr().map_err(ServerError::Listen)?;
    listener.set_nonblocking(true).map_err(ServerError::Listen)?;
    let (wake_rx, waker) = UnixStream::pair().map_err(ServerError::Listen)?;
    wake_rx.set_nonblocking(true).map_err(ServerError::Listen)?;
    waker.set_nonblocking(true).map_err(ServerError::Listen)?;
    let (back, back_rx) = mpsc::channel();
    let limits = Limits {
        max_body: cfg.max_body_bytes,
        header: cfg.http_header_timeout,
        body: cfg.http_body_timeout,
        write: cfg.http_write_timeout,
        idle: cfg.http_idle_timeout,
    };
    let ctx = Arc::new(Ctx { gate, controller, log, limits, back, waker, queue: Queue::default() });
    let (ready, filtered) = mpsc::channel();
    let mut workers = Vec::with_capacity(cfg.http_workers);
    for i in 0..cfg.http_workers {
        let (shared, ready) = (Arc::clone(&ctx), ready.clone());
        let w = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || filtered_thread(ThreadKind::HttpWorker, &ready, || worker::run(&shared)));
        match w {
            Ok(w) => workers.push(w),
            Err(e) => {
                // The ones already started exit on the stop flag.
                ctx.queue.stop();
                return Err(ServerError::Spawn(e));
            }
        }
    }
    let acceptor = Acceptor::new(listener, wake_rx, back_rx, Arc::clone(&ctx), cfg.max_connections);
    let spawned = std::thread::Builder::new()
        .name("http-accept".into())
        .spawn(move || filtered_thread(ThreadKind::HttpAccept, &ready, || acceptor.run()));
    let acceptor = match spawned {
        Ok(a) => a,
        Err(e) => {
            ctx.queue.stop();
            return Err(ServerError::Spawn(e));
        }
    };
    let server = ServerHandle { addr, ctx, acceptor, workers };
    // Every thread answers once, before it serves anything.
    for _ in 0..=cfg.http_workers {
        let answer = filtered.recv().unwrap_or_else(|_| Err(probe_died(ThreadKind::HttpWorker)));
        if let Err(e) = answer {
            server.shutdown();
            return Err(ServerError::Seccomp(e));
        }
    }
    Ok(server)
}

/// Installs `kind`'s filter on this thread, reports the outcome, and runs
/// `body` only if it is in: a thread never serves unfiltered.
fn filtered_thread(kind: ThreadKind, ready: &Sender<Result<(), SeccompError>>, body: impl FnOnce()) {
    let installed = seccomp::install(kind);
    let ok = installed.is_ok();
    let _ = ready.send(installed);
    if ok {
        body();
    }
}

fn probe_died(kind: ThreadKind) -> SeccompError {
    SeccompError::Probe { kind, why: "a server thread ended before reporting its filter".into() }
}

/// Raises the limit on open files (a server with `PODFLARE_MAX_CONNECTIONS`
/// sockets plus ~30 fds per sandbox needs far more than the usual 1024): to
/// the kernel's ceiling (`fs.nr_open`, at most 2^20) where the process may
/// raise its hard limit (root), else the soft limit to the hard one. A
/// shell's hard limit of 20,000 once ended a density run at 665 sandboxes.
/// Returns the soft limit before and after.
pub fn raise_nofile_limit() -> Result<(u64, u64), nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .min(1 << 20);
    if ceiling > hard && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return Ok((soft, ceiling));
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard.max(soft)))
}

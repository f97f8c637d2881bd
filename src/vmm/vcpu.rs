//! vCPU threads: one named thread per vCPU, driven as a small state machine.
//!
//! States: `Paused` (waiting for a command, not in KVM_RUN), `Running` (in the
//! KVM_RUN loop), `Stopped` (the guest shut down or failed; waiting to be told
//! to exit). Commands arrive over a channel; a running thread is made to look
//! at them by a kick: a real-time signal whose handler sets `immediate_exit`
//! in this thread's `kvm_run`, so KVM_RUN returns EINTR whether the signal
//! lands inside the ioctl or just before it. The thread only acts on commands
//! after such an EINTR exit, which means no MMIO/PIO access is ever half
//! completed when the vCPU pauses: a snapshot always sees a clean boundary.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::state::VcpuState;
use super::VmStatus;
use crate::devices::bus::Bus;

/// Offset from SIGRTMIN of the kick signal.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler. Null when the
    /// thread owns no vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // `vcpu_loop` while it owns the VcpuFd and cleared before the fd is
        // dropped; writing one byte of it is what the KVM API asks for.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), String> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, handle_kick)
            .map_err(|e| format!("installing the vCPU kick signal handler: {e}"))
    })
    .clone()
}

/// What a vCPU thread is asked to do.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Enter the run loop.
    Resume,
    /// Leave the run loop at the next clean boundary.
    Pause,
    /// Reply with the vCPU state (only while paused).
    Save,
    /// Leave the thread.
    Exit,
}

/// A vCPU thread's reply to a command.
#[derive(Debug)]
pub enum VcpuReply {
    /// Now running.
    Resumed,
    /// Now paused.
    Paused,
    /// Saved state.
    State(Box<VcpuState>),
    /// The command failed.
    Error(String),
}

/// Handle the VM keeps for each vCPU thread.
pub struct VcpuHandle {
    index: u8,
    tx: Sender<VcpuCommand>,
    rx: std::sync::Mutex<Receiver<VcpuReply>>,
    thread: Option<JoinHandle<()>>,
}

/// Shared by every vCPU thread of one VM.
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where a shutdown or failure is recorded.
    pub status: Arc<VmStatus>,
    /// MSRs saved with the vCPU state.
    pub msr_indices: Vec<u32>,
}

impl VcpuHandle {
    /// Starts the thread for `fd` in the `Paused` state.
    pub fn spawn(vm_name: &str, index: u8, fd: VcpuFd, ctx: Arc<VcpuContext>) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let status = ctx.status.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{vm_name}-vcpu{index}"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    vcpu_loop(fd, &ctx, &cmd_rx, &reply_tx)
                }));
                if outcome.is_err() {
                    status.fail(format!("vCPU {index} thread panicked"));
                    // Keep answering so the VM's teardown does not wait in vain.
                    while let Ok(cmd) = cmd_rx.recv() {
                        if matches!(cmd, VcpuCommand::Exit) {
                            break;
                        }
                        let _ = reply_tx.send(VcpuReply::Error("vCPU thread panicked".into()));
                    }
                }
            })?;
        Ok(VcpuHandle { index, tx: cmd_tx, rx: std::sync::Mutex::new(reply_rx), thread: Some(thread) })
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread id belongs to a thread we have not joined
            // yet, so it is valid; the signal's handler is async-signal-safe.
            unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN() + KICK_SIGNAL_OFFSET) };
        }
    }

    /// Sends a command, kicks the thread, and waits (bounded) for its reply.
    pub fn command(&self, cmd: VcpuCommand, timeout: Duration) -> Result<VcpuReply, String> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        self.tx.send(cmd).map_err(|_| format!("vCPU {} thread is gone", self.index))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.kick();
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(reply) => return Ok(reply),
                Err(RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("vCPU {} did not answer within {timeout:?}", self.index))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("vCPU {} thread is gone", self.index))
                }
            }
        }
    }

    /// Asks the thread to exit and joins it, waiting at most `timeout`.
    pub fn stop(&mut self, timeout: Duration) {
        let _ = self.tx.send(VcpuCommand::Exit);
        let deadline = std::time::Instant::now() + timeout;
        while let Some(t) = &self.thread {
            if t.is_finished() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                // Leave it detached rather than hang teardown; it exits at
                // its next command check.
                self.thread = None;
                return;
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// The thread body. Returns when told to exit.
fn vcpu_loop(mut fd: VcpuFd, ctx: &VcpuContext, rx: &Receiver<VcpuCommand>, tx: &Sender<VcpuReply>) {
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN.with(|c| c.set(run_ptr));
    let mut running = false;
    let mut stopped = false;
    'outer: loop {
        if !running {
            match rx.recv() {
                Ok(VcpuCommand::Resume) if !stopped => {
                    running = true;
                    let _ = tx.send(VcpuReply::Resumed);
                }
                Ok(VcpuCommand::Resume) => {
                    let _ = tx.send(VcpuReply::Error("the guest has stopped".into()));
                }
                Ok(VcpuCommand::Pause) => {
                    let _ = tx.send(VcpuReply::Paused);
                }
                Ok(VcpuCommand::Save) => {
                    let reply = match VcpuState::save(&fd, &ctx.msr_indices) {
                        Ok(s) => VcpuReply::State(Box::new(s)),
                        Err(e) => VcpuReply::Error(e.to_string()),
                    };
                    let _ = tx.send(reply);
                }
                Ok(VcpuCommand::Exit) | Err(_) => break,
            }
            continue;
        }
        match fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    if port == 0x64 && data.first() == Some(&0xfe) {
                        ctx.status.exit("guest reset the machine");
                        running = false;
                        stopped = true;
                    } else {
                        ctx.pio.write(u64::from(port), data);
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    if !ctx.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !ctx.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.mmio.write(addr, data);
                }
                VcpuExit::Hlt => {}
                VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => {
                    ctx.status.exit("guest shut down");
                    running = false;
                    stopped = true;
                }
                other => {
                    ctx.status.fail(format!("vCPU exit {other:?}"));
                    running = false;
                    stopped = true;
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                loop {
                    match rx.try_recv() {
                        Ok(VcpuCommand::Pause) => {
                            // Stop draining here: commands sent after the
                            // Paused reply belong to the paused state.
                            running = false;
                            let _ = tx.send(VcpuReply::Paused);
                            break;
                        }
                        Ok(VcpuCommand::Resume) => {
                            let _ = tx.send(VcpuReply::Resumed);
                        }
                        Ok(VcpuCommand::Save) => {
                            let _ = tx.send(VcpuReply::Error("pause the vCPU before saving".into()));
                        }
                        Ok(VcpuCommand::Exit) => break 'outer,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => break 'outer,
                    }
                }
            }
            Err(e) => {
                ctx.status.fail(format!("KVM_RUN failed: {e}"));
                running = false;
                stopped = true;
            }
        }
    }
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

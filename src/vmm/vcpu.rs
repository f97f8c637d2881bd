//! vCPU threads: one named thread per vCPU, driven as a small state machine.
//!
//! ```text
//! Paused --Resume--> Running --Pause--> Paused   (started Paused)
//! Running --reset / shutdown / bad exit / KVM_RUN error--> Stopped
//! Stopped: Resume refused with an error; Pause and Save answered
//! Paused, Stopped: Save answered; Running: Save refused with an error
//! any state --Exit, or the handle dropped--> Exited (the thread returns)
//! ```
//!
//! Commands arrive over a channel; a running thread is made to look at them
//! by a kick: a real-time signal whose handler sets `immediate_exit` in this
//! thread's `kvm_run`, so KVM_RUN returns EINTR whether the signal lands
//! inside the ioctl or just before it. The thread only acts on commands
//! after such an EINTR exit, which means no MMIO/PIO access is ever half
//! completed when the vCPU pauses: a snapshot always sees a clean boundary.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
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
    /// Called first thing on every vCPU thread, before its loop.
    pub on_thread_start: Option<ThreadStartHook>,
}

/// Runs on each new vCPU thread with its index. This is where the vCPU
/// threads' seccomp filter is to be installed: a filter binds only the thread
/// that installs it. An error fails the VM rather than run a vCPU without it.
pub type ThreadStartHook = Arc<dyn Fn(u8) -> Result<(), String> + Send + Sync>;

impl VcpuContext {
    /// No devices and a status of its own: for driving vCPU threads without a
    /// `Vm` (tests of this module's threads).
    #[doc(hidden)]
    pub fn standalone(msr_indices: Vec<u32>, on_thread_start: Option<ThreadStartHook>) -> Self {
        let status = Arc::new(VmStatus::new(super::channel::Channel::new()));
        VcpuContext { pio: Arc::default(), mmio: Arc::default(), status, msr_indices, on_thread_start }
    }
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
                    if let Some(hook) = &ctx.on_thread_start {
                        hook(index).map_err(|e| format!("vCPU {index} thread start: {e}"))?;
                    }
                    vcpu_loop(fd, &ctx, &cmd_rx, &reply_tx);
                    Ok::<(), String>(())
                }));
                let (why, reply) = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(why)) => (why.clone(), why),
                    Err(_) => (format!("vCPU {index} thread panicked"), "vCPU thread panicked".into()),
                };
                status.fail(why);
                // Keep answering so the VM's teardown does not wait in vain.
                while let Ok(cmd) = cmd_rx.recv() {
                    if matches!(cmd, VcpuCommand::Exit) {
                        break;
                    }
                    let _ = reply_tx.send(VcpuReply::Error(reply.clone()));
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
    VcpuLoop { fd: &mut fd, ctx, rx, tx }.run();
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Where a vCPU thread is; each state but `Exited` has one function on
/// [`VcpuLoop`] that runs it and returns the next state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VcpuRunState {
    /// Waiting for a command, not in KVM_RUN.
    Paused,
    /// In the KVM_RUN loop; commands are read only after a kick's EINTR.
    Running,
    /// The guest shut down or failed: like `Paused`, but Resume is refused.
    Stopped,
    /// Leaving the thread.
    Exited,
}

/// The reply a command earns in a state, before any side effect.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Resumed,
    Paused,
    /// Save the vCPU registers and reply with them.
    Save,
    Refuse(&'static str),
}

/// The command table: pure, so every cell is unit-tested without KVM.
fn on_command(state: VcpuRunState, cmd: &VcpuCommand) -> (Option<Answer>, VcpuRunState) {
    use VcpuRunState::{Exited, Paused, Running, Stopped};
    match (state, cmd) {
        (_, VcpuCommand::Exit) | (Exited, _) => (None, Exited),
        (Paused | Running, VcpuCommand::Resume) => (Some(Answer::Resumed), Running),
        (Stopped, VcpuCommand::Resume) => (Some(Answer::Refuse("the guest has stopped")), Stopped),
        (Running, VcpuCommand::Pause) => (Some(Answer::Paused), Paused),
        (Paused | Stopped, VcpuCommand::Pause) => (Some(Answer::Paused), state),
        // A running vCPU's registers change under us; a snapshot needs them still.
        (Running, VcpuCommand::Save) => (Some(Answer::Refuse("pause the vCPU before saving")), Running),
        (Paused | Stopped, VcpuCommand::Save) => (Some(Answer::Save), state),
    }
}

/// One vCPU thread's state machine.
struct VcpuLoop<'a> {
    fd: &'a mut VcpuFd,
    ctx: &'a VcpuContext,
    rx: &'a Receiver<VcpuCommand>,
    tx: &'a Sender<VcpuReply>,
}

impl VcpuLoop<'_> {
    /// Runs the machine from `Paused` (how threads start) to `Exited`.
    fn run(&mut self) {
        let mut state = VcpuRunState::Paused;
        loop {
            state = match state {
                VcpuRunState::Paused => self.paused(),
                VcpuRunState::Running => self.running(),
                VcpuRunState::Stopped => self.stopped(),
                VcpuRunState::Exited => return,
            };
        }
    }

    fn paused(&mut self) -> VcpuRunState {
        self.wait_for_command(VcpuRunState::Paused)
    }

    /// Like `paused`; the table refuses Resume here.
    fn stopped(&mut self) -> VcpuRunState {
        self.wait_for_command(VcpuRunState::Stopped)
    }

    /// One KVM_RUN and what its exit means.
    fn running(&mut self) -> VcpuRunState {
        match self.fd.run() {
            Ok(exit) => handle_exit(self.ctx, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                self.drain_commands()
            }
            Err(e) => {
                self.ctx.status.fail(format!("KVM_RUN failed: {e}"));
                VcpuRunState::Stopped
            }
        }
    }

    /// Blocks for one command (out of KVM_RUN, so nothing is half done).
    fn wait_for_command(&mut self, here: VcpuRunState) -> VcpuRunState {
        match self.rx.recv() {
            Ok(cmd) => self.obey(here, &cmd),
            // The handle is gone: nobody can send Exit any more.
            Err(_) => VcpuRunState::Exited,
        }
    }

    /// After a kick's EINTR: acts on queued commands until one leaves
    /// `Running`. It stops there because commands sent after a Paused reply
    /// belong to the paused state.
    fn drain_commands(&mut self) -> VcpuRunState {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => match self.obey(VcpuRunState::Running, &cmd) {
                    VcpuRunState::Running => continue,
                    next => return next,
                },
                Err(TryRecvError::Empty) => return VcpuRunState::Running,
                Err(TryRecvError::Disconnected) => return VcpuRunState::Exited,
            }
        }
    }

    /// Looks `cmd` up in the table, sends the reply, returns the next state.
    fn obey(&mut self, here: VcpuRunState, cmd: &VcpuCommand) -> VcpuRunState {
        let (answer, next) = on_command(here, cmd);
        let reply = match answer {
            None => return next,
            Some(Answer::Resumed) => VcpuReply::Resumed,
            Some(Answer::Paused) => VcpuReply::Paused,
            Some(Answer::Refuse(why)) => VcpuReply::Error(why.into()),
            Some(Answer::Save) => match VcpuState::save(self.fd, &self.ctx.msr_indices) {
                Ok(s) => VcpuReply::State(Box::new(s)),
                Err(e) => VcpuReply::Error(e.to_string()),
            },
        };
        // No receiver means the VM is being dropped; its Exit follows.
        let _ = self.tx.send(reply);
        next
    }
}

/// What one KVM_RUN exit means. Device accesses complete here, before the
/// next KVM_RUN, so a later pause never sees them half done.
fn handle_exit(ctx: &VcpuContext, exit: VcpuExit<'_>) -> VcpuRunState {
    match exit {
        // 0xfe to the i8042 command port is how Linux reboots.
        VcpuExit::IoOut(0x64, [0xfe, ..]) => {
            ctx.status.exit("guest reset the machine");
            return VcpuRunState::Stopped;
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio.write(u64::from(port), data);
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
        // With the in-kernel LAPIC HLT is handled by KVM; an exit is spurious.
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => {
            ctx.status.exit("guest shut down");
            return VcpuRunState::Stopped;
        }
        other => {
            ctx.status.fail(format!("vCPU exit {other:?}"));
            return VcpuRunState::Stopped;
        }
    }
    VcpuRunState::Running
}

#[cfg(test)]
mod tests {
    use super::VcpuRunState::{Exited, Paused, Running, Stopped};
    use super::*;

    #[test]
    fn command_table() {
        use VcpuCommand::{Exit, Pause, Resume, Save};
        let refuse = |why| Some(Answer::Refuse(why));
        let cells = [
            (Paused, Resume, Some(Answer::Resumed), Running),
            (Paused, Pause, Some(Answer::Paused), Paused),
            (Paused, Save, Some(Answer::Save), Paused),
            (Paused, Exit, None, Exited),
            (Running, Resume, Some(Answer::Resumed), Running),
            (Running, Pause, Some(Answer::Paused), Paused),
            (Running, Save, refuse("pause the vCPU before saving"), Running),
            (Running, Exit, None, Exited),
            (Stopped, Resume, refuse("the guest has stopped"), Stopped),
            (Stopped, Pause, Some(Answer::Paused), Stopped),
            (Stopped, Save, Some(Answer::Save), Stopped),
            (Stopped, Exit, None, Exited),
            (Exited, Resume, None, Exited),
        ];
        for (state, cmd, answer, next) in cells {
            let got = on_command(state, &cmd);
            assert_eq!(got, (answer, next), "{cmd:?} in {state:?}");
        }
    }
}

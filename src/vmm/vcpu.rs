//! vCPU threads: one named thread per vCPU, driven as a small state machine.
//!
//! ```text
//! (start) Paused --Resume--> Running --Pause--> Paused
//! Running --guest reset or shutdown, unknown exit, KVM_RUN error--> Stopped
//! Paused, Stopped: Pause and Save answered; Stopped refuses Resume
//! Running: Pause and Resume answered after a kick; Save refused
//! any --Exit or handle dropped--> Exited; a panic fails the VM
//! ```
//!
//! A running thread is made to look at its commands by a kick: a real-time signal
//! whose handler sets `immediate_exit` in this thread's `kvm_run`, so KVM_RUN
//! returns EINTR whether the signal lands in the ioctl or just before. Commands are
//! acted on only after that EINTR: no MMIO/PIO access is half done at a pause.

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
    /// This thread's `kvm_run` for the kick handler; null unless a [`KickTarget`] lives.
    static KVM_RUN: std::cell::Cell<*mut kvm_run> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: non-null only while a KickTarget lives on this thread (the
        // handler runs on the thread it kicks), and `KickTarget::set`'s caller
        // keeps the mapping alive that long; KVM asks for this one-byte write.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Points the kick handler at this thread's `kvm_run` while alive. Dropping it
/// (on every way out, unwinding too) clears the pointer before the unmap.
struct KickTarget;

impl KickTarget {
    /// # Safety
    /// `run` must stay mapped and writable until the returned guard drops.
    unsafe fn set(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|c| c.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        // The handler may run at any instruction: keep the store before the munmap.
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
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

/// Runs on each new vCPU thread with its index. `Vm` installs the vCPU
/// threads' seccomp filter here: a filter binds only the thread that
/// installs it. An error fails the VM rather than run a vCPU without it.
pub type ThreadStartHook = Arc<dyn Fn(u8) -> Result<(), String> + Send + Sync>;

impl VcpuContext {
    /// No devices, no hook, a status of its own: for tests that drive vCPU
    /// threads without a `Vm`.
    #[doc(hidden)]
    pub fn standalone() -> Self {
        let (status, msr_indices) = (Arc::new(VmStatus::new("standalone", super::channel::Channel::new())), Vec::new());
        VcpuContext { pio: Arc::default(), mmio: Arc::default(), status, msr_indices, on_thread_start: None }
    }
}

impl VcpuHandle {
    /// Starts the thread for `fd` in the `Paused` state.
    pub fn spawn(vm_name: &str, index: u8, fd: VcpuFd, ctx: Arc<VcpuContext>) -> std::io::Result<Self> {
        let (cmd_tx, cmd_rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("{vm_name}-vcpu{index}"))
            .spawn(move || {
                let _cpu = super::threads::account_this_thread();
                // Owned out here, not inside the catch_unwind: unwinding then
                // drops the KickTarget in `VcpuLoop::thread` while fd is alive.
                let mut fd = fd;
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    VcpuLoop { fd: &mut fd, ctx: &ctx, rx: &cmd_rx, tx: &reply_tx }.thread(index)
                }));
                drop(fd); // the kick pointer is null again on every path
                let (why, reply) = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(why)) => (why.clone(), why),
                    Err(_) => (format!("vCPU {index} thread panicked"), "vCPU thread panicked".into()),
                };
                ctx.status.fail(why);
                // Keep answering so the VM's teardown does not wait in vain.
                for _ in cmd_rx.iter().take_while(|cmd| !matches!(cmd, VcpuCommand::Exit)) {
                    let _ = reply_tx.send(VcpuReply::Error(reply.clone()));
                }
            })?;
        Ok(VcpuHandle { index, tx: cmd_tx, rx: std::sync::Mutex::new(reply_rx), thread: Some(thread) })
    }

    /// CPU time this vCPU's thread has used so far (None once it ended).
    pub fn cpu_time(&self) -> Option<Duration> {
        let t = self.thread.as_ref().filter(|t| !t.is_finished())?;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the pthread id belongs to a thread we have not joined, so
        // it is valid; `clock` is a writable clockid_t for the call.
        if unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut clock) } != 0 {
            return None;
        }
        super::threads::clock_time(clock)
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
        self.post(cmd)?;
        self.reply(timeout)
    }

    /// Sends a command and kicks the thread without waiting; [`Self::reply`]
    /// takes the answer. Lets many vCPUs act at once (a fork resumes all its
    /// children together). Only the owner of the handle calls these.
    pub fn post(&self, cmd: VcpuCommand) -> Result<(), String> {
        self.tx.send(cmd).map_err(|_| format!("vCPU {} thread is gone", self.index))?;
        self.kick();
        Ok(())
    }

    /// Waits (bounded) for the answer to the last [`Self::post`], kicking
    /// the thread again while it runs guest code.
    pub fn reply(&self, timeout: Duration) -> Result<VcpuReply, String> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        let (index, deadline) = (self.index, std::time::Instant::now() + timeout);
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(reply) => return Ok(reply),
                Err(RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => self.kick(),
                Err(RecvTimeoutError::Timeout) => return Err(format!("vCPU {index} did not answer within {timeout:?}")),
                Err(RecvTimeoutError::Disconnected) => return Err(format!("vCPU {index} thread is gone")),
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

/// Where a vCPU thread is; each state but `Exited` has a function on [`VcpuLoop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VcpuRunState {
    /// Waiting for a command, not in KVM_RUN.
    Paused,
    /// In KVM_RUN; commands are read only after a kick's EINTR.
    Running,
    /// The guest shut down or failed: like `Paused`, but Resume is refused.
    Stopped,
    /// Leaving the thread.
    Exited,
}

/// The reply a command earns in a state (`Save`: with the saved registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Resumed,
    Paused,
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
    /// The thread body: the start hook, then the states from `Paused`.
    fn thread(&mut self, index: u8) -> Result<(), String> {
        if let Some(hook) = &self.ctx.on_thread_start {
            hook(index).map_err(|e| format!("vCPU {index} thread start: {e}"))?;
        }
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` is the VcpuFd's kvm_run mapping, unmapped only when
        // the fd drops; the spawn closure owns the fd and lends it for all of
        // this call, and the guard drops at its end, unwinding included.
        let _kick = unsafe { KickTarget::set(run) };
        let mut state = VcpuRunState::Paused;
        loop {
            state = match state {
                VcpuRunState::Paused => self.paused(),
                VcpuRunState::Running => self.running(),
                VcpuRunState::Stopped => self.stopped(),
                VcpuRunState::Exited => return Ok(()),
            };
        }
    }

    /// Blocks for a command; a closed channel means nobody is left to send Exit.
    fn paused(&mut self) -> VcpuRunState {
        self.rx.recv().map_or(VcpuRunState::Exited, |cmd| self.obey(VcpuRunState::Paused, &cmd))
    }

    /// As `paused`; the table refuses Resume here.
    fn stopped(&mut self) -> VcpuRunState {
        self.rx.recv().map_or(VcpuRunState::Exited, |cmd| self.obey(VcpuRunState::Stopped, &cmd))
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

    /// After a kick's EINTR: acts on queued commands until one leaves `Running`
    /// (commands sent after a Paused reply belong to the paused state).
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
    ctx.status.count_exit();
    match exit {
        // 0xfe to the i8042 command port is how Linux reboots.
        VcpuExit::IoOut(0x64, [0xfe, ..]) => {
            ctx.status.exit("guest reset the machine");
            return VcpuRunState::Stopped;
        }
        VcpuExit::IoOut(port, data) => _ = ctx.pio.write(u64::from(port), data),
        // An address no device claims reads as a floating bus.
        VcpuExit::IoIn(port, data) => if !ctx.pio.read(u64::from(port), data) { data.fill(0xff) },
        VcpuExit::MmioRead(addr, data) => if !ctx.mmio.read(addr, data) { data.fill(0xff) },
        VcpuExit::MmioWrite(addr, data) => _ = ctx.mmio.write(addr, data),
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
        let (resumed, paused, save) = (Some(Answer::Resumed), Some(Answer::Paused), Some(Answer::Save));
        let refuse = |why| Some(Answer::Refuse(why));
        let cells = [
            (Paused, Resume, resumed, Running), (Paused, Pause, paused, Paused), (Paused, Save, save, Paused),
            (Running, Resume, resumed, Running), (Running, Pause, paused, Paused),
            (Running, Save, refuse("pause the vCPU before saving"), Running),
            (Stopped, Resume, refuse("the guest has stopped"), Stopped),
            (Stopped, Pause, paused, Stopped), (Stopped, Save, save, Stopped), (Exited, Resume, None, Exited),
            (Paused, Exit, None, Exited), (Running, Exit, None, Exited), (Stopped, Exit, None, Exited),
        ];
        for (state, cmd, answer, next) in cells {
            assert_eq!(on_command(state, &cmd), (answer, next), "{cmd:?} in {state:?}");
        }
    }
}

//! CPU time of the VMs' own threads (vCPUs, device threads), for metrics:
//! each such thread registers itself while it runs and adds its CPU time to
//! a running total as it ends, both under one lock, so a reading counts
//! every thread exactly once and never goes backwards.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

struct Threads {
    live: BTreeSet<libc::pid_t>,
    ended: Duration,
}

static THREADS: Mutex<Threads> = Mutex::new(Threads { live: BTreeSet::new(), ended: Duration::ZERO });

/// Linux's CPU clock of thread `tid` (MAKE_THREAD_CPUCLOCK: per-thread,
/// scheduler time): readable by any thread of the same process.
fn thread_clock(tid: libc::pid_t) -> libc::clockid_t {
    ((!tid) << 3) | 6
}

/// Reads a CPU clock (a thread's, from `thread_clock` or
/// `pthread_getcpuclockid`); None if the thread has ended.
pub(crate) fn clock_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // an id of a thread that has ended is refused with EINVAL, not UB.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Held by a VM thread for its whole life; dropping it (last thing the
/// thread does) moves the thread's CPU time into the total of ended ones.
pub struct Accounted {
    tid: libc::pid_t,
}

/// Registers the calling thread.
pub fn account_this_thread() -> Accounted {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    THREADS.lock().unwrap_or_else(PoisonError::into_inner).live.insert(tid);
    Accounted { tid }
}

impl Drop for Accounted {
    fn drop(&mut self) {
        let own = clock_time(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default();
        let mut t = THREADS.lock().unwrap_or_else(PoisonError::into_inner);
        t.live.remove(&self.tid);
        t.ended += own;
    }
}

/// CPU time of every VM thread so far: ended ones plus the live ones now.
pub fn cpu_time() -> Duration {
    let t = THREADS.lock().unwrap_or_else(PoisonError::into_inner);
    t.ended + t.live.iter().filter_map(|&tid| clock_time(thread_clock(tid))).sum::<Duration>()
}

/// The scheduling slice vCPU threads ask for, in ns (0: the kernel's own).
static VCPU_SLICE_NS: AtomicU64 = AtomicU64::new(0);

/// Sets the slice later vCPU threads ask for (`PODFLARE_VCPU_SLICE_MS`).
pub fn set_vcpu_slice(slice: Duration) {
    VCPU_SLICE_NS.store(u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// `struct sched_attr` as the kernel reads it (SCHED_ATTR_SIZE_VER0).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks the kernel to run the calling thread in slices of `slice` (its
/// fair-class custom slice: `sched_attr.sched_runtime`, honoured from Linux
/// 6.12, ignored before; the kernel clamps it to 0.1-100 ms). Policy and
/// nice value stay as they are.
pub fn set_own_slice(slice: Duration) -> std::io::Result<()> {
    // SAFETY: getpriority has no memory arguments; errno is reset first
    // because -1 is also a valid nice value.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    let errno = std::io::Error::last_os_error();
    if nice == -1 && errno.raw_os_error() != Some(0) {
        return Err(errno);
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a live, fully initialised sched_attr whose `size`
    // says how much the kernel may read; pid 0 is the calling thread.
    if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Applies the vCPU slice on a new vCPU thread. Each time the host
/// preempts a vCPU the guest finds its timer due when it runs again and
/// pays a tick first (~2 ms of emulated kernel work on PVM): with the
/// kernel's default slice (~1.4 ms on 2 CPUs) busy guests sharing a CPU
/// spend their slices on ticks. A failure leaves the default; it is only
/// a hint to the scheduler.
pub fn apply_vcpu_slice() {
    let ns = VCPU_SLICE_NS.load(Ordering::Relaxed);
    if ns > 0 {
        let _ = set_own_slice(Duration::from_nanos(ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_and_ended_threads_once() {
        let before = cpu_time();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (spun, done) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _a = account_this_thread();
            // Spin until this thread itself has used 50 ms of CPU (a busy
            // machine may give it far less than wall time).
            let mut x = 0u64;
            while clock_time(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default() < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            spun.send(()).unwrap();
            wait.recv().unwrap();
        });
        done.recv().unwrap();
        let live = cpu_time();
        assert!(live >= before + Duration::from_millis(50), "{before:?} -> {live:?} after a thread used 50 ms");
        go.send(()).unwrap();
        t.join().unwrap();
        let after = cpu_time();
        assert!(after >= live, "{live:?} -> {after:?}: the total went backwards");
        // Other tests may run VM threads meanwhile, so no upper bound.
    }

    /// `se.slice` of the calling thread (ns), from /proc/thread-self/sched.
    fn own_slice_ns() -> u64 {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap();
        let line = sched.lines().find(|l| l.starts_with("se.slice")).expect("this kernel shows se.slice");
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn a_thread_gets_the_slice_it_asks_for() {
        let got = std::thread::spawn(|| {
            set_own_slice(Duration::from_millis(20)).unwrap();
            // SAFETY: no memory arguments.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            (own_slice_ns(), nice)
        })
        .join()
        .unwrap();
        assert_eq!(got.0, 20_000_000, "se.slice after asking for 20 ms");
        // SAFETY: no memory arguments.
        assert_eq!(got.1, unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, "the nice value is kept");
    }
}

//! CPU time of the VMs' own threads (vCPUs, device threads), for metrics:
//! each such thread registers itself while it runs and adds its CPU time to
//! a running total as it ends, both under one lock, so a reading counts
//! every thread exactly once and never goes backwards.

use std::collections::BTreeSet;
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
}

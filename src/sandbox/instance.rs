//! One live sandbox: its guest, exec queue, activity clock (for the reaper)
//! and replay ring; plus the stream-slot token that bounds open streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::pty::PtySessions;
use super::queue::FifoQueue;
use super::replay::ReplayRing;
use crate::guest::{ExecChunk, Guest, GuestError, Language, StreamRx};

/// Locks a mutex whose data stays consistent across a panic (counters,
/// maps updated in one statement), so poisoning is not an error here.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why an exec could not start.
#[derive(Debug)]
pub enum ExecStartError {
    /// The sandbox was destroyed while the exec waited.
    Destroyed,
    /// The guest refused.
    Guest(GuestError),
}

#[derive(Debug)]
pub(super) struct Activity {
    /// Execs queued or running.
    active: usize,
    /// Last exec start or end (or creation).
    last: Instant,
    /// Last exec start, if any.
    last_exec: Option<Instant>,
}

/// One live sandbox.
pub struct Sandbox {
    id: String,
    template: String,
    persistent: bool,
    /// Network egress (its guest's: a merge brings the winner's).
    egress: std::sync::atomic::AtomicBool,
    created: Instant,
    lifetime: Duration,
    idle: Duration,
    /// `None` once destroyed. Execs hold the read lock only to clone the
    /// guest out, so destroy never waits for an exec, running or starting.
    guest: RwLock<Option<Arc<dyn Guest>>>,
    queue: Arc<FifoQueue>,
    activity: Mutex<Activity>,
    replay: Mutex<ReplayRing>,
    /// Exec streams of this sandbox open now (its share of the host's).
    streams: Arc<AtomicUsize>,
    /// Terminal sessions started here.
    ptys: PtySessions,
    /// No expiry before this (a freeze into a space failed; try later).
    not_before: Mutex<Option<Instant>>,
}

/// Why the reaper destroys a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    Lifetime,
    Idle,
}

impl Sandbox {
    /// The `sbx_...` id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(super) fn queue(&self) -> &Arc<FifoQueue> {
        &self.queue
    }

    /// True after destroy (by the API or the reaper).
    pub fn is_destroyed(&self) -> bool {
        self.guest.read().unwrap_or_else(PoisonError::into_inner).is_none()
    }

    /// A new sandbox around a running guest.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: String,
        template: String,
        persistent: bool,
        egress: bool,
        lifetime: Duration,
        idle: Duration,
        guest: Box<dyn Guest>,
        replay_max_bytes: usize,
    ) -> Self {
        let now = Instant::now();
        Sandbox {
            id,
            template,
            persistent,
            egress: std::sync::atomic::AtomicBool::new(egress),
            created: now,
            lifetime,
            idle,
            guest: RwLock::new(Some(Arc::from(guest))),
            queue: Arc::new(FifoQueue::default()),
            activity: Mutex::new(Activity { active: 0, last: now, last_exec: None }),
            replay: Mutex::new(ReplayRing::new(replay_max_bytes)),
            streams: Arc::new(AtomicUsize::new(0)),
            ptys: PtySessions::default(),
            not_before: Mutex::new(None),
        }
    }

    /// The template it was created from.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Not reaped before `until` (its freeze failed: it runs on until then).
    pub(super) fn postpone_expiry(&self, until: Instant) {
        *lock(&self.not_before) = Some(until);
    }

    /// Frozen into a space (not destroyed) at its idle timeout or lifetime.
    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// Network egress allowed (fork children inherit it).
    pub fn egress(&self) -> bool {
        self.egress.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lifetime (`timeout_seconds`).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Idle limit (`idle_timeout_seconds`).
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Execs queued or running.
    pub fn busy(&self) -> bool {
        lock(&self.activity).active > 0
    }

    /// Its terminal sessions.
    pub fn ptys(&self) -> &PtySessions {
        &self.ptys
    }

    /// This sandbox's own stream count.
    pub(super) fn streams(&self) -> &Arc<AtomicUsize> {
        &self.streams
    }

    /// The replay ring as NDJSON.
    pub fn replay_ndjson(&self) -> Vec<u8> {
        lock(&self.replay).to_ndjson()
    }

    /// Destroys the guest: takes it out (so no new exec starts), ends its
    /// channel with `why` (so a start blocked on it fails now, and a running
    /// exec says why it ended), and drops this hold;
    /// the VM is freed when the last holder lets go. True if it was there.
    pub(super) fn destroy_guest(&self, why: &str) -> bool {
        let taken = self.guest.write().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(g) = &taken {
            g.shutdown(why);
        }
        taken.is_some()
    }

    /// The guest, if not destroyed; the lock is not held while it is used.
    pub(super) fn guest(&self) -> Option<Arc<dyn Guest>> {
        self.guest.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Takes the guest out without ending it (merge moves it to another
    /// id); the sandbox is destroyed from here on.
    pub(super) fn take_guest(&self) -> Option<Arc<dyn Guest>> {
        self.guest.write().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Puts `guest` in place of the current one (merge); returns the old
    /// one, or gives `guest` back if this sandbox is already destroyed.
    /// The sandbox takes on `egress`, the new guest's network.
    pub(super) fn replace_guest(&self, guest: Arc<dyn Guest>, egress: bool) -> Result<Arc<dyn Guest>, Arc<dyn Guest>> {
        let mut slot = self.guest.write().unwrap_or_else(PoisonError::into_inner);
        match slot.as_mut() {
            Some(current) => {
                self.egress.store(egress, std::sync::atomic::Ordering::Relaxed);
                Ok(std::mem::replace(current, guest))
            }
            None => Err(guest),
        }
    }

    pub(super) fn start_exec(&self, language: Language, code: &str) -> Result<StreamRx<ExecChunk>, ExecStartError> {
        // Not under the lock: a guest that does not read its port can hold
        // this call for a while, and destroy must not wait for it.
        let guest = self.guest().ok_or(ExecStartError::Destroyed)?;
        guest.exec(language, code).map_err(ExecStartError::Guest)
    }

    pub(super) fn record(&self, line: &[u8]) {
        lock(&self.replay).push(line);
    }

    /// Counts as activity for the idle timeout (terminal use).
    pub(super) fn touch(&self) {
        lock(&self.activity).last = Instant::now();
    }

    pub(super) fn exec_queued(&self) {
        let mut a = lock(&self.activity);
        a.active += 1;
        a.last = Instant::now();
    }

    pub(super) fn exec_started(&self) {
        let mut a = lock(&self.activity);
        a.last = Instant::now();
        a.last_exec = Some(a.last);
    }

    pub(super) fn exec_finished(&self) {
        let mut a = lock(&self.activity);
        a.active = a.active.saturating_sub(1);
        a.last = Instant::now();
    }

    pub(super) fn expiry(&self, now: Instant) -> Option<Expiry> {
        if lock(&self.not_before).is_some_and(|t| now < t) {
            return None;
        }
        if now.duration_since(self.created) >= self.lifetime {
            return Some(Expiry::Lifetime);
        }
        let a = lock(&self.activity);
        (a.active == 0 && now.duration_since(a.last) >= self.idle).then_some(Expiry::Idle)
    }

    /// When it was created (fork children and merges: their own start).
    pub fn created_at(&self) -> Instant {
        self.created
    }

    /// The operator's view of this sandbox (`GET /v1/sandboxes`); `now` and
    /// `wall` are one moment on the monotonic and the wall clock, so every
    /// instant here is shown in Unix milliseconds.
    pub fn info(&self, now: Instant, wall: SystemTime) -> serde_json::Value {
        let ms = |at: Instant| -> u64 {
            let t = if at <= now { wall.checked_sub(now - at) } else { wall.checked_add(at - now) };
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis() as u64)
        };
        let (busy, last, last_exec) = {
            let a = lock(&self.activity);
            (a.active > 0, a.last, a.last_exec)
        };
        serde_json::json!({
            "id": self.id,
            "template": self.template,
            "state": if self.is_destroyed() { "destroyed" } else if busy { "busy" } else { "ready" },
            "created_at_ms": ms(self.created),
            "last_exec_at_ms": last_exec.map(ms),
            "timeout_seconds": self.lifetime.as_secs(),
            "idle_timeout_seconds": self.idle.as_secs(),
            "expires_at_ms": ms(self.created + self.lifetime),
            // A busy sandbox is never idle-reaped: no idle deadline yet.
            "idle_expires_at_ms": (!busy).then(|| ms(last + self.idle)),
            "private_memory_bytes": self.private_memory_bytes(),
            "persistent": self.persistent,
            "egress": self.egress(),
        })
    }

    pub(super) fn private_memory_bytes(&self) -> u64 {
        self.guest().map_or(0, |g| g.private_memory_bytes())
    }
}

/// A held exec-stream slot; dropping it frees the slot. A stream holds one
/// of the host's and one of its sandbox's.
#[derive(Debug)]
pub struct StreamSlot {
    count: Arc<AtomicUsize>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}


impl StreamSlot {
    /// Takes one of `max` slots counted by `count`; `None` when all are taken.
    pub(super) fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<StreamSlot> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(StreamSlot { count: Arc::clone(count) })
    }
}

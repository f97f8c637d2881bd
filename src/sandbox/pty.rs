//! Terminal sessions of one sandbox: each runs in the guest under a
//! pseudo-terminal; here a pump thread per session reads its output as it
//! comes, keeps the newest [`REPLAY_BYTES`] of it (numbered by `seq`), and
//! hands every event to the clients attached now, each through a bounded
//! queue of its own. Output flows with no client attached, and a client that
//! stops reading is cut off (its queue is full) without slowing the session
//! or the other clients; it can attach again and gets the replay.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use super::exec::{now_ms, StreamItem};
use super::instance::StreamSlot;
use crate::guest::stream::{self, RecvTimeoutError};
use crate::guest::{ExecChunk, Guest, PtyControl, StreamRx, StreamTx, Weigh};
use crate::obs::Logger;

/// Output a session keeps for clients that attach later (and for `read`).
pub const REPLAY_BYTES: usize = 1 << 20;
/// Events one client may have queued before it counts as stopped reading.
const CLIENT_QUEUE_BYTES: usize = 4 << 20;
/// Sessions one sandbox keeps (running and exited); past it the oldest
/// exited one is forgotten, and with none exited a create is refused.
pub const MAX_SESSIONS: usize = 64;
/// The exit code a session reports when its sandbox failed or was
/// destroyed under it (as an exec does).
const FAILED_EXIT_CODE: i32 = 137;

/// One event of a session, as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// The command runs; the session id.
    Ready(String),
    /// Output bytes and their sequence number.
    Data(u64, Arc<Vec<u8>>),
    /// The session ended with this code. Always the last event.
    Exit(i32),
    /// The session could not start (before any `Ready`). Always the last.
    Error(String),
}

impl Weigh for PtyEvent {
    fn weight(&self) -> usize {
        64 + match self {
            PtyEvent::Data(_, b) => b.len(),
            PtyEvent::Error(m) => m.len(),
            PtyEvent::Ready(_) | PtyEvent::Exit(_) => 0,
        }
    }
}

impl PtyEvent {
    /// The NDJSON line of the contract's PTY stream (no trailing newline).
    pub fn line(&self) -> Vec<u8> {
        let v = match self {
            PtyEvent::Ready(id) => json!({ "type": "pty_ready", "session_id": id }),
            PtyEvent::Data(seq, b) => json!({
                "type": "pty_data",
                "data_b64": base64::engine::general_purpose::STANDARD.encode(b.as_slice()),
                "seq": seq,
            }),
            PtyEvent::Exit(code) => json!({ "type": "pty_exit", "data": code }),
            PtyEvent::Error(m) => json!({ "type": "pty_error", "message": m }),
        };
        v.to_string().into_bytes()
    }

    fn is_last(&self) -> bool {
        matches!(self, PtyEvent::Exit(_) | PtyEvent::Error(_))
    }
}

#[derive(Default)]
struct SessionState {
    ready: bool,
    /// Why it could not start.
    failed: Option<String>,
    exit: Option<i32>,
    /// Newest output, oldest first, each chunk with its `seq`.
    ring: VecDeque<(u64, Arc<Vec<u8>>)>,
    ring_bytes: usize,
    next_seq: u64,
    clients: Vec<StreamTx<PtyEvent>>,
}

impl SessionState {
    fn ended(&self) -> bool {
        self.exit.is_some() || self.failed.is_some()
    }

    /// Hands `ev` to every client; drops those whose queue is full (they
    /// stopped reading) or gone.
    fn broadcast(&mut self, ev: &PtyEvent) {
        self.clients.retain(|tx| tx.push(ev.clone()) == crate::guest::Flow::Open);
    }

    fn output(&mut self, bytes: Vec<u8>) {
        let (seq, data) = (self.next_seq, Arc::new(bytes));
        self.next_seq += 1;
        self.ring_bytes += data.len();
        self.ring.push_back((seq, Arc::clone(&data)));
        while self.ring_bytes > REPLAY_BYTES && self.ring.len() > 1 {
            if let Some((_, old)) = self.ring.pop_front() {
                self.ring_bytes -= old.len();
            }
        }
        self.broadcast(&PtyEvent::Data(seq, data));
    }
}

/// One terminal session.
pub struct PtySession {
    id: String,
    label: String,
    created_ms: u64,
    control: Box<dyn PtyControl>,
    state: Mutex<SessionState>,
    changed: Condvar,
}

impl PtySession {
    /// The `pty_...` id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Its line in `GET /v1/sandboxes/{id}/pty`.
    pub fn info(&self) -> Value {
        let st = self.lock();
        let exit = st.exit.or(st.failed.as_ref().map(|_| FAILED_EXIT_CODE));
        json!({ "pty_id": self.id, "cmd_label": self.label, "created_at_ms": self.created_ms, "exit_code": exit })
    }

    /// Whether it has ended (exited, or never started).
    pub fn ended(&self) -> bool {
        self.lock().ended()
    }

    /// The controls (input, resize, kill).
    pub fn control(&self) -> &dyn PtyControl {
        self.control.as_ref()
    }

    /// The creator's queue, attached before the pump starts, so it sees
    /// `Ready` (or `Error`) first.
    fn subscribe(&self) -> StreamRx<PtyEvent> {
        let (tx, rx) = stream::bounded(CLIENT_QUEUE_BYTES);
        self.lock().clients.push(tx);
        rx
    }

    /// A client attaching later: the replay (as events, in order) and, if
    /// the session still runs, a queue of what comes next.
    fn attach(&self) -> (VecDeque<PtyEvent>, Option<StreamRx<PtyEvent>>) {
        let mut st = self.lock();
        let mut replay: VecDeque<PtyEvent> = st.ring.iter().map(|(s, b)| PtyEvent::Data(*s, Arc::clone(b))).collect();
        if let Some(code) = st.exit {
            replay.push_back(PtyEvent::Exit(code));
            return (replay, None);
        }
        if let Some(why) = &st.failed {
            replay.push_back(PtyEvent::Error(why.clone()));
            return (replay, None);
        }
        let (tx, rx) = stream::bounded(CLIENT_QUEUE_BYTES);
        st.clients.push(tx);
        (replay, Some(rx))
    }

    /// Output after `since_seq` (from the oldest kept if that is gone), at
    /// most `max_bytes` but always at least one chunk when there is one;
    /// waits up to `timeout` for some when there is none and the session
    /// runs. `(bytes, next_seq, exited, exit_code)`.
    pub fn read(&self, since_seq: u64, max_bytes: usize, timeout: Duration) -> (Vec<u8>, u64, bool, Option<i32>) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let mut out = Vec::new();
            let from = since_seq.max(st.ring.front().map_or(st.next_seq, |(s, _)| *s));
            let mut next = from;
            for (seq, b) in st.ring.iter().filter(|(s, _)| *s >= from) {
                if !out.is_empty() && out.len() + b.len() > max_bytes {
                    break;
                }
                out.extend_from_slice(b);
                next = seq + 1;
            }
            let now = Instant::now();
            if !out.is_empty() || st.ended() || now >= deadline {
                let exit = st.exit.or(st.failed.as_ref().map(|_| FAILED_EXIT_CODE));
                return (out, next, st.ended(), exit);
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The pump: everything the guest says about this session, until it ends.
    fn pump(&self, rx: StreamRx<ExecChunk>) {
        loop {
            let chunk = rx.recv();
            let mut st = self.lock();
            match chunk {
                Some(ExecChunk::Started) if !st.ready => {
                    st.ready = true;
                    st.broadcast(&PtyEvent::Ready(self.id.clone()));
                }
                Some(ExecChunk::Started) => {}
                Some(ExecChunk::Stdout(b) | ExecChunk::Stderr(b)) => {
                    if !st.ready {
                        // Output before the start report cannot happen with
                        // our agent; a session that talks is running.
                        st.ready = true;
                        st.broadcast(&PtyEvent::Ready(self.id.clone()));
                    }
                    st.output(b);
                }
                Some(ExecChunk::Exit(code)) => {
                    st.exit = Some(code);
                    st.broadcast(&PtyEvent::Exit(code));
                }
                Some(ExecChunk::Failed(why)) if !st.ready => {
                    st.broadcast(&PtyEvent::Error(why.clone()));
                    st.failed = Some(why);
                }
                Some(ExecChunk::Failed(_)) | None => {
                    // The sandbox failed or was destroyed under a running
                    // session: it ends like an exec would.
                    st.exit = Some(FAILED_EXIT_CODE);
                    st.broadcast(&PtyEvent::Exit(FAILED_EXIT_CODE));
                }
            }
            if st.ended() {
                // Clients' queues end once drained: they get nothing more.
                st.clients.clear();
            }
            let ended = st.ended();
            drop(st);
            self.changed.notify_all();
            if ended {
                return;
            }
        }
    }
}

/// A sandbox's sessions, oldest first.
#[derive(Default)]
pub struct PtySessions {
    list: Mutex<Vec<Arc<PtySession>>>,
}

/// Why a session could not be added.
#[derive(Debug, PartialEq, Eq)]
pub struct TooManySessions;

impl PtySessions {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<PtySession>>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session `id`.
    pub fn get(&self, id: &str) -> Option<Arc<PtySession>> {
        self.lock().iter().find(|s| s.id == id).cloned()
    }

    /// Every session's line, oldest first.
    pub fn list(&self) -> Vec<Value> {
        let all: Vec<Arc<PtySession>> = self.lock().clone();
        all.iter().map(|s| s.info()).collect()
    }

    /// Registers a session over a guest terminal (`rx` its output), starts
    /// its pump, and returns the creator's stream (`Ready` first).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &self,
        id: String,
        label: String,
        rx: StreamRx<ExecChunk>,
        control: Box<dyn PtyControl>,
        keepalive: Duration,
        slot: (StreamSlot, StreamSlot),
        log: &Logger,
    ) -> Result<PtyStream, TooManySessions> {
        let session = Arc::new(PtySession {
            id,
            label,
            created_ms: now_ms(),
            control,
            state: Mutex::new(SessionState::default()),
            changed: Condvar::new(),
        });
        {
            let mut list = self.lock();
            if list.len() >= MAX_SESSIONS {
                let Some(oldest_ended) = list.iter().position(|s| s.ended()) else {
                    // Nothing to forget: the guest session gets killed.
                    let _ = session.control.kill();
                    return Err(TooManySessions);
                };
                list.remove(oldest_ended);
            }
            list.push(Arc::clone(&session));
        }
        let events = session.subscribe();
        spawn_pump(&session, rx, log);
        Ok(PtyStream { pending: VecDeque::new(), events: Some(events), keepalive, done: false, _slot: slot })
    }

    /// In a fork child: the running sessions of its parent, as the child's
    /// guest runs them now (same ids, labels and output so far; output from
    /// here on is the child's own). Sessions the child's guest cannot reach
    /// are left out.
    pub fn inherit(&self, parent: &PtySessions, guest: &dyn Guest, log: &Logger) {
        let running: Vec<Arc<PtySession>> = parent.lock().iter().filter(|s| !s.ended()).cloned().collect();
        for p in running {
            let (ring, ring_bytes, next_seq) = {
                let st = p.lock();
                (st.ring.clone(), st.ring_bytes, st.next_seq)
            };
            self.adopt(Carried { id: p.id.clone(), label: p.label.clone(), created_ms: p.created_ms, handle: p.control.handle(), ring, ring_bytes, next_seq }, guest, log);
        }
    }

    /// What a frozen space keeps of the running sessions (a JSON array):
    /// id, label, creation time, the guest's handle, the replay window and
    /// the next `seq`, so [`PtySessions::resume_saved`] carries them on.
    pub fn save(&self) -> Value {
        let b64 = base64::engine::general_purpose::STANDARD;
        let running: Vec<Arc<PtySession>> = self.lock().iter().filter(|s| !s.ended()).cloned().collect();
        // The space's state file has a size cap: all replay windows
        // together keep at most SAVED_REPLAY_BYTES, each its newest output.
        let budget = SAVED_REPLAY_BYTES / running.len().max(1);
        Value::Array(
            running
                .iter()
                .map(|s| {
                    let st = s.lock();
                    let mut kept = 0;
                    let newest: Vec<&(u64, Arc<Vec<u8>>)> = st
                        .ring
                        .iter()
                        .rev()
                        .take_while(|(_, d)| {
                            kept += d.len();
                            kept <= budget
                        })
                        .collect();
                    let ring: Vec<Value> = newest.iter().rev().map(|(seq, data)| json!([seq, b64.encode(data.as_slice())])).collect();
                    json!({
                        "id": s.id, "label": s.label, "created_ms": s.created_ms,
                        "handle": s.control.handle(), "next_seq": st.next_seq, "ring": ring,
                    })
                })
                .collect(),
        )
    }

    /// In a guest resumed from a space: the sessions [`PtySessions::save`]
    /// kept, each reattached to the guest's copy of it. An entry that does
    /// not read back is skipped.
    pub fn resume_saved(&self, saved: &Value, guest: &dyn Guest, log: &Logger) {
        let b64 = base64::engine::general_purpose::STANDARD;
        for s in saved.as_array().map(Vec::as_slice).unwrap_or_default() {
            let text = |k: &str| s.get(k).and_then(Value::as_str).map(str::to_string);
            let num = |k: &str| s.get(k).and_then(Value::as_u64);
            let (Some(id), Some(label), Some(created_ms), Some(handle), Some(next_seq)) =
                (text("id"), text("label"), num("created_ms"), num("handle"), num("next_seq"))
            else {
                continue;
            };
            let mut ring = VecDeque::new();
            let mut ring_bytes = 0;
            for e in s.get("ring").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
                let (Some(seq), Some(Ok(data))) = (e.get(0).and_then(Value::as_u64), e.get(1).and_then(Value::as_str).map(|d| b64.decode(d))) else {
                    continue;
                };
                ring_bytes += data.len();
                ring.push_back((seq, Arc::new(data)));
            }
            self.adopt(Carried { id, label, created_ms, handle, ring, ring_bytes, next_seq }, guest, log);
        }
    }

    fn adopt(&self, c: Carried, guest: &dyn Guest, log: &Logger) {
        let Ok((rx, control)) = guest.pty_reopen(c.handle) else { return };
        let state = SessionState { ready: true, ring: c.ring, ring_bytes: c.ring_bytes, next_seq: c.next_seq, ..SessionState::default() };
        let session = Arc::new(PtySession {
            id: c.id,
            label: c.label,
            created_ms: c.created_ms,
            control,
            state: Mutex::new(state),
            changed: Condvar::new(),
        });
        self.lock().push(Arc::clone(&session));
        spawn_pump(&session, rx, log);
    }

    /// A client attaching to `session`: its replay, then live events.
    pub fn attach(session: &PtySession, keepalive: Duration, slot: (StreamSlot, StreamSlot)) -> PtyStream {
        let (pending, events) = session.attach();
        PtyStream { pending, events, keepalive, done: false, _slot: slot }
    }
}

/// Replay bytes a frozen space keeps of all its sessions together.
const SAVED_REPLAY_BYTES: usize = 16 << 20;

/// A running session carried into another guest (a fork child, a resumed space).
struct Carried {
    id: String,
    label: String,
    created_ms: u64,
    handle: u64,
    ring: VecDeque<(u64, Arc<Vec<u8>>)>,
    ring_bytes: usize,
    next_seq: u64,
}

/// Starts `session`'s pump over `rx`; if no thread can be started, the
/// session ends at once with the reason (and its guest side is killed).
fn spawn_pump(session: &Arc<PtySession>, rx: StreamRx<ExecChunk>, log: &Logger) {
    let pumped = Arc::clone(session);
    let spawned = std::thread::Builder::new().name("pty-pump".into()).spawn(move || pumped.pump(rx));
    if let Err(e) = spawned {
        log.error("cannot start a PTY session's pump thread", &[("cause", json!(e.to_string()))]);
        let _ = session.control.kill();
        let mut st = session.lock();
        let why = format!("podflare: cannot start the session: {e}");
        st.broadcast(&PtyEvent::Error(why.clone()));
        st.failed = Some(why);
        st.clients.clear();
    }
}

/// One client's view of a session, for the HTTP layer: lines to write and
/// keep-alives, ending right after `pty_exit` (or `pty_error`).
pub struct PtyStream {
    pending: VecDeque<PtyEvent>,
    events: Option<StreamRx<PtyEvent>>,
    keepalive: Duration,
    done: bool,
    _slot: (StreamSlot, StreamSlot),
}

impl super::exec::EventStream for PtyStream {
    /// Blocks until the next line, at most the keep-alive interval. `None`
    /// after the last event, or when this client was cut off for not
    /// reading.
    fn next_item(&mut self) -> Option<StreamItem> {
        if self.done {
            return None;
        }
        let ev = match self.pending.pop_front() {
            Some(ev) => ev,
            None => match self.events.as_ref()?.recv_timeout(self.keepalive) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => return Some(StreamItem::KeepAlive),
                Err(RecvTimeoutError::Disconnected) => return None,
            },
        };
        self.done = ev.is_last();
        Some(StreamItem::Event(ev.line()))
    }

    /// The session goes on without this client: dropping its queue detaches it.
    fn abandon(self, _log: &Logger) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestError;
    use std::sync::atomic::AtomicUsize;

    struct Quiet;
    impl PtyControl for Quiet {
        fn input(&self, _: &[u8]) -> Result<(), GuestError> {
            Ok(())
        }
        fn resize(&self, _: u16, _: u16) -> Result<(), GuestError> {
            Ok(())
        }
        fn kill(&self) -> Result<(), GuestError> {
            Ok(())
        }
        fn handle(&self) -> u64 {
            0
        }
    }

    fn slot() -> (StreamSlot, StreamSlot) {
        let n = Arc::new(AtomicUsize::new(0));
        (StreamSlot::acquire(&n, 10).unwrap(), StreamSlot::acquire(&n, 10).unwrap())
    }

    fn lines(s: &mut PtyStream) -> Vec<Value> {
        use super::super::exec::EventStream;
        let mut out = Vec::new();
        while let Some(item) = s.next_item() {
            if let StreamItem::Event(l) = item {
                out.push(serde_json::from_slice(&l).unwrap());
            }
        }
        out
    }

    fn session(sessions: &PtySessions, id: &str) -> (StreamTx<ExecChunk>, PtyStream) {
        let (tx, rx) = stream::bounded(64 << 20);
        let s = sessions
            .start(id.into(), "bash".into(), rx, Box::new(Quiet), Duration::from_millis(50), slot(), &Logger::discard(crate::config::LogFormat::Json))
            .unwrap();
        (tx, s)
    }

    #[test]
    fn creator_sees_ready_data_exit_and_a_late_client_gets_the_replay() {
        let sessions = PtySessions::default();
        let (tx, mut creator) = session(&sessions, "pty_1");
        tx.push(ExecChunk::Started);
        tx.push(ExecChunk::Stdout(b"hello ".to_vec()));
        tx.push(ExecChunk::Stdout(b"world".to_vec()));
        let got = {
            let s = sessions.get("pty_1").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while s.read(0, 1 << 20, Duration::ZERO).1 < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            s.read(0, 1 << 20, Duration::ZERO)
        };
        assert_eq!(got, (b"hello world".to_vec(), 2, false, None));
        assert_eq!(sessions.get("pty_1").unwrap().read(1, 1, Duration::ZERO).0, b"world");
        let mut late = PtySessions::attach(&sessions.get("pty_1").unwrap(), Duration::from_millis(50), slot());
        tx.push(ExecChunk::Exit(3));
        drop(tx);
        let c = lines(&mut creator);
        assert_eq!(c[0], json!({"type": "pty_ready", "session_id": "pty_1"}));
        assert_eq!(c[1]["seq"], 0);
        assert_eq!(c[2]["data_b64"], "d29ybGQ=");
        assert_eq!(c.last().unwrap(), &json!({"type": "pty_exit", "data": 3}));
        let l = lines(&mut late);
        assert_eq!(l.len(), 3, "replay of both chunks, no pty_ready, then the exit: {l:?}");
        assert_eq!(l[0]["data_b64"], "aGVsbG8g");
        assert_eq!(sessions.list()[0]["exit_code"], 3);
    }

    #[test]
    fn the_replay_keeps_the_newest_mebibyte_and_read_starts_at_the_oldest_kept() {
        let sessions = PtySessions::default();
        let (tx, _creator) = session(&sessions, "pty_2");
        tx.push(ExecChunk::Started);
        for i in 0..40u8 {
            tx.push(ExecChunk::Stdout(vec![i; 64 << 10]));
        }
        tx.push(ExecChunk::Exit(0));
        let s = sessions.get("pty_2").unwrap();
        // `read` answers as soon as any data exists, which can be before the
        // pump has taken the exit: wait for the end, then read it all.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.read(0, 0, Duration::ZERO).2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (data, next, exited, code) = s.read(0, usize::MAX, Duration::ZERO);
        assert!(exited && code == Some(0), "exited {exited}, code {code:?}");
        assert_eq!(next, 40);
        assert_eq!(data.len(), REPLAY_BYTES, "16 chunks of 64 KiB kept");
        assert_eq!(data[0], 24, "the oldest kept chunk is number 24");
    }

    #[test]
    fn a_client_that_stops_reading_is_cut_off_and_the_session_goes_on() {
        let sessions = PtySessions::default();
        let (tx, mut stalled) = session(&sessions, "pty_3");
        tx.push(ExecChunk::Started);
        // Far more than a client's queue, nobody reading the creator's stream.
        for _ in 0..100 {
            tx.push(ExecChunk::Stdout(vec![b'x'; 64 << 10]));
        }
        let s = sessions.get("pty_3").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.read(0, usize::MAX, Duration::ZERO).1 < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut fresh = PtySessions::attach(&s, Duration::from_millis(50), slot());
        tx.push(ExecChunk::Exit(0));
        let got = lines(&mut stalled);
        assert!(got.len() < 100, "the stalled client was cut off after its queue filled: {} events", got.len());
        assert_ne!(got.last().unwrap()["type"], "pty_exit");
        assert_eq!(lines(&mut fresh).last().unwrap()["type"], "pty_exit", "a client attached later sees the end");
    }

    #[test]
    fn a_session_that_cannot_start_says_why_and_counts_as_ended() {
        let sessions = PtySessions::default();
        let (tx, mut creator) = session(&sessions, "pty_4");
        tx.push(ExecChunk::Failed("spawn failed: No such file or directory (nope)".into()));
        let c = lines(&mut creator);
        assert_eq!(c, [json!({"type": "pty_error", "message": "spawn failed: No such file or directory (nope)"})]);
        assert!(sessions.get("pty_4").unwrap().ended());
    }
}

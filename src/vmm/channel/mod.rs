//! Host side of the guest channel: frames over the virtio-console ports
//! and the REPL's shared-memory ring, demultiplexed into per-request streams.
//!
//! Python execs go through the ring ([`crate::devices::ring`]) once the
//! REPL serves it: their request and output then move through guest memory
//! with no guest system call while the REPL polls, and the console port
//! carries only `Hello`, wake-ups and the rest of the control frames. A
//! REPL that does not serve the ring gets its execs over the console port.
//!
//! The console device hands us guest bytes per port on the VM's device thread
//! ([`Channel::sink`]); we decode frames and route each to the stream it names.
//! Requests go out through the console's `ConsoleHandle`, which blocks the
//! sender when the guest is not draining (backpressure host -> guest).
//!
//! Guest -> host: each exec's output goes into its own bounded stream
//! ([`crate::guest::stream`]), which never blocks the device thread. When a
//! stream is over its limit (its reader, say an HTTP client, has stopped
//! reading) the sink tells the console to stop taking that port's transmit
//! queue; the guest then waits on its own full queue, and the stream's drain
//! hook restarts the port once the reader has caught up.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use podflare_proto::{encode, encode_json, Decoder, ExecRequest, Frame, Hello, Kind, Language, PtyRequest, PtySize};

use crate::devices::ring::{RingHandle, RingPeer};
use crate::devices::virtio::console::{ConsoleHandle, ConsoleSink, SinkFlow};
use crate::devices::DeviceError;
use crate::guest::{stream, ExecChunk, Flow, StreamRx, StreamTx, EXEC_STREAM_LIMIT};
/// Port count: 0 = agent, 1 = Python REPL.
pub const PORTS: usize = 2;
/// The REPL's ring, numbered after the console ports (its own decoder and
/// `Ready` count; not a console port).
const RING: usize = PORTS;
/// Frame sources: the console ports and the ring.
const SOURCES: usize = PORTS + 1;
/// How long the REPL polls its ring after a request before it sleeps, when
/// nobody set it ([`set_default_poll_window`], [`Channel::set_poll_window`]).
pub const DEFAULT_POLL_US: u32 = 10_000;

/// The polling window channels made from now on start with (microseconds).
static POLL_US: AtomicU32 = AtomicU32::new(DEFAULT_POLL_US);

/// Sets the REPL's polling window for every channel made from now on (the
/// operator's `PODFLARE_GUEST_POLL_MS`); a 0 makes the REPL sleep at once.
pub fn set_default_poll_window(window: Duration) {
    POLL_US.store(u32::try_from(window.as_micros()).unwrap_or(u32::MAX), Ordering::Relaxed);
}

/// Channel failures.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    /// The guest side broke (bad frames, VM died).
    #[error("guest channel failed: {0}")]
    Failed(String),
    /// The guest did not answer in time.
    #[error("guest did not answer within {0:?}")]
    Timeout(Duration),
    /// The console device is not attached yet.
    #[error("guest channel not connected")]
    NotConnected,
}

#[derive(Default)]
struct Inner {
    decoders: [Decoder; SOURCES],
    streams: HashMap<u32, StreamTx<ExecChunk>>,
    /// Streams whose request went through the ring and whose end has not
    /// come back: while there is any, the device thread polls the ring.
    ring_streams: HashSet<u32>,
    /// Host bytes for the ring inherited from a fork's parent, queued once
    /// the ring is attached.
    ring_seed: Vec<u8>,
    next_stream: u32,
    ready: [u64; SOURCES],
    pongs: u64,
    failed: Option<String>,
}

/// Where a fork child's channel starts: its parent's half-received frames
/// (the child's guest sends the rest of them) and stream numbering (output
/// of an exec the parent was running may still arrive under the old number,
/// and must not land in a new exec's stream).
#[derive(Clone, Debug)]
pub struct ChannelSeed {
    decoders: [Decoder; SOURCES],
    next_stream: u32,
    /// Host bytes not yet in the parent's ring (part of a request may be in
    /// it already: the child's guest must get the rest).
    ring_pending: Vec<u8>,
}

impl ChannelSeed {
    /// The next stream number, when no guest frame is half received (a
    /// frozen space keeps only that number: nothing else is in flight).
    pub fn quiet_next_stream(&self) -> Option<u32> {
        (self.decoders.iter().all(|d| d.pending() == 0) && self.ring_pending.is_empty()).then_some(self.next_stream)
    }

    /// A channel start with nothing pending, numbering streams from `next_stream`.
    pub fn at_stream(next_stream: u32) -> Self {
        ChannelSeed { decoders: Default::default(), next_stream, ring_pending: Vec::new() }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    console: Mutex<Option<ConsoleHandle>>,
    ring: Mutex<Option<RingHandle>>,
    /// The REPL's polling window (microseconds), written at every `Hello`.
    poll_us: AtomicU32,
}

/// One VM's channel. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
}

impl Default for Channel {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Channel {
    /// A channel with no console attached yet.
    pub fn new() -> Self {
        Self::with_inner(Inner { next_stream: 1, ..Default::default() })
    }

    /// A fork child's channel, continuing where its parent's stood when
    /// [`Channel::seed`] was taken.
    pub fn start_from(seed: &ChannelSeed) -> Self {
        Self::with_inner(Inner {
            decoders: seed.decoders.clone(),
            next_stream: seed.next_stream,
            ring_seed: seed.ring_pending.clone(),
            ..Default::default()
        })
    }

    fn with_inner(inner: Inner) -> Self {
        Channel {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                changed: Condvar::new(),
                console: Mutex::new(None),
                ring: Mutex::new(None),
                poll_us: AtomicU32::new(POLL_US.load(Ordering::Relaxed)),
            }),
        }
    }

    /// What a fork child's channel starts from. Take it with the device
    /// thread held, so no guest bytes arrive meanwhile.
    pub fn seed(&self) -> ChannelSeed {
        let inner = lock(&self.shared.inner);
        let ring_pending = match lock(&self.shared.ring).as_ref() {
            Some(r) => r.pending(),
            None => inner.ring_seed.clone(),
        };
        ChannelSeed { decoders: inner.decoders.clone(), next_stream: inner.next_stream, ring_pending }
    }

    /// The ring's host side: guest bytes, wake-ups and failures.
    pub fn ring_peer(&self) -> Box<dyn RingPeer> {
        Box::new(RingSide(self.clone()))
    }

    /// Connects the ring's host-side handle; bytes a fork's parent had not
    /// yet put in its ring go first.
    pub fn attach_ring(&self, ring: RingHandle) {
        let seed = std::mem::take(&mut lock(&self.shared.inner).ring_seed);
        if !seed.is_empty() {
            ring.send(&seed);
        }
        *lock(&self.shared.ring) = Some(ring);
    }

    /// How long the REPL keeps polling its ring after a request
    /// (microseconds); takes effect at the next `Hello`.
    pub fn set_poll_window(&self, micros: u32) {
        self.shared.poll_us.store(micros, Ordering::Relaxed);
    }

    /// Whether Python execs go through the ring (the REPL serves it).
    pub fn uses_ring(&self) -> bool {
        lock(&self.shared.ring).as_ref().is_some_and(RingHandle::attached)
    }

    /// The callback the console device calls with guest bytes.
    pub fn sink(&self) -> ConsoleSink {
        let me = self.clone();
        Box::new(move |port, bytes| me.on_guest_bytes(port, bytes))
    }

    /// Connects the console's host-side handle.
    pub fn attach(&self, console: ConsoleHandle) {
        *lock(&self.shared.console) = Some(console);
    }

    /// Decodes and routes guest bytes; never blocks (it runs on the device
    /// thread). Asks the console to pause the port when a stream is full.
    fn on_guest_bytes(&self, port: u32, bytes: &[u8]) -> SinkFlow {
        let mut inner = lock(&self.shared.inner);
        let Some(idx) = usize::try_from(port).ok().filter(|p| *p < SOURCES) else { return SinkFlow::Continue };
        inner.decoders[idx].push(bytes);
        let mut flow = SinkFlow::Continue;
        loop {
            let frame = match inner.decoders[idx].next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let msg = format!("port {port} sent malformed data: {e}");
                    inner.decoders[idx] = Decoder::new();
                    drop(inner);
                    self.fail(&msg);
                    return SinkFlow::Continue;
                }
            };
            if route(&mut inner, idx, frame) == Flow::Full {
                flow = SinkFlow::Pause;
            }
        }
        // An exec's end may come on the console too (an exec cancelled
        // before it ran): either way the ring learns how many still run.
        self.ring_busy(&mut inner);
        self.shared.changed.notify_all();
        flow
    }

    /// Tells the ring how many of its requests are still running.
    fn ring_busy(&self, inner: &mut Inner) {
        inner.ring_streams.retain(|id| inner.streams.contains_key(id));
        if let Some(r) = lock(&self.shared.ring).as_ref() {
            r.set_busy(inner.ring_streams.len());
        }
    }

    /// Marks the channel failed: every open stream ends with `Failed`.
    pub fn fail(&self, reason: &str) {
        {
            let mut inner = lock(&self.shared.inner);
            if inner.failed.is_none() {
                inner.failed = Some(reason.to_string());
            }
            self.shared.changed.notify_all();
            for (_, tx) in inner.streams.drain() {
                tx.push(ExecChunk::Failed(reason.to_string()));
            }
            self.ring_busy(&mut inner);
        }
        if let Some(c) = lock(&self.shared.console).as_ref() {
            c.close();
        }
    }

    /// Why the channel failed, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.inner).failed.clone()
    }

    /// How many `Ready` frames `port` has sent so far.
    pub fn ready_count(&self, port: usize) -> u64 {
        lock(&self.shared.inner).ready.get(port).copied().unwrap_or(0)
    }

    /// Waits until `port` has sent more than `seen` `Ready` frames.
    pub fn wait_ready(&self, port: usize, seen: u64, timeout: Duration) -> Result<(), ChannelError> {
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.shared.inner);
        loop {
            if let Some(f) = &inner.failed {
                return Err(ChannelError::Failed(f.clone()));
            }
            if inner.ready.get(port).copied().unwrap_or(0) > seen {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ChannelError::Timeout(timeout));
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn send(&self, port: u32, bytes: &[u8]) -> Result<(), ChannelError> {
        if let Some(f) = self.failure() {
            return Err(ChannelError::Failed(f));
        }
        let console = lock(&self.shared.console).clone().ok_or(ChannelError::NotConnected)?;
        console.send(port, bytes).map_err(|e| {
            let why = e.to_string();
            // Part of a frame may be queued: the port's byte stream is no
            // longer framed, so the channel is done for.
            if matches!(e, DeviceError::Stalled { .. }) {
                self.fail(&why);
            }
            ChannelError::Failed(why)
        })
    }

    /// Sends `Hello` (wall clock + fresh entropy) to both ports. Each end
    /// handles it before any request queued after it on the same port, so a
    /// restored guest never runs user code with the snapshot's clock or
    /// random state.
    pub fn send_hello(&self) -> Result<(), ChannelError> {
        self.send_hello_growing(None, Duration::ZERO)
    }

    /// As [`Channel::send_hello`]; with `disk_bytes`, the agent's Hello
    /// asks it to grow the writable disk's file system to that size, and
    /// the REPL's Hello (so any user code) follows only once the agent has
    /// answered, waiting at most `wait`: no exec sees the old size.
    pub fn send_hello_growing(&self, disk_bytes: Option<u64>, wait: Duration) -> Result<(), ChannelError> {
        let hello = Hello {
            wall_clock_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            entropy_hex: host_entropy_hex(),
            disk_bytes: None,
            ring_generation: None,
        };
        for port in 0..PORTS as u32 {
            let mut frame = Vec::new();
            if port == podflare_proto::REPL_PORT {
                // A new generation before the Hello that names it: the REPL
                // runs ring requests only once it has handled this Hello.
                let ring = lock(&self.shared.ring).clone();
                let ring_generation = ring.map(|r| r.next_generation(self.shared.poll_us.load(Ordering::Relaxed)));
                encode_json(&mut frame, Kind::Hello, 0, &Hello { ring_generation, ..hello.clone() });
                self.send(port, &frame)?;
            } else if port == podflare_proto::AGENT_PORT && disk_bytes.is_some() {
                let seen = self.ready_count(port as usize);
                encode_json(&mut frame, Kind::Hello, 0, &Hello { disk_bytes, ..hello.clone() });
                self.send(port, &frame)?;
                self.wait_ready(port as usize, seen, wait)?;
            } else {
                encode_json(&mut frame, Kind::Hello, 0, &hello);
                self.send(port, &frame)?;
            }
        }
        Ok(())
    }

    /// In a fork child: a stream for an id the parent opened before the fork
    /// (a terminal session the child's guest runs too), on the agent port.
    /// Output the child sent before this call is gone; what follows arrives.
    pub fn adopt_stream(&self, stream: u32) -> Result<StreamRx<ExecChunk>, ChannelError> {
        self.open_stream_as(podflare_proto::AGENT_PORT, Some(stream)).map(|(_, rx)| rx)
    }

    /// A new stream id on `port` and the bounded stream its output goes to;
    /// reading it down below its limit resumes a port paused for it.
    fn open_stream(&self, port: u32) -> Result<(u32, StreamRx<ExecChunk>), ChannelError> {
        self.open_stream_as(port, None)
    }

    /// `open_stream` under a given id, or a new one.
    fn open_stream_as(&self, port: u32, given: Option<u32>) -> Result<(u32, StreamRx<ExecChunk>), ChannelError> {
        let (tx, rx) = stream::bounded(EXEC_STREAM_LIMIT);
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        tx.on_drain(move || {
            if let Some(shared) = weak.upgrade() {
                if port as usize == RING {
                    if let Some(r) = lock(&shared.ring).as_ref() {
                        r.resume();
                    }
                } else if let Some(c) = lock(&shared.console).as_ref() {
                    c.resume_tx(port);
                }
            }
        });
        let stream = {
            let mut inner = lock(&self.shared.inner);
            if let Some(f) = &inner.failed {
                return Err(ChannelError::Failed(f.clone()));
            }
            let id = match given {
                Some(id) => id,
                None => {
                    let id = inner.next_stream;
                    inner.next_stream = inner.next_stream.wrapping_add(1).max(1);
                    id
                }
            };
            inner.streams.insert(id, tx);
            id
        };
        Ok((stream, rx))
    }

    /// Starts an exec: Python on the REPL port, bash on the agent port.
    pub fn exec(&self, language: Language, code: &str) -> Result<StreamRx<ExecChunk>, ChannelError> {
        let ring = match language {
            Language::Python => lock(&self.shared.ring).clone().filter(RingHandle::attached),
            Language::Bash => None,
        };
        let port = match (language, &ring) {
            (Language::Python, Some(_)) => RING as u32,
            (Language::Python, None) => podflare_proto::REPL_PORT,
            (Language::Bash, _) => podflare_proto::AGENT_PORT,
        };
        let (stream, rx) = self.open_stream(port)?;
        // Checked here too (the API refuses such code first): the encoder
        // panics on an oversized payload, and that must never be reachable.
        let payload = serde_json::to_vec(&ExecRequest { language, code: code.to_string() }).unwrap_or_default();
        let mut frame = Vec::new();
        let sent = if payload.len() > podflare_proto::MAX_PAYLOAD {
            Err(ChannelError::Failed(format!("exec request of {} bytes is over the frame limit", payload.len())))
        } else {
            encode(&mut frame, Kind::Exec, stream, &payload);
            match &ring {
                Some(r) => {
                    let mut inner = lock(&self.shared.inner);
                    inner.ring_streams.insert(stream);
                    r.send(&frame);
                    self.ring_busy(&mut inner);
                    Ok(())
                }
                None => self.send(port, &frame),
            }
        };
        if let Err(e) = sent {
            lock(&self.shared.inner).streams.remove(&stream);
            return Err(e);
        }
        Ok(rx)
    }

    /// Starts a terminal session on the agent's port; returns its stream id
    /// (for [`Channel::to_stream`]) and its output. Unlike an exec's, a
    /// session's stream is read by a pump that never stops, so its limit
    /// only matters if the host itself falls behind.
    pub fn pty(&self, req: &PtyRequest) -> Result<(u32, StreamRx<ExecChunk>), ChannelError> {
        let port = podflare_proto::AGENT_PORT;
        let (stream, rx) = self.open_stream(port)?;
        let mut frame = Vec::new();
        encode_json(&mut frame, Kind::Pty, stream, req);
        if let Err(e) = self.send(port, &frame) {
            lock(&self.shared.inner).streams.remove(&stream);
            return Err(e);
        }
        Ok((stream, rx))
    }

    /// Sends a control frame (`Stdin`, `Resize`, `Cancel`) for `stream` on
    /// the agent's port. Payloads over the frame limit are refused here.
    pub fn to_stream(&self, kind: Kind, stream: u32, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > podflare_proto::MAX_PAYLOAD {
            return Err(ChannelError::Failed(format!("{} bytes are over the frame limit", payload.len())));
        }
        let mut frame = Vec::new();
        encode(&mut frame, kind, stream, payload);
        self.send(podflare_proto::AGENT_PORT, &frame)
    }

    /// A `Resize` payload.
    pub fn resize_payload(cols: u16, rows: u16) -> Vec<u8> {
        serde_json::to_vec(&PtySize { cols, rows }).unwrap_or_default()
    }

    /// Round trip of a tiny message through the agent (benchmarks, health).
    pub fn ping(&self, payload: &[u8], timeout: Duration) -> Result<(), ChannelError> {
        let seen = lock(&self.shared.inner).pongs;
        let mut frame = Vec::new();
        encode(&mut frame, Kind::Ping, 0, payload);
        self.send(podflare_proto::AGENT_PORT, &frame)?;
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.shared.inner);
        while inner.pongs == seen {
            if let Some(f) = &inner.failed {
                return Err(ChannelError::Failed(f.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ChannelError::Timeout(timeout));
            }
            inner = self.shared.changed.wait_timeout(inner, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(())
    }
}

/// The ring's view of its channel.
struct RingSide(Channel);

impl RingPeer for RingSide {
    fn deliver(&mut self, bytes: &[u8]) -> SinkFlow {
        self.0.on_guest_bytes(RING as u32, bytes)
    }

    fn wake_guest(&mut self) {
        let mut frame = Vec::new();
        encode(&mut frame, Kind::Wake, 0, &[]);
        if let Some(c) = lock(&self.0.shared.console).as_ref() {
            // A full port means the REPL has not read its console for a long
            // while; the wake-up is dropped, as the REPL looks at its ring
            // whenever it reads the port.
            c.try_send(podflare_proto::REPL_PORT, &frame);
        }
    }

    fn fail(&mut self, why: &str) {
        self.0.fail(why);
    }
}

/// Applies one guest frame; says whether the stream it fed is now full.
fn route(inner: &mut Inner, port: usize, frame: Frame) -> Flow {
    match frame.kind {
        Kind::Ready => inner.ready[port] += 1,
        Kind::Pong => inner.pongs += 1,
        Kind::Stdout | Kind::Stderr => {
            if let Some(tx) = inner.streams.get(&frame.stream) {
                let chunk = if frame.kind == Kind::Stdout {
                    ExecChunk::Stdout(frame.payload)
                } else {
                    ExecChunk::Stderr(frame.payload)
                };
                return tx.push(chunk);
            }
        }
        Kind::Started => {
            if let Some(tx) = inner.streams.get(&frame.stream) {
                return tx.push(ExecChunk::Started);
            }
        }
        Kind::Exit => {
            if let Some(tx) = inner.streams.remove(&frame.stream) {
                tx.push(ExecChunk::Exit(podflare_proto::exit_code(&frame.payload)));
            }
        }
        Kind::Error => {
            if let Some(tx) = inner.streams.remove(&frame.stream) {
                let msg = String::from_utf8_lossy(&frame.payload).into_owned();
                tx.push(ExecChunk::Failed(format!("guest refused the request: {msg}")));
            }
        }
        // Host-to-guest kinds coming back are a confused guest; ignore them.
        _ => {}
    }
    Flow::Open
}

/// 32 bytes from the host's CSPRNG, hex encoded.
fn host_entropy_hex() -> String {
    use std::io::Read;
    let mut buf = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_route_to_their_stream_and_end_it() {
        let ch = Channel::new();
        let (tx, rx) = stream::bounded(1 << 20);
        lock(&ch.shared.inner).streams.insert(7, tx);
        let mut sink = ch.sink();
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Stdout, 7, b"hi\n");
        encode(&mut wire, Kind::Stdout, 99, b"nobody listens");
        encode(&mut wire, Kind::Exit, 7, &2i32.to_le_bytes());
        encode_json(&mut wire, Kind::Ready, 0, &podflare_proto::Ready::default());
        let (a, b) = wire.split_at(5);
        sink(1, a);
        sink(1, b);
        assert_eq!(rx.recv(), Some(ExecChunk::Stdout(b"hi\n".to_vec())));
        assert_eq!(rx.recv(), Some(ExecChunk::Exit(2)));
        assert_eq!(ch.ready_count(1), 1);
        assert!(lock(&ch.shared.inner).streams.is_empty());
    }

    #[test]
    fn a_full_stream_pauses_the_port_without_blocking() {
        let ch = Channel::new();
        let (tx, rx) = stream::bounded(EXEC_STREAM_LIMIT);
        lock(&ch.shared.inner).streams.insert(4, tx);
        let mut sink = ch.sink();
        let mut frame = Vec::new();
        encode(&mut frame, Kind::Stdout, 4, &vec![b'x'; 1 << 20]);
        let flows: Vec<SinkFlow> = (0..6).map(|_| sink(1, &frame)).collect();
        assert_eq!(flows[0], SinkFlow::Continue);
        assert_eq!(flows[5], SinkFlow::Pause, "over the limit: pause, never block");
        assert!(rx.queued_bytes() > EXEC_STREAM_LIMIT);
        drop(rx);
        assert_eq!(sink(1, &frame), SinkFlow::Continue, "nobody reads: output is dropped");
    }

    #[test]
    fn garbage_fails_every_open_stream() {
        let ch = Channel::new();
        let (tx, rx) = stream::bounded(1 << 20);
        lock(&ch.shared.inner).streams.insert(3, tx);
        let mut sink = ch.sink();
        sink(0, &[0u8; 40]);
        assert!(matches!(rx.recv(), Some(ExecChunk::Failed(_))));
        assert!(ch.failure().is_some());
        assert!(ch.wait_ready(0, 0, Duration::from_millis(10)).is_err());
        sink(5, b"out-of-range port is ignored");
    }
}

//! Bounded streams from a guest to whoever reads its output (an exec's HTTP
//! writer today; PTY sessions and file transfers later).
//!
//! The producer is a VM's device thread, which must never wait on an HTTP
//! client: [`StreamTx::push`] never blocks. Instead it reports when the
//! stream holds more than its limit, and the producer stops taking that
//! guest output (the guest then waits on its own full queue: only its own
//! sandbox slows down). When the reader has drained the stream to half its
//! limit, the stream calls the producer's resume hook once
//! ([`StreamTx::on_drain`]). A dropped reader discards everything and
//! resumes the producer, so output nobody reads costs nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use std::sync::mpsc::{RecvTimeoutError, TryRecvError};

/// Host bytes an item holds, for the stream's limit.
pub trait Weigh {
    /// Bytes (payload plus bookkeeping) this item keeps alive while queued.
    fn weight(&self) -> usize;
}

/// What the producer should do after a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep sending.
    Open,
    /// The stream holds more than its limit: stop until the drain hook runs.
    Full,
}

type DrainHook = Box<dyn Fn() + Send + Sync>;

struct State<T> {
    items: VecDeque<T>,
    bytes: usize,
    /// Producing ends alive; the reader sees the end when it reaches 0.
    writers: usize,
    reader_gone: bool,
    /// A push saw the stream over its limit and the producer has not been
    /// told to resume yet.
    throttled: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    limit: usize,
    on_drain: Mutex<Option<DrainHook>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every update is a single consistent step; a panicking holder
        // cannot leave the queue half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn resume_producer(&self) {
        if let Some(hook) = self.on_drain.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            hook();
        }
    }
}

/// The producing end.
pub struct StreamTx<T> {
    shared: Arc<Shared<T>>,
}

/// The reading end.
pub struct StreamRx<T> {
    shared: Arc<Shared<T>>,
}

/// A stream that reports [`Flow::Full`] once it holds more than `limit`
/// bytes of items.
pub fn bounded<T: Weigh>(limit: usize) -> (StreamTx<T>, StreamRx<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            writers: 1,
            reader_gone: false,
            throttled: false,
        }),
        ready: Condvar::new(),
        limit: limit.max(1),
        on_drain: Mutex::new(None),
    });
    (StreamTx { shared: shared.clone() }, StreamRx { shared })
}

impl<T: Weigh> StreamTx<T> {
    /// Queues `item` (never blocks, never refuses). Returns [`Flow::Full`]
    /// when the stream is now over its limit; the producer should pause until
    /// the drain hook runs. Items pushed after the reader is gone are dropped.
    pub fn push(&self, item: T) -> Flow {
        let mut st = self.shared.lock();
        if st.reader_gone {
            return Flow::Open;
        }
        st.bytes = st.bytes.saturating_add(item.weight());
        st.items.push_back(item);
        let full = st.bytes > self.shared.limit;
        if full {
            st.throttled = true;
        }
        drop(st);
        self.shared.ready.notify_all();
        if full {
            Flow::Full
        } else {
            Flow::Open
        }
    }

    /// Sets what to call (once per time the stream went full) when the
    /// reader has drained it to half its limit or gone away.
    pub fn on_drain(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.shared.on_drain.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(hook));
    }

    /// True while the reader still exists.
    pub fn is_open(&self) -> bool {
        !self.shared.lock().reader_gone
    }
}

impl<T> Clone for StreamTx<T> {
    fn clone(&self) -> Self {
        self.shared.lock().writers += 1;
        StreamTx { shared: self.shared.clone() }
    }
}

impl<T> Drop for StreamTx<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.writers = st.writers.saturating_sub(1);
        drop(st);
        self.shared.ready.notify_all();
    }
}

impl<T: Weigh> StreamRx<T> {
    /// The next item, waiting at most `timeout`. `Disconnected` once the
    /// producer is gone and everything it sent has been read.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(item) = st.items.pop_front() {
                st.bytes = st.bytes.saturating_sub(item.weight());
                let resume = st.throttled && st.bytes <= self.shared.limit / 2;
                if resume {
                    st.throttled = false;
                }
                drop(st);
                if resume {
                    self.shared.resume_producer();
                }
                return Ok(item);
            }
            if st.writers == 0 {
                return Err(RecvTimeoutError::Disconnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            st = self.shared.ready.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        match self.recv_timeout(Duration::ZERO) {
            Ok(item) => Ok(item),
            Err(RecvTimeoutError::Timeout) => Err(TryRecvError::Empty),
            Err(RecvTimeoutError::Disconnected) => Err(TryRecvError::Disconnected),
        }
    }

    /// Blocks until an item arrives or the producer is gone.
    pub fn recv(&self) -> Option<T> {
        loop {
            match self.recv_timeout(Duration::from_secs(3600)) {
                Ok(item) => return Some(item),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Bytes queued and not yet read.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }
}

impl<T> Drop for StreamRx<T> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.reader_gone = true;
        st.items.clear();
        st.bytes = 0;
        let resume = std::mem::take(&mut st.throttled);
        drop(st);
        if resume {
            self.shared.resume_producer();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    impl Weigh for Vec<u8> {
        fn weight(&self) -> usize {
            self.len()
        }
    }

    #[test]
    fn full_then_resumed_once_at_half() {
        let (tx, rx) = bounded::<Vec<u8>>(100);
        let resumed = Arc::new(AtomicUsize::new(0));
        let r = resumed.clone();
        tx.on_drain(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(tx.push(vec![0; 60]), Flow::Open);
        assert_eq!(tx.push(vec![0; 60]), Flow::Full, "over the limit");
        assert_eq!(tx.push(vec![0; 30]), Flow::Full, "pushes are still taken, never blocked");
        assert_eq!(rx.queued_bytes(), 150);
        rx.recv_timeout(Duration::ZERO).unwrap();
        assert_eq!(resumed.load(Ordering::SeqCst), 0, "90 bytes left is above half");
        rx.recv_timeout(Duration::ZERO).unwrap();
        assert_eq!(resumed.load(Ordering::SeqCst), 1);
        rx.recv_timeout(Duration::ZERO).unwrap();
        assert_eq!(resumed.load(Ordering::SeqCst), 1, "resumed once per throttle");
        assert!(matches!(rx.recv_timeout(Duration::from_millis(5)), Err(RecvTimeoutError::Timeout)));
        drop(tx);
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)), Err(RecvTimeoutError::Disconnected)));
    }

    #[test]
    fn dropped_reader_discards_and_resumes() {
        let (tx, rx) = bounded::<Vec<u8>>(10);
        let resumed = Arc::new(AtomicUsize::new(0));
        let r = resumed.clone();
        tx.on_drain(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(tx.push(vec![0; 20]), Flow::Full);
        drop(rx);
        assert_eq!(resumed.load(Ordering::SeqCst), 1);
        assert!(!tx.is_open());
        assert_eq!(tx.push(vec![0; 1 << 20]), Flow::Open, "nobody reads: dropped, not held");
    }

    #[test]
    fn items_queued_before_the_writer_left_are_still_read() {
        let (tx, rx) = bounded::<Vec<u8>>(10);
        tx.push(b"a".to_vec());
        drop(tx);
        assert_eq!(rx.recv(), Some(b"a".to_vec()));
        assert_eq!(rx.recv(), None);
    }

    #[test]
    fn reader_wakes_when_an_item_arrives() {
        let (tx, rx) = bounded::<Vec<u8>>(10);
        let t = std::thread::spawn(move || rx.recv_timeout(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        tx.push(b"x".to_vec());
        assert_eq!(t.join().unwrap().unwrap(), b"x".to_vec());
    }
}

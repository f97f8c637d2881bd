//! A fair (FIFO) ticket lock: execs of one sandbox run one at a time in the
//! order they arrived. Nobody is rejected; a waiter that gives up before its
//! turn is skipped when the turn comes.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    /// Next ticket number to hand out.
    next: u64,
    /// Ticket whose holder may run now.
    serving: u64,
    /// Tickets dropped before their turn.
    abandoned: BTreeSet<u64>,
}

/// The queue of one sandbox.
#[derive(Debug, Default)]
pub struct FifoQueue {
    state: Mutex<State>,
    turn: Condvar,
}

/// A place in a [`FifoQueue`]. Dropping it hands the turn on (or, before its
/// turn, marks it to be skipped).
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<FifoQueue>,
    number: u64,
}

impl FifoQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is two counters and a set, consistent after every
        // statement, so a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the next place in line.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut st = self.lock();
        let number = st.next;
        st.next += 1;
        Ticket { queue: Arc::clone(self), number }
    }

    /// Tickets handed out and not yet finished (running plus waiting).
    pub fn len(&self) -> u64 {
        let st = self.lock();
        st.next - st.serving - st.abandoned.len() as u64
    }

    /// True when nobody holds or waits for a turn.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Waits up to `timeout` for this ticket's turn; true when it has come.
    pub fn wait_turn(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.queue.lock();
        loop {
            if st.serving == self.number {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .queue
                .turn
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        if st.serving == self.number {
            st.serving += 1;
            loop {
                let s = st.serving;
                if !st.abandoned.remove(&s) {
                    break;
                }
                st.serving += 1;
            }
            drop(st);
            self.queue.turn.notify_all();
        } else {
            st.abandoned.insert(self.number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_skip_abandoned() {
        let q = Arc::new(FifoQueue::default());
        let a = q.ticket();
        let b = q.ticket();
        let c = q.ticket();
        assert_eq!(q.len(), 3);
        assert!(a.wait_turn(Duration::ZERO));
        assert!(!c.wait_turn(Duration::from_millis(10)));
        drop(b); // gives up before its turn
        let waiter = std::thread::spawn(move || c.wait_turn(Duration::from_secs(5)));
        drop(a);
        assert!(waiter.join().unwrap());
        assert!(q.is_empty());
    }
}

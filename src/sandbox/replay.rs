//! The replay ring: the newest exec events of one sandbox, stored as the
//! exact JSON lines that were streamed.

use std::collections::VecDeque;

/// Events kept per sandbox (the contract's number).
pub const REPLAY_EVENTS: usize = 1000;

/// Bounded by event count and by bytes (so a few 10 MB lines cannot pin
/// gigabytes per sandbox). Always a contiguous suffix of the history.
#[derive(Debug)]
pub struct ReplayRing {
    events: VecDeque<Vec<u8>>,
    bytes: usize,
    max_bytes: usize,
}

impl ReplayRing {
    /// An empty ring holding at most `max_bytes` of event text.
    pub fn new(max_bytes: usize) -> Self {
        ReplayRing { events: VecDeque::new(), bytes: 0, max_bytes }
    }

    /// Appends one event line (JSON, no trailing newline).
    pub fn push(&mut self, line: &[u8]) {
        if line.len() > self.max_bytes {
            // It cannot be kept, and keeping older events without it would
            // no longer be the newest ones: start over.
            self.events.clear();
            self.bytes = 0;
            return;
        }
        while self.events.len() >= REPLAY_EVENTS || self.bytes + line.len() > self.max_bytes {
            match self.events.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
        self.bytes += line.len();
        self.events.push_back(line.to_vec());
    }

    /// The ring as an NDJSON body (each line ends in `\n`).
    pub fn to_ndjson(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes + self.events.len());
        for e in &self.events {
            out.extend_from_slice(e);
            out.push(b'\n');
        }
        out
    }

    /// Number of events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when no event is held.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_newest_by_count_and_bytes() {
        let mut r = ReplayRing::new(1 << 20);
        for i in 0..1500 {
            r.push(format!("{i}").as_bytes());
        }
        assert_eq!(r.len(), REPLAY_EVENTS);
        assert!(r.to_ndjson().starts_with(b"500\n501\n"));
        let mut r = ReplayRing::new(10);
        r.push(b"aaaa");
        r.push(b"bbbb");
        r.push(b"cccc");
        assert_eq!(r.to_ndjson(), b"bbbb\ncccc\n");
        r.push(b"this is too long");
        assert!(r.is_empty());
    }
}

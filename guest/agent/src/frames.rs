//! Frame reading that survives a misbehaving peer.
//!
//! `podflare_proto::Decoder` reports a bad header as an error and stops there;
//! the agent must keep serving, so this reader skips what it cannot use: a
//! frame of an unknown kind is dropped whole (its length is still valid), and
//! garbage is skipped up to the next byte that starts a plausible header.

use podflare_proto::{Kind, HEADER_LEN, MAGIC, MAX_PAYLOAD, PROTOCOL_VERSION};

/// One usable frame from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFrame {
    /// Known kind.
    pub kind: Kind,
    /// Stream id.
    pub stream: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// Incremental reader; feed bytes with [`FrameReader::push`], drain with
/// [`FrameReader::next_frame`].
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    /// Frames or bytes dropped so far (diagnostics only).
    pub dropped: u64,
}

impl FrameReader {
    /// Empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 16) && self.start * 2 > self.buf.len() {
            // Keep the buffer bounded by dropping the consumed prefix.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Next usable frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<InFrame> {
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() < HEADER_LEN {
                return None;
            }
            let len = u32::from_le_bytes([avail[8], avail[9], avail[10], avail[11]]) as usize;
            if avail[0] != MAGIC || avail[1] != PROTOCOL_VERSION || len > MAX_PAYLOAD {
                // Not a header: resynchronise on the next magic byte.
                self.dropped += 1;
                let skip = avail[1..]
                    .iter()
                    .position(|&b| b == MAGIC)
                    .map_or(avail.len(), |p| p + 1);
                self.start += skip;
                continue;
            }
            let total = HEADER_LEN + len;
            if avail.len() < total {
                return None;
            }
            let kind_raw = u16::from_le_bytes([avail[2], avail[3]]);
            let stream = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
            let payload = avail[HEADER_LEN..total].to_vec();
            self.start += total;
            match Kind::from_u16(kind_raw) {
                Some(kind) => {
                    return Some(InFrame {
                        kind,
                        stream,
                        payload,
                    })
                }
                // A newer host's message: skip it whole.
                None => self.dropped += 1,
            }
        }
    }
}

/// Writes a frame header for `len` payload bytes into `out[..HEADER_LEN]`.
pub fn put_header(out: &mut [u8], kind: Kind, stream: u32, len: usize) {
    out[0] = MAGIC;
    out[1] = PROTOCOL_VERSION;
    out[2..4].copy_from_slice(&(kind as u16).to_le_bytes());
    out[4..8].copy_from_slice(&stream.to_le_bytes());
    out[8..12].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Decodes hex (either case). `None` on odd length or a non-hex digit.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    s.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use podflare_proto::encode;

    fn drain(r: &mut FrameReader) -> Vec<InFrame> {
        std::iter::from_fn(|| r.next_frame()).collect()
    }

    #[test]
    fn byte_at_a_time() {
        let mut wire = Vec::new();
        encode(&mut wire, Kind::Ping, 0, b"abc");
        encode(
            &mut wire,
            Kind::Exec,
            5,
            br#"{"language":"bash","code":"echo hi"}"#,
        );
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        for b in &wire {
            r.push(std::slice::from_ref(b));
            got.extend(drain(&mut r));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            InFrame {
                kind: Kind::Ping,
                stream: 0,
                payload: b"abc".to_vec()
            }
        );
        assert_eq!(got[1].stream, 5);
    }

    #[test]
    fn skips_unknown_kind_and_garbage() {
        let mut wire = vec![0u8, 1, 2, 0xF1, 7];
        // Unknown kind 999 with a 3-byte payload, skipped whole.
        wire.extend_from_slice(&[
            MAGIC,
            PROTOCOL_VERSION,
            0xE7,
            0x03,
            1,
            0,
            0,
            0,
            3,
            0,
            0,
            0,
            9,
            9,
            9,
        ]);
        // A header claiming an absurd length is garbage too.
        wire.extend_from_slice(&[
            MAGIC,
            PROTOCOL_VERSION,
            6,
            0,
            0,
            0,
            0,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
        ]);
        encode(&mut wire, Kind::Cancel, 4, b"");
        let mut r = FrameReader::new();
        r.push(&wire);
        let got = drain(&mut r);
        assert_eq!(
            got,
            vec![InFrame {
                kind: Kind::Cancel,
                stream: 4,
                payload: vec![]
            }]
        );
        assert!(r.dropped >= 2);
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift: deterministic noise, no dependency.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let mut r = FrameReader::new();
        for _ in 0..2000 {
            let mut chunk = [0u8; 37];
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = if x.is_multiple_of(5) {
                    MAGIC
                } else if x.is_multiple_of(7) {
                    PROTOCOL_VERSION
                } else {
                    x as u8
                };
            }
            r.push(&chunk);
            let _ = drain(&mut r);
        }
        // After the noise, a real frame still gets through once the reader resyncs.
        let mut wire = Vec::new();
        for _ in 0..3 {
            encode(&mut wire, Kind::Ping, 1, b"");
        }
        let mut r2 = FrameReader::new();
        r2.push(&[MAGIC, PROTOCOL_VERSION, 1]);
        r2.push(&wire);
        assert!(drain(&mut r2).iter().any(|f| f.kind == Kind::Ping));
    }

    #[test]
    fn header_matches_proto_encoding() {
        let mut a = Vec::new();
        encode(&mut a, Kind::Stdout, 77, b"xyz");
        let mut b = vec![0u8; HEADER_LEN];
        put_header(&mut b, Kind::Stdout, 77, 3);
        b.extend_from_slice(b"xyz");
        assert_eq!(a, b);
    }

    #[test]
    fn hex() {
        assert_eq!(decode_hex("00fFa5"), Some(vec![0, 255, 0xa5]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(""), Some(vec![]));
    }
}

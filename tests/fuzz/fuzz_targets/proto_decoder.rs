//! Guest bytes into the frame decoder, in pieces: every frame that comes
//! out must re-encode to exactly the bytes it was decoded from, an error
//! must describe the header it stopped at, and nothing complete may be
//! left undecoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podflare_proto::{encode, DecodeError, Decoder, HEADER_LEN, MAGIC, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, wire)) = data.split_first() else { return };
    // Piece sizes from a tiny PRNG seeded by the first byte: 1 to 64 bytes.
    let mut state = u32::from(seed) | 0x100;
    let mut d = Decoder::new();
    let (mut pushed, mut cursor) = (0usize, 0usize);
    while pushed < wire.len() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (1 + (state >> 16) as usize % 64).min(wire.len() - pushed);
        d.push(&wire[pushed..pushed + n]);
        pushed += n;
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    let mut again = Vec::new();
                    encode(&mut again, f.kind, f.stream, &f.payload);
                    assert_eq!(&wire[cursor..cursor + again.len()], &again[..], "frame does not re-encode");
                    cursor += again.len();
                }
                Ok(None) => break,
                Err(e) => {
                    let h = &wire[cursor..];
                    match e {
                        DecodeError::BadMagic(b) => assert!(b == h[0] && b != MAGIC),
                        DecodeError::BadVersion(v) => assert!(v == h[1] && v != PROTOCOL_VERSION),
                        DecodeError::UnknownKind(k) => assert_eq!(k, u16::from_le_bytes([h[2], h[3]])),
                        DecodeError::TooLarge(n) => assert_eq!(n, u32::from_le_bytes([h[8], h[9], h[10], h[11]])),
                    }
                    // hostd fails the channel here.
                    return;
                }
            }
        }
        assert_eq!(d.pending(), pushed - cursor);
        if d.pending() >= HEADER_LEN {
            let h = &wire[cursor..];
            let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
            assert!(d.pending() < HEADER_LEN + len, "a complete frame was left undecoded");
        }
    }
});

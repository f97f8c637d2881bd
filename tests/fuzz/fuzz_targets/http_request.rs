//! Client bytes into one connection's request reader (`Conn::receive` +
//! `Conn::advance`, with the worker's auth and body-size checks on the
//! head), fed twice: in pieces of fuzz-chosen sizes and as fast as the
//! reader takes them. Both must see the same requests, refusals and
//! failures, and every request must respect the body limit.
//!
//! Input: one byte of settings (body limit, auth on/off), one byte seeding
//! the piece sizes, then the bytes a client sends.
#![no_main]

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use podflare_hostd::api::error::ApiError;
use podflare_hostd::api::http::conn::{Conn, Slot, Step};
use podflare_hostd::api::http::request::{parse_head, BodyKind, Head};
use podflare_hostd::api::{router, Gate};
use podflare_hostd::config::AuthMode;

#[derive(Debug, PartialEq)]
enum Seen {
    Request(String, String, Vec<u8>),
    Refused(u16),
    Fatal(u16),
}

/// One connected loopback socket; each run takes a duplicate of it (a
/// `Conn` owns its stream but this target never reads or writes it).
fn socket() -> TcpStream {
    static SOCK: OnceLock<(TcpListener, TcpStream)> = OnceLock::new();
    let (_, s) = SOCK.get_or_init(|| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        (l, s)
    });
    s.try_clone().expect("dup socket")
}

fn early(gate: &Gate, max_body: usize, head: &Head) -> Option<ApiError> {
    if !router::is_public(&head.method, &head.target) {
        if let Err(e) = gate.check(head.header("Authorization")) {
            return Some(e);
        }
    }
    match head.body {
        BodyKind::Length(n) if n > max_body as u64 => Some(ApiError::PayloadTooLarge { limit_mib: max_body >> 20 }),
        _ => None,
    }
}

/// Feeds `wire` in pieces whose sizes come from `seed` (0: as much as the
/// reader takes at once); returns what the worker would have answered.
fn run(wire: &[u8], max_body: usize, gate: &Gate, seed: u8) -> Vec<Seen> {
    let open = Arc::new(AtomicUsize::new(0));
    let mut conn = Conn::new(socket(), Slot::take(&open, 1).expect("slot"));
    let check = |h: &Head| early(gate, max_body, h);
    let (mut pos, mut state, mut seen) = (0usize, u32::from(seed), Vec::new());
    loop {
        match conn.advance(max_body, &check) {
            Step::NeedMore => {
                if pos == wire.len() {
                    return seen;
                }
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let n = if seed == 0 { wire.len() } else { 1 + (state >> 16) as usize % 48 };
                let end = (pos + n).min(wire.len());
                pos += conn.receive(&wire[pos..end]);
            }
            Step::SendContinue => {}
            Step::Request(head, body) => {
                match head.body {
                    BodyKind::Empty => assert!(body.is_empty()),
                    BodyKind::Length(n) => assert_eq!(body.len() as u64, n),
                    BodyKind::Chunked => {}
                }
                assert!(body.len() <= max_body, "body of {} bytes over the limit {max_body}", body.len());
                assert!(early(gate, max_body, &head).is_none(), "a refused head was served");
                seen.push(Seen::Request(head.method.clone(), head.target.clone(), body));
                if head.close {
                    return seen;
                }
                conn.finished_request();
            }
            Step::Refused(head, err) => {
                seen.push(Seen::Refused(err.status()));
                if head.close {
                    return seen;
                }
                conn.finished_request();
            }
            Step::Fatal(_, err) => {
                seen.push(Seen::Fatal(err.status()));
                return seen;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [settings, seed, wire @ ..] = data else { return };
    let max_body = [0, 1, 16, 1000, 1 << 20][usize::from(settings % 5)];
    let gate = if settings & 8 != 0 {
        Gate::new(&AuthMode::Keys(vec!["fuzz-key".into()]))
    } else {
        Gate::new(&AuthMode::Disabled)
    };
    let _ = parse_head(wire);
    let pieces = run(wire, max_body, &gate, seed.max(&1).to_owned());
    let whole = run(wire, max_body, &gate, 0);
    assert_eq!(pieces, whole, "the same bytes read differently in pieces");
});

//! A client that stops reading an exec stream must not hold up the host:
//! DELETE of that sandbox, the reaping of that sandbox at its lifetime, and
//! the reaping of another sandbox all happen on time while the guest keeps
//! writing and the stream's reader is stuck on a full socket.
//!
//! Real VMs (restored from the cached `default` snapshot) behind the real
//! HTTP server in this process. Needs `/dev/kvm`; fails where it exists and
//! anything does not work.

mod common;

use common::http::{create, exists, request};

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};


/// Python that writes 64 KiB lines for as long as it is let.
const FLOOD: &str = "import sys\nline = 'x' * 65535 + '\\n'\nwhile True:\n    sys.stdout.write(line)\n";

/// A connection whose receive window is tiny, so the server's writes back
/// up after a few KiB instead of after megabytes of socket buffers.
fn small_window(addr: SocketAddr) -> TcpStream {
    use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let SocketAddr::V4(v4) = addr else { panic!("test server is on IPv4 loopback") };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).expect("socket");
    setsockopt(&fd, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    connect(fd.as_raw_fd(), &SockaddrIn::from(v4)).expect("connect");
    TcpStream::from(fd)
}

/// Starts the flood on `id` and reads until the first output line arrived,
/// then returns the connection unread from there on.
fn stuck_exec(addr: SocketAddr, id: &str) -> TcpStream {
    let body = serde_json::json!({ "code": FLOOD }).to_string();
    let mut s = small_window(addr);
    write!(
        s,
        "POST /v1/sandboxes/{id}/exec HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    // Head, then chunks until one carries a stdout event.
    loop {
        line.clear();
        assert!(r.read_line(&mut line).expect("stream") > 0, "stream ended early");
        if line.contains("\"stdout\"") {
            return s;
        }
    }
}

#[test]
fn a_client_that_stops_reading_delays_neither_delete_nor_reaping() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let server = common::real_server(|_| {});
    let addr = server.addr();

    // `deleted` is deleted by the test, `lived` reaches its lifetime while
    // its stream is stuck, `idle` must be reaped on time meanwhile.
    let deleted = create(addr, "{}");
    let lived = create(addr, r#"{"timeout_seconds": 20}"#);
    let lived_deadline = Instant::now() + Duration::from_secs(20);
    let idle = create(addr, r#"{"idle_timeout_seconds": 24}"#);
    let idle_deadline = Instant::now() + Duration::from_secs(24);

    let _stuck_a = stuck_exec(addr, &deleted);
    let _stuck_b = stuck_exec(addr, &lived);
    // Let the guests fill the server's socket buffers and their streams.
    std::thread::sleep(Duration::from_secs(6));

    let t = Instant::now();
    let (status, body) = request(addr, "DELETE", &format!("/v1/sandboxes/{deleted}"), "");
    let took = t.elapsed();
    assert_eq!(status, 204, "{body}");
    assert!(took < Duration::from_secs(1), "DELETE took {took:?} behind a stuck stream");
    assert!(!exists(addr, &deleted));

    // The reaper tick is 250 ms; a second of slack beyond each deadline.
    for (id, deadline) in [(&lived, lived_deadline), (&idle, idle_deadline)] {
        let give_up = deadline + Duration::from_secs(1);
        while exists(addr, id) {
            assert!(Instant::now() < give_up, "{id} still there 1 s past its deadline");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(Instant::now() + Duration::from_millis(300) >= deadline, "{id} reaped before its deadline");
    }
    // Closing the stuck clients lets their workers finish, so shutdown joins.
    drop((_stuck_a, _stuck_b));
    server.shutdown();
}

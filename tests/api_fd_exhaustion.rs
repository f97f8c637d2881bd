//! accept() failing with EMFILE must not end the accept loop: the error is
//! logged and, once descriptors are free again, the server serves. This
//! lowers the process's open-file limit, so it lives alone in its own test
//! binary (no other test shares the process).

mod api_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_support::*;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0)
}

fn healthz(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /v1/healthz HTTP/1.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") && out.ends_with("ok")
}

#[test]
fn accept_survives_running_out_of_descriptors() {
    let srv = start();
    assert!(healthz(srv.addr));
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Room for a few more descriptors only: clients and the server's
    // accepted sockets share the process, so accept() soon hits EMFILE.
    setrlimit(Resource::RLIMIT_NOFILE, open_fds() + 24, hard).unwrap();
    let mut clients = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let hit = loop {
        if let Ok(s) = TcpStream::connect(srv.addr) {
            clients.push(s);
        }
        let logged = srv.logs.lock().unwrap().iter().any(|l| l.contains("accept failed"));
        if logged || Instant::now() > end || clients.len() > 200 {
            break logged;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(clients);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    assert!(hit, "accept() ran out of descriptors and said so");
    assert!(eventually(Duration::from_secs(5), || healthz(srv.addr)), "serving again once descriptors are free");
    assert!(healthz(srv.addr));
}

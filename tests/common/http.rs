//! A tiny HTTP/1.1 client for tests that talk to a real hostd: one
//! request per connection, `Connection: close`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One request; returns the status and the body.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

pub fn create(addr: SocketAddr, body: &str) -> String {
    let (status, body) = request(addr, "POST", "/v1/sandboxes", body);
    assert_eq!(status, 200, "create: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["id"].as_str().expect("id").to_string()
}

pub fn exists(addr: SocketAddr, id: &str) -> bool {
    match request(addr, "GET", &format!("/v1/sandboxes/{id}/replay"), "").0 {
        200 => true,
        404 => false,
        other => panic!("replay of {id}: status {other}"),
    }
}


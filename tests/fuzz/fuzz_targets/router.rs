//! Method, path and body into the router, then the error reply it would
//! send: every refusal is a 4xx/5xx with a JSON body.
//!
//! Input: method selector byte, then the target up to the first NUL, then
//! the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podflare_hostd::api::http::response::Response;
use podflare_hostd::api::router;

const METHODS: [&str; 6] = ["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else { return };
    let (target, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let target = String::from_utf8_lossy(target);
    let custom;
    let method = match METHODS.get(usize::from(m & 7)) {
        Some(name) => *name,
        None => {
            // An odd method name: the target's first word.
            custom = target.split(' ').next().unwrap_or("").to_string();
            &custom
        }
    };
    let _ = router::is_public(method, &target);
    if let Err(e) = router::parse(method, &target, body) {
        let status = e.status();
        assert!((400..600).contains(&status), "status {status}");
        let reply = Response::error(&e).encode(method == "HEAD", false);
        let body_start = reply.windows(4).position(|w| w == b"\r\n\r\n").expect("reply head") + 4;
        if method != "HEAD" {
            let v: serde_json::Value = serde_json::from_slice(&reply[body_start..]).expect("JSON error body");
            assert!(v.is_object());
        }
    }
});

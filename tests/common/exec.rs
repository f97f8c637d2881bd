//! Running Python in a guest from the VMM-level tests: the output of an
//! exec, and its exit status checked.

use std::time::Duration;

use podflare_hostd::guest::{ExecChunk, Guest, Language, StreamRx};

/// How long one exec may take: `PODFLARE_TEST_WAIT_S`, else `default_s`.
pub fn wait(default_s: u64) -> Duration {
    Duration::from_secs(std::env::var("PODFLARE_TEST_WAIT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(default_s))
}

/// Stdout and stderr together, and the exit status.
pub fn collect(rx: StreamRx<ExecChunk>, wait: Duration) -> (String, i32) {
    let mut out = String::new();
    loop {
        match rx.recv_timeout(wait).expect("exec produced no result in time") {
            ExecChunk::Stdout(b) | ExecChunk::Stderr(b) => out.push_str(&String::from_utf8_lossy(&b)),
            ExecChunk::Exit(c) => return (out, c),
            ExecChunk::Failed(m) => panic!("exec failed: {m}; output so far {out:?}"),
            // Execs never report a start (terminal sessions do).
            ExecChunk::Started => {}
        }
    }
}

/// Runs Python and returns its output, trimmed; fails on a non-zero exit.
pub fn py(g: &dyn Guest, code: &str, wait: Duration) -> String {
    let (out, status) = collect(g.exec(Language::Python, code).expect("exec starts"), wait);
    assert_eq!(status, 0, "{code:.300} failed: {out}");
    out.trim().to_string()
}

//! Soak: create -> exec `print(1)` -> delete cycles from 8 clients over the
//! real HTTP server with real VMs, in this process, so its file
//! descriptors, threads and resident memory can be watched: fds and threads
//! back where they were, resident memory on a plateau (the slopes are
//! printed), and not one error.
//!
//! `PODFLARE_SOAK_CYCLES` (default 1000; `scripts/soak` runs 10,000) and
//! `PODFLARE_SOAK_CLIENTS` (8). Every loop is bounded in count and time.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::request;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn cycle(addr: std::net::SocketAddr) -> Result<(), String> {
    let (st, body) = request(addr, "POST", "/v1/sandboxes", "{}");
    if st != 200 {
        return Err(format!("create: {st} {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let id = v["id"].as_str().ok_or("no id")?.to_string();
    let (st, out) = request(addr, "POST", &format!("/v1/sandboxes/{id}/exec"), r#"{"code":"print(1)"}"#);
    let ok = st == 200 && out.contains(r#""data":"1""#) && out.contains(r#""type":"exit","data":0"#);
    let (del, _) = request(addr, "DELETE", &format!("/v1/sandboxes/{id}"), "");
    match (ok, del) {
        (true, 204) => Ok(()),
        (false, _) => Err(format!("exec: {st} {out}")),
        (_, d) => Err(format!("delete: {d}")),
    }
}

#[test]
fn create_exec_delete_cycles_leave_fds_threads_and_memory_flat() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let (cycles, clients) = (env("PODFLARE_SOAK_CYCLES", 1000), env("PODFLARE_SOAK_CLIENTS", 8));
    let server = common::real_server(|_| {});
    let addr = server.addr();
    // Warm-up: lazily built process-wide state is not a leak.
    for _ in 0..clients {
        cycle(addr).expect("warm-up cycle");
    }
    std::thread::sleep(Duration::from_millis(500));
    let base = (common::count_dir("/proc/self/fd"), common::count_dir("/proc/self/task"), common::rss_kib());
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(Mutex::new(Vec::new()));
    // Bounded in time too: a generous 10 s per cycle per client.
    let deadline = Instant::now() + Duration::from_secs(10 * (cycles / clients + 1) as u64);
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (done, errors, samples) = (done.clone(), errors.clone(), samples.clone());
            std::thread::spawn(move || loop {
                let n = done.fetch_add(1, Ordering::SeqCst);
                if n >= cycles || Instant::now() > deadline {
                    return;
                }
                if let Err(e) = cycle(addr) {
                    errors.lock().unwrap().push(e);
                }
                if n % 50 == 0 {
                    let s = (n as f64, common::count_dir("/proc/self/fd"), common::count_dir("/proc/self/task"), common::rss_kib());
                    samples.lock().unwrap().push(s);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let end = (common::count_dir("/proc/self/fd"), common::count_dir("/proc/self/task"), common::rss_kib());
    let samples = samples.lock().unwrap().clone();
    let rss: Vec<(f64, f64)> = samples.iter().map(|s| (s.0, s.3 as f64)).collect();
    let fds: Vec<(f64, f64)> = samples.iter().map(|s| (s.0, s.1 as f64)).collect();
    let threads: Vec<(f64, f64)> = samples.iter().map(|s| (s.0, s.2 as f64)).collect();
    let errors = errors.lock().unwrap();
    let finished = done.load(Ordering::SeqCst).min(cycles);
    eprintln!(
        "soak: {finished} cycles, {clients} clients, {} errors; fds {} -> {}, threads {} -> {}, rss {} -> {} KiB; \
         slopes per 1000 cycles while running: fds {:.2}, threads {:.2}, rss {:.0} KiB",
        errors.len(),
        base.0,
        end.0,
        base.1,
        end.1,
        base.2,
        end.2,
        slope(&fds) * 1000.0,
        slope(&threads) * 1000.0,
        slope(&rss) * 1000.0
    );
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());
    assert!(finished >= cycles, "only {finished} of {cycles} cycles within the time bound");
    assert_eq!(end.0, base.0, "file descriptors leaked");
    assert!(end.1 <= base.1, "threads leaked: {} -> {}", base.1, end.1);
    // Freed memory stays in the allocator's per-thread pools, so RSS rises
    // from the cold baseline to a plateau within the first cycles; a leak
    // keeps rising with the count. Judge against the early plateau and by the
    // slope: at most 8 MiB above the highest of the first quarter's samples,
    // and under 4 MiB per 1,000 cycles.
    let early = rss.iter().take((rss.len() / 4).max(1)).map(|p| p.1 as u64).max().unwrap_or(base.2);
    assert!(end.2 <= early + 8 * 1024, "RSS {} KiB at the end, {early} KiB early on", end.2);
    assert!(slope(&rss) * 1000.0 < 4096.0, "RSS grows {:.0} KiB per 1000 cycles", slope(&rss) * 1000.0);
    server.shutdown();
}

//! Soak: create -> exec `print(1)` -> delete cycles from 8 clients over the
//! real HTTP server with real VMs, in this process, so its file
//! descriptors, threads, mappings and memory can be watched between rounds,
//! when no sandbox lives: fds and threads back where they were, the live
//! heap flat (counted by this test's own allocator), mappings and resident
//! memory bounded, and not one error.
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

/// The system allocator, counting the bytes this process holds: the heap
/// figure a leak shows in. (glibc's own figures also count what it keeps
/// cached per thread and per arena, which rises to a plateau as more worker
/// threads have run.)
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's own layout
// and pointer, so System's guarantees carry over; the counter is a side note.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the caller
        // upholds `realloc`'s contract for `new_size`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Lines of /proc/self/maps: a guest mapping left behind shows here even
/// when none of its pages is resident.
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map(|m| m.lines().count()).unwrap_or(0)
}

/// One quiescent sample: cycles done so far, fds, threads, RSS KiB, live
/// heap bytes, mappings.
type Sample = (usize, usize, usize, u64, usize, usize);

fn sample(done: usize) -> Sample {
    (
        done,
        common::count_dir("/proc/self/fd"),
        common::count_dir("/proc/self/task"),
        common::rss_kib(),
        LIVE_BYTES.load(Ordering::Relaxed),
        mappings(),
    )
}

#[test]
fn create_exec_delete_cycles_leave_fds_threads_and_memory_flat() {
    let Some(_kvm) = common::kvm_or_skip() else { return };
    let (cycles, clients) = (env("PODFLARE_SOAK_CYCLES", 1000), env("PODFLARE_SOAK_CLIENTS", 8));
    // Log lines kept in memory would count as heap growth.
    let server = common::real_server_logging(|_| {}, podflare_hostd::obs::Logger::discard);
    let addr = server.addr();
    // Warm-up: lazily built process-wide state is not a leak.
    for _ in 0..clients {
        cycle(addr).expect("warm-up cycle");
    }
    // The cycles run in rounds; between rounds no sandbox lives and no
    // request is in flight, so a sample sees only what stays behind (a
    // sample taken mid-round would count the live guests' pages).
    let rounds = 10.min(cycles.max(1));
    let per_round = cycles.div_ceil(rounds);
    // Bounded in time too, generously: this is a safety bound, not a speed
    // target. 30 s per cycle per client; a CI runner managed 0.69 cycles/s
    // (11.6 s per cycle per client), so the 10 s once used was too tight.
    let deadline = Instant::now() + Duration::from_secs(30 * (cycles / clients + 1) as u64);
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut samples: Vec<Sample> = Vec::new();
    let mut finished = 0;
    std::thread::sleep(Duration::from_millis(500));
    samples.push(sample(0));
    while finished < cycles && Instant::now() < deadline {
        let this_round = per_round.min(cycles - finished);
        let done = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let (done, errors) = (done.clone(), errors.clone());
                std::thread::spawn(move || {
                    while done.fetch_add(1, Ordering::SeqCst) < this_round && Instant::now() < deadline {
                        if let Err(e) = cycle(addr) {
                            errors.lock().unwrap().push(e);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        finished += done.load(Ordering::SeqCst).min(this_round);
        // Deleted guests' threads finish on their own, and hostd hands its
        // free heap back within a second or so of the last delete.
        std::thread::sleep(Duration::from_millis(1500));
        samples.push(sample(finished));
    }
    eprintln!("soak samples (cycles, fds, threads, rss KiB, live heap bytes, mappings): {samples:?}");
    let (base, end) = (samples[0], *samples.last().unwrap());
    // The first round settles pools and caches; judge the rest by slope.
    let per_k = |from: usize, f: fn(&Sample) -> f64| {
        let points: Vec<(f64, f64)> = samples.iter().skip(from).map(|s| (s.0 as f64, f(s))).collect();
        slope(&points) * 1000.0
    };
    let heap_slope = per_k(1, |s| s.4 as f64 / 1024.0);
    // RSS settles slower (worker threads' stacks and allocator caches are
    // touched as more of them serve): also its slope over the second half.
    let (rss_slope, rss_late_slope) = (per_k(1, |s| s.3 as f64), per_k(samples.len() / 2, |s| s.3 as f64));
    let errors = errors.lock().unwrap();
    eprintln!(
        "soak: {finished} cycles, {clients} clients, {} errors; fds {} -> {}, threads {} -> {}, mappings {} -> {}, \
         rss {} -> {} KiB, live heap {} -> {} KiB; slopes per 1000 cycles after the first round: live heap {heap_slope:.1} KiB, \
         rss {rss_slope:.0} KiB (second half {rss_late_slope:.0} KiB)",
        errors.len(),
        base.1,
        end.1,
        base.2,
        end.2,
        base.5,
        end.5,
        base.3,
        end.3,
        base.4 / 1024,
        end.4 / 1024,
    );
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());
    assert!(finished >= cycles, "only {finished} of {cycles} cycles within the time bound");
    assert_eq!(end.1, base.1, "file descriptors leaked");
    assert!(end.2 <= base.2, "threads leaked: {} -> {}", base.2, end.2);
    // A leak of even 100 bytes per cycle shows as ~100 KiB per 1,000 cycles.
    assert!(heap_slope < 64.0, "live heap grows {heap_slope:.1} KiB per 1000 cycles");
    // Cached thread stacks and allocator arenas add a bounded number of
    // mappings; one left per sandbox would add thousands.
    assert!(end.5 <= base.5 + 128, "mappings {} -> {}", base.5, end.5);
    // Resident memory also holds those caches (glibc keeps up to 40 MiB of
    // freed thread stacks), so it is bounded, not held flat; one leaked
    // guest would add its resident pages per cycle.
    assert!(end.3 <= base.3 + 64 * 1024, "RSS {} -> {} KiB", base.3, end.3);
    server.shutdown();
}

//! Metrics for `GET /metrics`, in the OpenMetrics text format (which
//! Prometheus scrapes): counters and latency histograms updated where things
//! happen, and a [`Snapshot`] of live figures taken at each scrape.
//!
//! No label names a sandbox: label values come from small fixed sets
//! (operation, outcome, reason, route template, status code), so the number
//! of series stays bounded however many sandboxes come and go.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why sandboxes are destroyed (the `reason` of `podflare_sandboxes_destroyed`).
pub const DESTROY_REASONS: [&str; 6] = ["delete", "timeout_seconds", "idle_timeout_seconds", "host_memory", "merged", "shutdown"];
/// Which limit refused (the `reason` of `podflare_admission_refusals`).
pub const REFUSAL_REASONS: [&str; 5] = ["sandbox_count", "memory", "streams", "sandbox_streams", "pty_sessions"];

/// A sandbox operation whose outcome is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `POST /v1/sandboxes`.
    Create,
    /// `POST /v1/sandboxes/{id}/fork` (one count per request, not per child).
    Fork,
    /// `POST /v1/spaces/{space}/resume`.
    Resume,
    /// `DELETE /v1/sandboxes/{id}`.
    Delete,
    /// `POST /v1/sandboxes/{parent}/merge_into/{winner}`.
    Merge,
    /// A persistent sandbox frozen into a space (idle timeout, lifetime, shutdown).
    Freeze,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Fork => "fork",
            Op::Resume => "resume",
            Op::Delete => "delete",
            Op::Merge => "merge",
            Op::Freeze => "freeze",
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused for capacity (429).
    Refused,
    /// The request was wrong (an unknown id, a bad field: 4xx).
    Rejected,
    /// Our fault or the guest's (5xx).
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    status: u16,
}

/// Live figures read at scrape time by whoever owns them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Live sandboxes (warm-pool VMs not included).
    pub sandboxes_live: u64,
    /// Sandboxes with an exec queued or running.
    pub sandboxes_busy: u64,
    /// Guest memory the sandboxes wrote (private to each), bytes.
    pub guest_private_memory_bytes: u64,
    /// Exec streams open.
    pub streams_open: u64,
    /// Creates served from the warm pool, since start.
    pub pool_hits: u64,
    /// Creates that found the pool empty (pool on), since start.
    pub pool_misses: u64,
    /// Restored VMs waiting in the warm pool.
    pub pool_ready: u64,
    /// CPU time of every VM thread (vCPUs, devices), since start.
    pub vm_threads_cpu: Duration,
}

/// Writes a [`Snapshot`] as gauges and counters during a scrape.
#[derive(Debug, Default)]
struct Live(Mutex<Snapshot>);

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let gauges: [(&str, &str, u64); 5] = [
            ("podflare_sandboxes_live", "Live sandboxes (warm-pool VMs not included)", s.sandboxes_live),
            ("podflare_sandboxes_busy", "Sandboxes with an exec queued or running", s.sandboxes_busy),
            (
                "podflare_guest_private_memory_bytes",
                "Host memory the guests of live sandboxes hold privately (pages they wrote)",
                s.guest_private_memory_bytes,
            ),
            ("podflare_streams_open", "Exec streams open (running or queued)", s.streams_open),
            ("podflare_pool_ready", "Restored VMs waiting in the warm pool", s.pool_ready),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters: [(&str, &str, u64); 2] = [
            ("podflare_pool_hits", "Creates served from the warm pool", s.pool_hits),
            ("podflare_pool_misses", "Creates that found the warm pool empty (pool enabled)", s.pool_misses),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let cpu = ConstCounter::new(s.vm_threads_cpu.as_secs_f64());
        cpu.encode(encoder.encode_descriptor(
            "podflare_vm_threads_cpu_seconds",
            "Host CPU time used by VM threads (vCPUs and device threads), live and ended",
            None,
            cpu.metric_type(),
        )?)?;
        Ok(())
    }
}

/// hostd's metrics. One per process, shared by the API and the sandbox layer.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    live: Arc<Live>,
    /// Serializes scrapes: each stores its snapshot, then encodes it.
    scrape: Mutex<()>,
    ops: Family<OpLabels, Counter>,
    destroyed: Family<ReasonLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    http: Family<HttpLabels, Counter>,
    create_seconds: Histogram,
    fork_seconds: Histogram,
    exec_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric registered, all at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let ops = Family::<OpLabels, Counter>::default();
        registry.register(
            "podflare_sandbox_operations",
            "Sandbox operations by kind (create, fork, resume, delete, merge) and outcome (ok, refused, rejected, failed)",
            ops.clone(),
        );
        let destroyed = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "podflare_sandboxes_destroyed",
            "Sandboxes destroyed, by reason (delete, timeout_seconds, idle_timeout_seconds, host_memory, merged, shutdown)",
            destroyed.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "podflare_admission_refusals",
            "Requests refused for capacity (429), by the limit that refused them (sandbox_count, memory, streams, sandbox_streams, pty_sessions)",
            refusals.clone(),
        );
        let http = Family::<HttpLabels, Counter>::default();
        registry.register(
            "podflare_http_requests",
            "HTTP requests answered, by route template and status code",
            http.clone(),
        );
        // 0.5 ms .. 16 s: a pool hit is sub-millisecond, a restore a few
        // milliseconds, a slow host seconds.
        let create_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "podflare_create_duration_seconds",
            "Server-side time of successful creates (restore or pool hit, registration)",
            create_seconds.clone(),
        );
        let fork_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "podflare_fork_duration_seconds",
            "Server-side time of successful forks (all children)",
            fork_seconds.clone(),
        );
        // 1 ms .. ~9 min.
        let exec_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register(
            "podflare_exec_duration_seconds",
            "Time from an exec's start in the guest to its exit event (queueing not included)",
            exec_seconds.clone(),
        );
        // Every series of the fixed label sets exists from the start (at
        // zero), so a rate over the first scrapes is right and dashboards
        // see each one before it first moves.
        for op in [Op::Create, Op::Fork, Op::Resume, Op::Delete, Op::Merge, Op::Freeze] {
            for outcome in [Outcome::Ok, Outcome::Refused, Outcome::Rejected, Outcome::Failed] {
                drop(ops.get_or_create(&OpLabels { op: op.as_str(), outcome: outcome.as_str() }));
            }
        }
        for reason in DESTROY_REASONS {
            drop(destroyed.get_or_create(&ReasonLabels { reason }));
        }
        for reason in REFUSAL_REASONS {
            drop(refusals.get_or_create(&ReasonLabels { reason }));
        }
        let live = Arc::new(Live::default());
        registry.register_collector(Box::new(Arc::clone(&live)));
        Metrics {
            registry,
            live,
            scrape: Mutex::new(()),
            ops,
            destroyed,
            refusals,
            http,
            create_seconds,
            fork_seconds,
            exec_seconds,
        }
    }

    /// Counts one operation's outcome.
    pub fn operation(&self, op: Op, outcome: Outcome) {
        self.ops.get_or_create(&OpLabels { op: op.as_str(), outcome: outcome.as_str() }).inc();
    }

    /// Counts sandboxes destroyed for `reason` (a fixed word: see the help).
    pub fn destroyed(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.destroyed.get_or_create(&ReasonLabels { reason }).inc_by(n);
        }
    }

    /// Counts a capacity refusal by the limit that refused.
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one answered HTTP request.
    pub fn http_request(&self, route: &'static str, status: u16) {
        self.http.get_or_create(&HttpLabels { route, status }).inc();
    }

    /// A successful create's server-side time.
    pub fn observe_create(&self, d: Duration) {
        self.create_seconds.observe(d.as_secs_f64());
    }

    /// A successful fork's server-side time.
    pub fn observe_fork(&self, d: Duration) {
        self.fork_seconds.observe(d.as_secs_f64());
    }

    /// An exec's time from its start to its exit.
    pub fn observe_exec(&self, d: Duration) {
        self.exec_seconds.observe(d.as_secs_f64());
    }

    /// The scrape body: every metric, with `live` as the live figures.
    pub fn render(&self, live: Snapshot) -> String {
        let _one = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        *self.live.0.lock().unwrap_or_else(PoisonError::into_inner) = live;
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug
        // in a metric, and the partial text is still the best answer.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_the_snapshot() {
        let m = Metrics::new();
        m.operation(Op::Create, Outcome::Ok);
        m.operation(Op::Create, Outcome::Ok);
        m.operation(Op::Create, Outcome::Refused);
        m.refused("memory");
        m.destroyed("delete", 2);
        m.http_request("/v1/sandboxes", 200);
        m.observe_create(Duration::from_millis(3));
        m.observe_exec(Duration::from_millis(40));
        let text = m.render(Snapshot { sandboxes_live: 7, pool_hits: 3, vm_threads_cpu: Duration::from_millis(1500), ..Default::default() });
        for want in [
            r#"podflare_sandbox_operations_total{op="create",outcome="ok"} 2"#,
            r#"podflare_sandbox_operations_total{op="create",outcome="refused"} 1"#,
            r#"podflare_admission_refusals_total{reason="memory"} 1"#,
            r#"podflare_sandboxes_destroyed_total{reason="delete"} 2"#,
            r#"podflare_http_requests_total{route="/v1/sandboxes",status="200"} 1"#,
            "podflare_create_duration_seconds_count 1",
            r#"podflare_create_duration_seconds_bucket{le="0.004"} 1"#,
            r#"podflare_create_duration_seconds_bucket{le="0.002"} 0"#,
            "podflare_exec_duration_seconds_count 1",
            "podflare_fork_duration_seconds_count 0",
            "podflare_sandboxes_live 7",
            "podflare_pool_hits_total 3",
            "podflare_vm_threads_cpu_seconds_total 1.5",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(text.contains(r#"podflare_sandboxes_destroyed_total{reason="merged"} 0"#), "every series exists from the start");
        assert!(text.contains(r#"podflare_sandbox_operations_total{op="resume",outcome="failed"} 0"#));
        assert!(text.ends_with("# EOF\n"));
    }
}

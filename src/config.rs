//! Server settings read from `PODFLARE_*` environment variables, and the
//! start-up safety rule (never serve an unauthenticated API off-host).
//!
//! VMM settings (kernel, templates, pool, memory caps) are read separately by
//! [`crate::vmm::VmmConfig::from_env`].

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The variable is set but does not parse or is out of range.
    #[error("{name}={value:?}: {why}")]
    Invalid {
        /// Variable name.
        name: &'static str,
        /// Raw value as found in the environment.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// The bind address does not resolve.
    #[error("PODFLARE_HOSTD_ADDR={addr:?} does not resolve: {why}")]
    Addr {
        /// Configured address.
        addr: String,
        /// Resolver message.
        why: String,
    },
    /// The address resolves but cannot be bound (in use, no permission).
    #[error("cannot bind PODFLARE_HOSTD_ADDR={addr}")]
    Bind {
        /// Configured address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The start-up rule refused to serve (see [`Config::auth_mode`]).
    #[error(
        "refusing to start: PODFLARE_HOSTD_ADDR={addr} is not a loopback address and \
         PODFLARE_API_KEYS is not set, so anyone who can reach this port could run code. \
         Set PODFLARE_API_KEYS=<key>[,<key>...], or bind to 127.0.0.1 / [::1] and use an \
         SSH tunnel, or set PODFLARE_AUTH_DISABLED=1 if something else guards this port"
    )]
    UnsafeBind {
        /// Configured address.
        addr: String,
    },
}

/// Output format of log lines (stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `key=value` text, one line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// How requests are authenticated, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Bearer tokens; any one of them authenticates.
    Keys(Vec<String>),
    /// No keys configured but bound to loopback only: dev mode, auth off.
    LoopbackDev,
    /// `PODFLARE_AUTH_DISABLED=1`: auth off wherever we listen.
    Disabled,
}

/// Default and maximum of one numeric create parameter. Requests above the
/// maximum are clamped (a self-hosted host has no tiers to refuse with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Used when the request omits the field.
    pub default: u64,
    /// Larger requests are clamped to this.
    pub max: u64,
}

impl Bound {
    /// The value a request gets: `requested` clamped, or the default.
    pub fn resolve(&self, requested: Option<u64>) -> u64 {
        requested.unwrap_or(self.default).min(self.max)
    }
}

/// Everything the HTTP server and sandbox manager need from the operator.
#[derive(Debug, Clone)]
pub struct Config {
    /// `PODFLARE_HOSTD_ADDR` as given (default `127.0.0.1:7070`).
    pub addr: String,
    /// `PODFLARE_API_KEYS`, split on commas, blanks dropped.
    pub api_keys: Vec<String>,
    /// `PODFLARE_AUTH_DISABLED=1`.
    pub auth_disabled: bool,
    /// `PODFLARE_REGION`: reported on create when `public_url` is set too.
    pub region: Option<String>,
    /// `PODFLARE_PUBLIC_URL`: reported as `endpoint` on create.
    pub public_url: Option<String>,
    /// `PODFLARE_LOG_FORMAT` (`text` default, or `json`).
    pub log_format: LogFormat,
    /// `PODFLARE_MAX_BODY_MIB` (default 64) in bytes. The SDK uploads files
    /// as base64 inside the code string, so 8 MB files need ~11 MB bodies.
    pub max_body_bytes: usize,
    /// `PODFLARE_HTTP_WORKERS` (default 64): threads handling requests.
    pub http_workers: usize,
    /// `PODFLARE_MAX_STREAMS` (default 48): exec streams open at once,
    /// running or queued. Must be below `http_workers` so that short requests
    /// always find a free worker.
    pub max_streams: usize,
    /// `PODFLARE_MAX_STREAMS_PER_SANDBOX` (default 16, at most
    /// `max_streams`): exec streams one sandbox may hold open, so one
    /// sandbox cannot take every slot.
    pub max_streams_per_sandbox: usize,
    /// `PODFLARE_MAX_CONNECTIONS` (default 1024): open client connections at
    /// most; past it new ones are answered 503 and closed.
    pub max_connections: usize,
    /// `PODFLARE_HTTP_HEADER_TIMEOUT_SECS` (default 10): from a connection's
    /// start, or a request's first byte, to its complete head (else 408).
    pub http_header_timeout: Duration,
    /// `PODFLARE_HTTP_BODY_TIMEOUT_SECS` (default 10): longest pause while a
    /// request body arrives (else 408).
    pub http_body_timeout: Duration,
    /// `PODFLARE_HTTP_WRITE_TIMEOUT_SECS` (default 10): longest a reply (for a
    /// stream: one line) waits for the client to read it, plus as much
    /// again per MiB; then the reply is abandoned (a stream is drained
    /// without writing).
    pub http_write_timeout: Duration,
    /// `PODFLARE_HTTP_IDLE_TIMEOUT_SECS` (default 60): a keep-alive
    /// connection idle this long between requests is closed.
    pub http_idle_timeout: Duration,
    /// `PODFLARE_KEEPALIVE_SECS` (default 10): silence before a stream sends
    /// a bare `\n`.
    pub keepalive: Duration,
    /// `PODFLARE_REPLAY_MAX_MIB` (default 32): byte budget of one sandbox's
    /// replay ring, on top of its 1000-event limit.
    pub replay_max_bytes: usize,
    /// `PODFLARE_TIMEOUT_SECS` / `PODFLARE_MAX_TIMEOUT_SECS` (3600 / 86400):
    /// sandbox lifetime.
    pub timeout_seconds: Bound,
    /// `PODFLARE_IDLE_TIMEOUT_SECS` / `PODFLARE_MAX_IDLE_TIMEOUT_SECS`
    /// (600 / 86400): time without an exec.
    pub idle_timeout_seconds: Bound,
    /// `PODFLARE_RAM_MIB` / `PODFLARE_MAX_RAM_MIB` (512 / 16384).
    pub ram_mib: Bound,
    /// `PODFLARE_ROOTFS_GB` / `PODFLARE_MAX_ROOTFS_GB` (1 / 16): the
    /// writable disk. 1 is the template's own size; a larger one is grown
    /// at create, which on a PVM host costs ~0.6-1.1 s per GB (the guest
    /// kernel does it, emulated), so the maximum keeps a create inside the
    /// SDK's 30 s read timeout.
    pub rootfs_gb: Bound,
    /// `PODFLARE_SECCOMP` (default on): every thread kind installs its
    /// seccomp filter ([`crate::seccomp`]); `0` turns them all off.
    pub seccomp: bool,
}

impl Default for Config {
    /// The settings of an empty environment (dev mode on loopback).
    fn default() -> Self {
        Config {
            addr: "127.0.0.1:7070".into(),
            api_keys: Vec::new(),
            auth_disabled: false,
            region: None,
            public_url: None,
            log_format: LogFormat::Text,
            max_body_bytes: 64 << 20,
            http_workers: 64,
            max_streams: 48,
            max_streams_per_sandbox: 16,
            max_connections: 1024,
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(10),
            http_write_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(10),
            replay_max_bytes: 32 << 20,
            timeout_seconds: Bound { default: 3600, max: 86_400 },
            idle_timeout_seconds: Bound { default: 600, max: 86_400 },
            ram_mib: Bound { default: 512, max: 16_384 },
            rootfs_gb: Bound { default: 1, max: 16 },
            seccomp: true,
        }
    }
}

/// Reads one variable through `get`, treating blank as unset.
fn var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// A positive integer setting within `1..=max`.
fn positive(
    get: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(raw) = var(get, name) else { return Ok(default) };
    match raw.parse::<u64>() {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => Err(ConfigError::Invalid {
            name,
            value: raw,
            why: format!("expected an integer from 1 to {max}"),
        }),
    }
}

/// A timeout in whole seconds, 1 to 3600.
fn secs(get: &dyn Fn(&str) -> Option<String>, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(positive(get, name, default.as_secs(), 3600)?))
}

fn flag(get: &dyn Fn(&str) -> Option<String>, name: &'static str) -> Result<bool, ConfigError> {
    flag_or(get, name, false)
}

/// A boolean setting, `default` when unset.
fn flag_or(get: &dyn Fn(&str) -> Option<String>, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    let Some(raw) = var(get, name) else { return Ok(default) };
    match raw.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Invalid { name, value: raw, why: "expected 1 or 0".into() }),
    }
}

fn bound(
    get: &dyn Fn(&str) -> Option<String>,
    default_name: &'static str,
    max_name: &'static str,
    fallback: Bound,
) -> Result<Bound, ConfigError> {
    // Hard ceilings keep arithmetic on deadlines far from overflow.
    const CEILING: u64 = 10 * 365 * 86_400;
    let max = positive(get, max_name, fallback.max, CEILING)?;
    let default = positive(get, default_name, fallback.default.min(max), max).map_err(|e| match e {
        ConfigError::Invalid { name, value, .. } => ConfigError::Invalid {
            name,
            value,
            why: format!("expected an integer from 1 to {max_name} ({max})"),
        },
        other => other,
    })?;
    Ok(Bound { default, max })
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get: &dyn Fn(&str) -> Option<String> = &get;
        let d = Config::default();
        let log_format = match var(get, "PODFLARE_LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "PODFLARE_LOG_FORMAT",
                    value: other.into(),
                    why: "expected text or json".into(),
                })
            }
        };
        let http_workers = positive(get, "PODFLARE_HTTP_WORKERS", d.http_workers as u64, 4096)? as usize;
        let default_streams = (d.max_streams).min(http_workers.saturating_sub(1)).max(1) as u64;
        let max_streams = positive(get, "PODFLARE_MAX_STREAMS", default_streams, 4096)? as usize;
        if max_streams >= http_workers {
            return Err(ConfigError::Invalid {
                name: "PODFLARE_MAX_STREAMS",
                value: max_streams.to_string(),
                why: format!(
                    "must be below PODFLARE_HTTP_WORKERS ({http_workers}): a stream holds a \
                     worker, and short requests need one too"
                ),
            });
        }
        Ok(Config {
            addr: var(get, "PODFLARE_HOSTD_ADDR").unwrap_or(d.addr),
            api_keys: var(get, "PODFLARE_API_KEYS")
                .map(|v| v.split(',').map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect())
                .unwrap_or_default(),
            auth_disabled: flag(get, "PODFLARE_AUTH_DISABLED")?,
            region: var(get, "PODFLARE_REGION"),
            public_url: var(get, "PODFLARE_PUBLIC_URL"),
            log_format,
            max_body_bytes: (positive(get, "PODFLARE_MAX_BODY_MIB", 64, 4096)? as usize) << 20,
            http_workers,
            max_streams,
            max_streams_per_sandbox: (positive(
                get,
                "PODFLARE_MAX_STREAMS_PER_SANDBOX",
                d.max_streams_per_sandbox as u64,
                4096,
            )? as usize)
                .min(max_streams),
            max_connections: positive(get, "PODFLARE_MAX_CONNECTIONS", d.max_connections as u64, 1 << 20)? as usize,
            http_header_timeout: secs(get, "PODFLARE_HTTP_HEADER_TIMEOUT_SECS", d.http_header_timeout)?,
            http_body_timeout: secs(get, "PODFLARE_HTTP_BODY_TIMEOUT_SECS", d.http_body_timeout)?,
            http_write_timeout: secs(get, "PODFLARE_HTTP_WRITE_TIMEOUT_SECS", d.http_write_timeout)?,
            http_idle_timeout: secs(get, "PODFLARE_HTTP_IDLE_TIMEOUT_SECS", d.http_idle_timeout)?,
            keepalive: Duration::from_secs(positive(get, "PODFLARE_KEEPALIVE_SECS", 10, 3600)?),
            replay_max_bytes: (positive(get, "PODFLARE_REPLAY_MAX_MIB", 32, 4096)? as usize) << 20,
            timeout_seconds: bound(get, "PODFLARE_TIMEOUT_SECS", "PODFLARE_MAX_TIMEOUT_SECS", d.timeout_seconds)?,
            idle_timeout_seconds: bound(
                get,
                "PODFLARE_IDLE_TIMEOUT_SECS",
                "PODFLARE_MAX_IDLE_TIMEOUT_SECS",
                d.idle_timeout_seconds,
            )?,
            ram_mib: bound(get, "PODFLARE_RAM_MIB", "PODFLARE_MAX_RAM_MIB", d.ram_mib)?,
            rootfs_gb: bound(get, "PODFLARE_ROOTFS_GB", "PODFLARE_MAX_ROOTFS_GB", d.rootfs_gb)?,
            seccomp: flag_or(get, "PODFLARE_SECCOMP", d.seccomp)?,
        })
    }

    /// The addresses `addr` resolves to (what the server will bind).
    pub fn bind_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        let addrs: Vec<SocketAddr> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| ConfigError::Addr { addr: self.addr.clone(), why: e.to_string() })?
            .collect();
        if addrs.is_empty() {
            return Err(ConfigError::Addr { addr: self.addr.clone(), why: "no addresses".into() });
        }
        Ok(addrs)
    }

    /// The start-up rule, applied before binding and before any VM work:
    /// keys set -> keys; disabled -> off (the caller warns loudly); no keys on
    /// loopback -> off silently; no keys elsewhere -> refuse.
    pub fn auth_mode(&self) -> Result<AuthMode, ConfigError> {
        if self.auth_disabled {
            return Ok(AuthMode::Disabled);
        }
        if !self.api_keys.is_empty() {
            return Ok(AuthMode::Keys(self.api_keys.clone()));
        }
        if self.bind_addrs()?.iter().all(is_loopback) {
            Ok(AuthMode::LoopbackDev)
        } else {
            Err(ConfigError::UnsafeBind { addr: self.addr.clone() })
        }
    }

    /// Binds the listening socket (after [`Config::auth_mode`] said yes).
    pub fn bind(&self) -> Result<std::net::TcpListener, ConfigError> {
        std::net::TcpListener::bind(&self.bind_addrs()?[..])
            .map_err(|source| ConfigError::Bind { addr: self.addr.clone(), source })
    }

    /// `region` and `endpoint` for create responses, when both are configured.
    pub fn placement(&self) -> Option<(String, String)> {
        Some((self.region.clone()?, self.public_url.clone()?))
    }
}

/// True for 127.0.0.0/8 and `::1` (and IPv4-mapped loopback); `0.0.0.0` and
/// `::` listen everywhere, so they are not loopback.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => {
            a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests;

//! The settings parser and the start-up rule.
use super::*;
use std::collections::HashMap;

fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::from_lookup(move |k| map.get(k).cloned())
}

#[test]
fn loopback_rule() {
    for addr in ["127.0.0.1:7070", "[::1]:7070", "127.1.2.3:1", "localhost:7070"] {
        let c = cfg(&[("PODFLARE_HOSTD_ADDR", addr)]).unwrap();
        assert_eq!(c.auth_mode().unwrap(), AuthMode::LoopbackDev, "{addr}");
    }
    for addr in ["0.0.0.0:7070", "[::]:7070"] {
        let c = cfg(&[("PODFLARE_HOSTD_ADDR", addr)]).unwrap();
        let err = c.auth_mode().unwrap_err();
        assert!(err.to_string().contains("refusing to start"), "{addr}: {err}");
        let c = cfg(&[("PODFLARE_HOSTD_ADDR", addr), ("PODFLARE_AUTH_DISABLED", "1")]).unwrap();
        assert_eq!(c.auth_mode().unwrap(), AuthMode::Disabled);
        let c = cfg(&[("PODFLARE_HOSTD_ADDR", addr), ("PODFLARE_API_KEYS", " a, ,b ")]).unwrap();
        assert_eq!(c.auth_mode().unwrap(), AuthMode::Keys(vec!["a".into(), "b".into()]));
    }
}

#[test]
fn defaults_and_bounds() {
    let c = cfg(&[]).unwrap();
    assert_eq!(c.addr, "127.0.0.1:7070");
    assert_eq!(c.max_body_bytes, 64 << 20);
    assert_eq!((c.max_connections, c.http_header_timeout, c.http_idle_timeout), (1024, Duration::from_secs(10), Duration::from_secs(60)));
    assert!(c.max_streams < c.http_workers);
    assert_eq!(c.timeout_seconds.resolve(Some(10 << 20)), 86_400);
    assert_eq!(c.timeout_seconds.resolve(None), 3600);
    let c = cfg(&[("PODFLARE_MAX_RAM_MIB", "1024"), ("PODFLARE_HTTP_WORKERS", "8")]).unwrap();
    assert_eq!(c.ram_mib, Bound { default: 512, max: 1024 });
    assert_eq!(c.max_streams, 7);
    assert!(placement_none(&c));
}

fn placement_none(c: &Config) -> bool {
    c.placement().is_none()
}

#[test]
fn bad_values_name_the_variable() {
    for (k, v) in [
        ("PODFLARE_MAX_BODY_MIB", "0"),
        ("PODFLARE_MAX_BODY_MIB", "x"),
        ("PODFLARE_LOG_FORMAT", "xml"),
        ("PODFLARE_AUTH_DISABLED", "maybe"),
        ("PODFLARE_MAX_STREAMS", "64"),
        ("PODFLARE_TIMEOUT_SECS", "-1"),
        ("PODFLARE_MAX_CONNECTIONS", "0"),
        ("PODFLARE_HTTP_HEADER_TIMEOUT_SECS", "0"),
        ("PODFLARE_HTTP_WRITE_TIMEOUT_SECS", "soon"),
        ("PODFLARE_SECCOMP", "sometimes"),
    ] {
        let err = cfg(&[(k, v)]).unwrap_err().to_string();
        assert!(err.contains(k), "{err}");
    }
    let err = cfg(&[("PODFLARE_MAX_TIMEOUT_SECS", "10"), ("PODFLARE_TIMEOUT_SECS", "20")]).unwrap_err();
    assert!(err.to_string().contains("PODFLARE_TIMEOUT_SECS"));
}

#[test]
fn placement_needs_both() {
    let c = cfg(&[("PODFLARE_REGION", "eu")]).unwrap();
    assert!(c.placement().is_none());
    let c = cfg(&[("PODFLARE_REGION", "eu"), ("PODFLARE_PUBLIC_URL", "https://h")]).unwrap();
    assert_eq!(c.placement(), Some(("eu".into(), "https://h".into())));
}

#[test]
fn seccomp_is_on_unless_turned_off() {
    assert!(cfg(&[]).unwrap().seccomp);
    assert!(cfg(&[("PODFLARE_SECCOMP", "1")]).unwrap().seccomp);
    assert!(!cfg(&[("PODFLARE_SECCOMP", "0")]).unwrap().seccomp);
}

//! podflare-hostd: settings -> start-up safety check -> seccomp probe -> VMM ->
//! bind -> serve.

use std::process::ExitCode;
use std::sync::Arc;

use podflare_hostd::api::{self, Gate};
use podflare_hostd::obs::Logger;
use podflare_hostd::config::{AuthMode, Config};
use podflare_hostd::sandbox::Controller;
use podflare_hostd::seccomp;
use podflare_hostd::vmm::{self, VmmConfig};
use serde_json::json;

/// Exit status when the configuration is refused (including the loopback
/// rule); other failures exit with 1.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("podflare-hostd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log = Logger::new(cfg.log_format);
    // The safety rule comes before the socket and before any VM work.
    let auth = match cfg.auth_mode() {
        Ok(a) => a,
        Err(e) => {
            log.error(&e.to_string(), &[]);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if auth == AuthMode::Disabled {
        log.warn(
            "AUTH IS DISABLED (PODFLARE_AUTH_DISABLED=1): anyone who can reach this port can run code",
            &[("addr", json!(cfg.addr))],
        );
    }
    // Before any thread starts: each installs its kind's filter at its start.
    seccomp::set_enabled(cfg.seccomp);
    if !cfg.seccomp {
        log.warn(
            "SECCOMP IS OFF (PODFLARE_SECCOMP=0): no thread has a syscall filter, a hostile guest or client that takes over a thread can use every syscall",
            &[],
        );
    } else if let Err(e) = seccomp::probe_all() {
        // Refuse to serve rather than run threads unfiltered.
        log.error(&format!("{} (PODFLARE_SECCOMP=0 turns filters off)", error_chain(&e)), &[]);
        return ExitCode::FAILURE;
    } else {
        log.info("seccomp filters on", &[("kinds", json!(seccomp::ThreadKind::ALL.len()))]);
    }
    // Every connection is an fd; the usual soft limit of 1024 (and every VM holds
    // several) would make accept() fail long before PODFLARE_MAX_CONNECTIONS.
    match api::raise_nofile_limit() {
        Ok((before, after)) => log.info("open-file limit", &[("soft_before", json!(before)), ("soft", json!(after))]),
        Err(e) => log.warn("cannot raise the open-file limit", &[("cause", json!(e.to_string()))]),
    }
    let vmm_cfg = match VmmConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            log.error(&format!("VMM settings: {e}"), &[]);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // A trial bind catches a taken port or bad address now rather than after
    // the VMM has built its templates (minutes). The real bind follows the
    // VMM, so connection attempts are refused (not left hanging in the
    // backlog) until the host can actually serve.
    if let Err(e) = cfg.bind() {
        log.error(&error_chain(&e), &[]);
        return ExitCode::FAILURE;
    }
    let factory = match vmm::start_factory(vmm_cfg) {
        Ok(f) => f,
        Err(e) => {
            log.error(&format!("cannot start the VMM: {}", error_chain(&e)), &[]);
            return ExitCode::FAILURE;
        }
    };
    let listener = match cfg.bind() {
        Ok(l) => l,
        Err(e) => {
            log.error(&error_chain(&e), &[]);
            return ExitCode::FAILURE;
        }
    };
    let controller = Arc::new(Controller::new(factory, &cfg, log.clone()));
    let server = match api::serve(listener, &cfg, Gate::new(&auth), controller, log.clone()) {
        Ok(s) => s,
        Err(e) => {
            log.error(&error_chain(&e), &[]);
            return ExitCode::FAILURE;
        }
    };
    let mode = match auth {
        AuthMode::Keys(k) => format!("{} api key(s)", k.len()),
        AuthMode::LoopbackDev => "off (loopback dev mode)".into(),
        AuthMode::Disabled => "DISABLED".into(),
    };
    log.info("serving", &[("addr", json!(server.addr().to_string())), ("auth", json!(mode))]);
    match server.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log.error(&e.to_string(), &[]);
            ExitCode::FAILURE
        }
    }
}

/// An error with its sources, `outer: inner: ...`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

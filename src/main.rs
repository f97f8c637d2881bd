//! podflare-hostd: settings -> start-up safety check -> seccomp probe -> VMM ->
//! bind -> serve -> tell the service manager it is ready.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use podflare_hostd::api::{self, Gate};
use podflare_hostd::obs::{notify, Logger};
use podflare_hostd::config::{AuthMode, Config};
use podflare_hostd::sandbox::Controller;
use podflare_hostd::seccomp;
use podflare_hostd::vmm::{self, VmmConfig};
use serde_json::json;

/// Exit status when the configuration is refused (including the loopback
/// rule); other failures exit with 1.
const EXIT_CONFIG: u8 = 2;

/// Longest a SIGTERM shutdown may take before the process exits anyway (the
/// VMs live in this process, so nothing outlives it).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(15);

fn main() -> ExitCode {
    // SIGTERM and SIGINT are taken by one thread with sigwait: blocked here,
    // before any thread starts, so every thread inherits the block.
    let stop_signals = SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT]);
    if let Err(e) = stop_signals.thread_block() {
        eprintln!("podflare-hostd: cannot block SIGTERM/SIGINT for orderly shutdown: {e}");
        return ExitCode::FAILURE;
    }
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
    let server = match api::serve(listener, &cfg, Gate::new(&auth), Arc::clone(&controller), log.clone()) {
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
    // Sent from the main thread, which has no seccomp filter: socket(2) is
    // on no thread kind's allow-list.
    tell_manager(&log, &notify::ready_message(&server.addr().to_string()));
    let (stopper, log2) = (server.stopper(), log.clone());
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || on_stop_signal(stop_signals, &controller, &stopper, &log2));
    if let Err(e) = spawned {
        log.error("cannot start the signal thread", &[("cause", json!(e.to_string()))]);
        return ExitCode::FAILURE;
    }
    let served = server.join();
    // The last hostd on the machine takes its host-wide network rules away.
    vmm::hostnet::release_host_rules();
    match served {
        Ok(()) => {
            log.info("stopped", &[]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            log.error(&e.to_string(), &[]);
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGTERM or SIGINT, then: freeze persistent sandboxes into
/// spaces, destroy every other sandbox (open exec
/// streams end with a stderr line saying why and exit 137), stop the server
/// (no new connections; workers finish the streams' last lines), and let
/// `main` return 0. If that takes longer than [`SHUTDOWN_BOUND`], exit now.
fn on_stop_signal(signals: SigSet, controller: &Controller, stopper: &api::Stopper, log: &Logger) {
    let sig = match signals.wait() {
        Ok(s) => s,
        Err(e) => {
            log.error("waiting for SIGTERM failed; shutdown by signal is off", &[("cause", json!(e.to_string()))]);
            return;
        }
    };
    log.info("shutting down", &[("signal", json!(sig.as_str()))]);
    // This thread was started by main, so it too runs unfiltered.
    tell_manager(log, notify::STOPPING);
    let bound_log = log.clone();
    let _ = std::thread::Builder::new().name("shutdown-bound".into()).spawn(move || {
        std::thread::sleep(SHUTDOWN_BOUND);
        bound_log.warn("shutdown took too long; exiting now", &[("bound_s", json!(SHUTDOWN_BOUND.as_secs()))]);
        vmm::hostnet::release_host_rules();
        std::process::exit(0);
    });
    let (destroyed, frozen) = controller.manager().destroy_all(&format!("hostd is shutting down ({})", sig.as_str()));
    log.info("sandboxes destroyed", &[("count", json!(destroyed)), ("frozen_into_spaces", json!(frozen))]);
    stopper.stop();
}

/// Sends `state` to the service manager when one started hostd as a notify
/// service; a failure is logged, never fatal (hostd serves either way).
fn tell_manager(log: &Logger, state: &str) {
    if let Err(e) = notify::notify(state) {
        // The message names the socket and carries the kernel's cause.
        log.warn("cannot notify the service manager", &[("cause", json!(e.to_string()))]);
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

//! The controller without HTTP: actions in, replies out.

mod api_support;

use std::sync::Arc;

use api_support::{test_config, FakeFactory};
use podflare_hostd::obs::Logger;
use podflare_hostd::sandbox::CreateParams;
use podflare_hostd::guest::Language;
use podflare_hostd::sandbox::{Action, Controller, Reply, SandboxError, StreamItem};

fn controller() -> Controller {
    let cfg = test_config();
    Controller::new(FakeFactory::new(10), &cfg, Logger::memory(cfg.log_format).0)
}

fn create(c: &Controller) -> String {
    match c.execute(Action::Create(CreateParams { egress: true, ..Default::default() })) {
        Ok(Reply::Json(v)) => v["id"].as_str().unwrap().to_string(),
        other => panic!("{other:?}"),
    }
}

fn run(c: &Controller, id: &str, code: &str) -> Vec<String> {
    let Ok(Reply::Stream(mut s)) = c.execute(Action::Exec { id: id.into(), language: Language::Bash, code: code.into() }) else {
        panic!("exec did not stream");
    };
    let mut lines = Vec::new();
    while let Some(item) = s.next_item() {
        if let StreamItem::Event(l) = item {
            lines.push(String::from_utf8(l).unwrap());
        }
    }
    lines
}

#[test]
fn create_exec_replay_delete() {
    let c = controller();
    let id = create(&c);
    let lines = run(&c, &id, "hello\nEXIT 5");
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with(r#"{"type":"stdout","data":"hello","seq":0,"ts":"#));
    assert!(lines[1].starts_with(r#"{"type":"exit","data":5,"seq":1,"ts":"#));
    let Ok(Reply::Ndjson(replay)) = c.execute(Action::Replay { id: id.clone() }) else { panic!() };
    assert_eq!(String::from_utf8(replay).unwrap(), format!("{}\n{}\n", lines[0], lines[1]));
    assert!(matches!(c.execute(Action::Delete { id: id.clone() }), Ok(Reply::NoContent)));
    assert!(matches!(c.execute(Action::Delete { id: id.clone() }), Err(SandboxError::UnknownSandbox(_))));
    assert!(matches!(c.execute(Action::Replay { id }), Err(SandboxError::UnknownSandbox(_))));
}

#[test]
fn routes_check_the_sandbox_first() {
    let c = controller();
    let id = create(&c);
    assert!(matches!(c.execute(Action::Fork { id: "sbx_nope".into(), n: 1 }), Err(SandboxError::UnknownSandbox(_))));
    assert!(matches!(c.execute(Action::Fork { id: id.clone(), n: 1 }), Err(SandboxError::NotImplemented("fork"))));
    assert!(matches!(
        c.execute(Action::MergeInto { parent: id.clone(), winner: "sbx_nope".into() }),
        Err(SandboxError::UnknownSandbox(_))
    ));
    assert!(matches!(c.execute(Action::DeleteSpace { space: "spc_1".into() }), Err(SandboxError::UnknownSpace(_))));
    assert!(matches!(c.execute(Action::PtyList { id: "sbx_nope".into() }), Err(SandboxError::UnknownSandbox(_))));
    // Terminal sessions exist now: a sandbox without any lists none.
    let Ok(Reply::Json(list)) = c.execute(Action::PtyList { id }) else { panic!("pty list") };
    assert_eq!(list, serde_json::json!([]));
}

#[test]
fn dropping_a_queued_stream_lets_the_next_one_run() {
    let c = Arc::new(controller());
    let id = create(&c);
    let first = c.execute(Action::Exec { id: id.clone(), language: Language::Bash, code: "SLEEP 200\na".into() });
    let second = c.execute(Action::Exec { id: id.clone(), language: Language::Bash, code: "b".into() });
    drop(second); // abandoned before its turn
    let Ok(Reply::Stream(mut s)) = first else { panic!() };
    while s.next_item().is_some() {}
    drop(s);
    let lines = run(&c, &id, "c");
    assert!(lines[0].contains(r#""data":"c""#));
    assert_eq!(c.manager().capacity()["streams"]["active"], 0);
}

#[test]
fn exec_code_over_the_frame_limit_is_refused_before_it_streams() {
    let c = controller();
    let id = create(&c);
    let limit = podflare_hostd::guest::MAX_FRAME_PAYLOAD;
    // Exactly the largest code that fits, then one byte more.
    let envelope = podflare_hostd::guest::exec_request_len(Language::Python, "");
    let fits = "x".repeat(limit - envelope);
    assert!(matches!(
        c.execute(Action::Exec { id: id.clone(), language: Language::Python, code: fits.clone() }),
        Ok(Reply::Stream(_))
    ));
    let over = fits + "x";
    match c.execute(Action::Exec { id: id.clone(), language: Language::Python, code: over }) {
        Err(e @ SandboxError::CodeTooLarge { .. }) => assert!(e.to_string().contains("limit"), "{e}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(r) => panic!("accepted: {r:?}"),
    }
    // Control characters count as their escapes.
    let escaped = "\u{1}".repeat(limit / 6 + 1);
    assert!(matches!(
        c.execute(Action::Exec { id, language: Language::Bash, code: escaped }),
        Err(SandboxError::CodeTooLarge { .. })
    ));
}

#[test]
fn a_guest_that_blocks_an_exec_start_delays_neither_delete_nor_reaping() {
    let c = Arc::new(controller());
    let stuck = create(&c);
    let other = match c.execute(Action::Create(CreateParams { egress: true, idle_timeout_seconds: Some(1), ..Default::default() })) {
        Ok(Reply::Json(v)) => v["id"].as_str().unwrap().to_string(),
        other => panic!("{other:?}"),
    };
    let (c2, id) = (Arc::clone(&c), stuck.clone());
    let exec = std::thread::spawn(move || run(&c2, &id, "BLOCKSTART"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The reaper destroys the idle one while the start is blocked.
    let t = std::time::Instant::now();
    while c.execute(Action::Replay { id: other.clone() }).is_ok() {
        assert!(t.elapsed() < std::time::Duration::from_secs(3), "idle sandbox not reaped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let t = std::time::Instant::now();
    assert!(matches!(c.execute(Action::Delete { id: stuck }), Ok(Reply::NoContent)));
    assert!(t.elapsed() < std::time::Duration::from_secs(1), "DELETE waited {:?}", t.elapsed());
    let lines = exec.join().unwrap();
    assert!(lines.last().unwrap().contains(r#""type":"exit","data":137"#), "{lines:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "the blocked start ended with the delete");
}

#[test]
fn one_sandbox_cannot_take_every_stream_slot() {
    let mut cfg = test_config();
    cfg.max_streams_per_sandbox = 2;
    let c = Controller::new(FakeFactory::new(10), &cfg, Logger::memory(cfg.log_format).0);
    let (greedy, other) = (create(&c), create(&c));
    let exec = |id: &str| c.execute(Action::Exec { id: id.into(), language: Language::Bash, code: "HANG".into() });
    let held: Vec<_> = (0..2).map(|_| exec(&greedy).expect("within its share")).collect();
    match exec(&greedy) {
        Err(e @ SandboxError::TooManySandboxStreams { max: 2 }) => {
            assert!(e.to_string().contains("PODFLARE_MAX_STREAMS_PER_SANDBOX"), "{e}")
        }
        other => panic!("a third stream on one sandbox: {other:?}"),
    }
    assert!(exec(&other).is_ok(), "another sandbox still gets a stream");
    drop(held);
    assert!(exec(&greedy).is_ok(), "slots come back when streams end");
}

#[test]
fn when_host_memory_runs_short_the_biggest_sandbox_goes() {
    let cfg = test_config();
    let factory = FakeFactory::new(10);
    let (log, lines) = Logger::memory(cfg.log_format);
    let c = Controller::new(factory.clone(), &cfg, log);
    let (small, big, medium) = (create(&c), create(&c), create(&c));
    for (id, mib) in [(&small, 10), (&big, 300), (&medium, 100)] {
        run(&c, id, &format!("MEM {mib}"));
    }
    // The host can hold 250 MiB of these: the 300 MiB one must go, and only
    // it (the reaper thread looks every 250 ms; the test may get there first).
    let alive = |id: &String| c.execute(Action::Replay { id: id.clone() }).is_ok();
    let gone_soon = |id: &String| {
        let t = std::time::Instant::now();
        while alive(id) {
            c.manager().relieve_memory();
            if t.elapsed() > std::time::Duration::from_secs(3) {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    };
    factory.mem_cap_mib.store(250, std::sync::atomic::Ordering::SeqCst);
    assert!(gone_soon(&big));
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(alive(&small) && alive(&medium), "only the biggest went");
    {
        let lines = lines.lock().unwrap();
        let line = lines.iter().find(|l| l.contains("host_memory")).expect("logged");
        assert!(line.contains(big.as_str()), "{line}");
    }
    // Tighter still: the next biggest goes, then it is enough.
    factory.mem_cap_mib.store(50, std::sync::atomic::Ordering::SeqCst);
    assert!(gone_soon(&medium));
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(alive(&small));
    assert_eq!(c.manager().relieve_memory(), 0, "no pressure, nothing destroyed");
}

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
fn not_yet_routes_check_the_sandbox_first() {
    let c = controller();
    let id = create(&c);
    assert!(matches!(c.execute(Action::Fork { id: "sbx_nope".into(), n: 1 }), Err(SandboxError::UnknownSandbox(_))));
    assert!(matches!(c.execute(Action::Fork { id: id.clone(), n: 1 }), Err(SandboxError::NotImplemented("fork"))));
    assert!(matches!(
        c.execute(Action::MergeInto { parent: id.clone(), winner: "sbx_nope".into() }),
        Err(SandboxError::UnknownSandbox(_))
    ));
    assert!(matches!(c.execute(Action::DeleteSpace { space: "spc_1".into() }), Err(SandboxError::UnknownSpace(_))));
    assert!(matches!(c.execute(Action::PtyList { id }), Err(SandboxError::NotImplemented("pty"))));
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

//! The API document `src/api/openapi.json` against the router, without a
//! server: every route the router knows is in the document with exactly its
//! methods (and nothing else is), and every request body rule the document
//! states (required fields, types, enums, integer ranges, defaults) is the
//! one `router::parse` applies. `tests/sdk/test_openapi.py` checks the same
//! document against a running hostd.

use podflare_hostd::api::router::{parse, route_template};
use podflare_hostd::guest::Language;
use podflare_hostd::sandbox::{Action, PtyCommand};
use serde_json::{json, Map, Value};

/// Every (method, route template) the router serves. Keep in step with
/// `parse` and `known` in src/api/router.rs: the test below checks this list
/// against the router (templates, methods, 405s) and against the document.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/healthz"),
    ("GET", "/v1/capacity"),
    ("GET", "/metrics"),
    ("GET", "/v1/sandboxes"),
    ("POST", "/v1/sandboxes"),
    ("GET", "/v1/sandboxes/{id}"),
    ("DELETE", "/v1/sandboxes/{id}"),
    ("POST", "/v1/sandboxes/{id}/exec"),
    ("POST", "/v1/sandboxes/{id}/fork"),
    ("POST", "/v1/sandboxes/{id}/merge_into/{winner}"),
    ("GET", "/v1/sandboxes/{id}/replay"),
    ("POST", "/v1/spaces/{space}/resume"),
    ("DELETE", "/v1/spaces/{space}"),
    ("GET", "/v1/sandboxes/{id}/pty"),
    ("POST", "/v1/sandboxes/{id}/pty"),
    ("POST", "/v1/sandboxes/{id}/pty/{pty}/input"),
    ("POST", "/v1/sandboxes/{id}/pty/{pty}/resize"),
    ("POST", "/v1/sandboxes/{id}/pty/{pty}/kill"),
    ("GET", "/v1/sandboxes/{id}/pty/{pty}/attach"),
    ("POST", "/v1/sandboxes/{id}/pty/{pty}/read"),
];

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn doc() -> Value {
    serde_json::from_str(include_str!("../src/api/openapi.json")).expect("src/api/openapi.json is JSON")
}

/// A concrete path for a template: distinct ids for distinct parameters.
fn sample(template: &str) -> String {
    template.replace("{id}", "sbx_aa").replace("{winner}", "sbx_bb").replace("{space}", "spc_1").replace("{pty}", "pty_1")
}

/// The document's operations: (method, path) -> operation object.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (key, op) in item.as_object().expect("path item") {
            if key == "parameters" {
                continue;
            }
            out.push((key.to_uppercase(), path.clone(), op.clone()));
        }
    }
    out
}

/// The JSON schema of an operation's request body, if it has one.
fn body_schema(op: &Value) -> Option<&Map<String, Value>> {
    op.get("requestBody").map(|b| b["content"]["application/json"]["schema"].as_object().expect("body schema"))
}

fn status(method: &str, path: &str, body: &Value) -> u16 {
    let text = if body.is_null() { String::new() } else { body.to_string() };
    match parse(method, path, text.as_bytes()) {
        Ok(_) => 200,
        Err(e) => e.status(),
    }
}

#[test]
fn every_route_is_documented_with_its_methods() {
    let doc = doc();
    let mut documented: Vec<(String, String)> = operations(&doc).into_iter().map(|(m, p, _)| (m, p)).collect();
    let mut listed: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    documented.sort();
    listed.sort();
    assert_eq!(documented, listed, "src/api/openapi.json and the router's routes differ");

    for (method, template) in ROUTES {
        let path = sample(template);
        for p in [path.clone(), format!("{path}/"), format!("{path}?x=1")] {
            assert_eq!(route_template(&p), *template, "route_template({p:?})");
        }
        // Routed (the body may still be refused, which is a 400).
        let got = status(method, &path, &Value::Null);
        assert!(got == 200 || got == 400, "{method} {path}: {got}");
        let allowed: Vec<&str> = ROUTES.iter().filter(|(_, t)| t == template).map(|(m, _)| *m).collect();
        for other in METHODS.iter().filter(|m| !allowed.contains(m)) {
            assert_eq!(status(other, &path, &Value::Null), 405, "{other} {path}");
        }
    }
    assert_eq!(route_template("/v1/nope"), "unmatched");
}

#[test]
fn healthz_alone_skips_auth() {
    let doc = doc();
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    for (method, path, op) in operations(&doc) {
        let public = podflare_hostd::api::router::is_public(&method, &path);
        assert_eq!(op.get("security") == Some(&json!([])), public, "{method} {path}");
    }
}

/// A valid value for a property schema.
fn valid(prop: &Value) -> Value {
    if let Some(e) = prop.get("enum") {
        return e.as_array().unwrap().iter().find(|v| !v.is_null()).unwrap().clone();
    }
    match prop["type"].as_str() {
        Some("integer") => prop.get("minimum").cloned().unwrap_or(json!(1)),
        Some("boolean") => json!(true),
        Some("array") => json!(["x"]),
        Some("string") if prop.get("format") == Some(&json!("byte")) => json!("aGk="),
        Some("string") => json!("x"),
        _ => json!({}),
    }
}

/// A value of the wrong JSON type for a property schema.
fn wrong_type(prop: &Value) -> Option<Value> {
    match prop["type"].as_str()? {
        "integer" => Some(json!("1")),
        "boolean" => Some(json!("true")),
        "array" | "string" => Some(json!({})),
        _ => None,
    }
}

#[test]
fn body_rules_are_the_routers() {
    let doc = doc();
    let mut checked = 0;
    for (method, template, op) in operations(&doc) {
        let Some(schema) = body_schema(&op) else { continue };
        let path = sample(&template);
        let props = schema["properties"].as_object().expect("properties");
        let required: Vec<&str> =
            schema.get("required").map_or(Vec::new(), |r| r.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect());
        let base: Map<String, Value> = required.iter().map(|k| (k.to_string(), valid(&props[*k]))).collect();
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b.insert(k.to_string(), v);
            Value::Object(b)
        };
        let ctx = format!("{method} {template}");
        assert_eq!(status(&method, &path, &Value::Object(base.clone())), 200, "{ctx}: the minimal valid body");
        let body_required = op["requestBody"]["required"].as_bool().unwrap_or(false);
        assert_eq!(body_required, !required.is_empty(), "{ctx}: requestBody.required");
        if !required.is_empty() {
            assert_eq!(status(&method, &path, &Value::Null), 400, "{ctx}: an empty body");
        }
        assert_eq!(status(&method, &path, &json!([1])), 400, "{ctx}: a body that is not an object");
        assert_eq!(status(&method, &path, &with("an_unknown_field", json!(1))), 200, "{ctx}: unknown fields are ignored");
        for (k, prop) in props {
            let ctx = format!("{ctx} `{k}`");
            // null: absent for optional fields, a 400 for required ones.
            let nullable = prop.get("nullable") == Some(&json!(true));
            assert_eq!(nullable, !required.contains(&k.as_str()), "{ctx}: nullable exactly when optional");
            let null_status = if required.contains(&k.as_str()) { 400 } else { 200 };
            assert_eq!(status(&method, &path, &with(k, Value::Null)), null_status, "{ctx}: null");
            assert_eq!(status(&method, &path, &with(k, valid(prop))), 200, "{ctx}: {}", valid(prop));
            if let Some(w) = wrong_type(prop) {
                assert_eq!(status(&method, &path, &with(k, w.clone())), 400, "{ctx}: {w}");
            }
            if let Some(e) = prop.get("enum") {
                for v in e.as_array().unwrap() {
                    assert_eq!(status(&method, &path, &with(k, v.clone())), 200, "{ctx}: {v}");
                }
                assert_eq!(status(&method, &path, &with(k, json!("zz-not-listed"))), 400, "{ctx}: a value not listed");
            }
            if prop["type"] == "integer" {
                let min = prop["minimum"].as_u64().expect("integers have a minimum");
                let max = prop["maximum"].as_u64().expect("integers have a maximum");
                assert_eq!(status(&method, &path, &with(k, json!(min))), 200, "{ctx}: minimum {min}");
                assert_eq!(status(&method, &path, &with(k, json!(max))), 200, "{ctx}: maximum {max}");
                if min > 0 {
                    assert_eq!(status(&method, &path, &with(k, json!(min - 1))), 400, "{ctx}: below {min}");
                }
                let above = max.checked_add(1).map_or(json!(max as f64 * 2.0), |a| json!(a));
                assert_eq!(status(&method, &path, &with(k, above.clone())), 400, "{ctx}: {above}");
                assert_eq!(status(&method, &path, &with(k, json!(-1))), 400, "{ctx}: -1");
                assert_eq!(status(&method, &path, &with(k, json!(1.5))), 400, "{ctx}: 1.5");
            }
            if let Some(n) = prop.get("minItems").and_then(Value::as_u64) {
                assert_eq!(n, 1);
                assert_eq!(status(&method, &path, &with(k, json!([]))), 400, "{ctx}: []");
                assert_eq!(status(&method, &path, &with(k, json!(["a", 1]))), 400, "{ctx}: not all strings");
            }
            if prop.get("format") == Some(&json!("byte")) {
                let pattern = prop["pattern"].as_str().expect("byte strings have a pattern");
                assert!(pattern.starts_with('^') && pattern.ends_with('$'));
                for bad in ["aGk", "a!==", "aR=="] {
                    assert_eq!(status(&method, &path, &with(k, json!(bad))), 400, "{ctx}: {bad:?}");
                }
            }
            checked += 1;
        }
        // A `not` names fields that must not all be given (non-null).
        if let Some(not) = schema.get("not") {
            let mut b = base.clone();
            for k in not["required"].as_array().expect("not.required") {
                let k = k.as_str().unwrap();
                b.insert(k.to_string(), valid(&props[k]));
            }
            assert_eq!(status(&method, &path, &Value::Object(b)), 400, "{ctx}: {not}");
        }
    }
    assert!(checked >= 20, "only {checked} body fields checked");
}

/// The `default` of a body field in the document.
fn default(doc: &Value, method: &str, path: &str, field: &str) -> Value {
    let op = &doc["paths"][path][method.to_lowercase()];
    body_schema(op).expect("body")["properties"][field]["default"].clone()
}

#[test]
fn defaults_are_the_routers() {
    let doc = doc();
    let d = |m: &str, p: &str, f: &str| default(&doc, m, p, f);

    let Ok(Action::Create(c)) = parse("POST", "/v1/sandboxes", b"") else { panic!("create") };
    assert_eq!((json!(c.persistent), json!(c.egress)), (d("POST", "/v1/sandboxes", "persistent"), d("POST", "/v1/sandboxes", "egress")));
    assert_eq!(c.template, None);
    assert_eq!(d("POST", "/v1/sandboxes", "template"), "default");

    let Ok(Action::Exec { language, .. }) = parse("POST", "/v1/sandboxes/a/exec", br#"{"code":""}"#) else { panic!("exec") };
    assert_eq!(language, Language::Python);
    assert_eq!(d("POST", "/v1/sandboxes/{id}/exec", "language"), "python");

    let Ok(Action::Fork { n, .. }) = parse("POST", "/v1/sandboxes/a/fork", b"") else { panic!("fork") };
    assert_eq!(json!(n), d("POST", "/v1/sandboxes/{id}/fork", "n"));

    let Ok(Action::ResumeSpace { params, .. }) = parse("POST", "/v1/spaces/s/resume", b"") else { panic!("resume") };
    let p = "/v1/spaces/{space}/resume";
    assert_eq!((json!(params.persistent), json!(params.egress)), (d("POST", p, "persistent"), d("POST", p, "egress")));

    let Ok(Action::PtyCreate { spec, .. }) = parse("POST", "/v1/sandboxes/a/pty", b"") else { panic!("pty") };
    let p = "/v1/sandboxes/{id}/pty";
    assert_eq!((json!(spec.cols), json!(spec.rows)), (d("POST", p, "cols"), d("POST", p, "rows")));
    assert_eq!(spec.command, PtyCommand::LoginShell);

    let Ok(Action::PtyRead { params, .. }) = parse("POST", "/v1/sandboxes/a/pty/p/read", b"") else { panic!("read") };
    let p = "/v1/sandboxes/{id}/pty/{pty}/read";
    assert_eq!(json!(params.since_seq), d("POST", p, "since_seq"));
    assert_eq!(json!(params.max_bytes), d("POST", p, "max_bytes"));
    assert_eq!(json!(params.timeout_ms), d("POST", p, "timeout_ms"));
}

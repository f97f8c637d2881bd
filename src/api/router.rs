//! The router: one `match` on method and path segments, turning a request
//! into an [`Action`] (body fields validated) or an [`ApiError`].
//!
//! It runs after the auth gate, and it never looks at sandbox state, so what
//! it answers does not depend on which ids exist.

use base64::Engine;

use super::error::ApiError;
use super::params::Body;
use crate::sandbox::{
    Action, CreateParams, PtyCommand, PtyReadParams, PtySpec, ResumeParams,
};
use crate::guest::Language;

/// Most children one fork may ask for.
pub const MAX_FORK: u64 = 32;
/// Server-side cap on a PTY long-poll.
pub const MAX_PTY_READ_MS: u64 = 30_000;

/// True for the routes that skip the auth gate.
pub fn is_public(method: &str, path: &str) -> bool {
    method == "GET" && strip(path) == "/v1/healthz"
}

/// The path without query string and without one trailing slash.
fn strip(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or("");
    match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    }
}

/// Parses one request.
pub fn parse(method: &str, url: &str, body: &[u8]) -> Result<Action, ApiError> {
    let path = strip(url);
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let s = |x: &str| x.to_string();
    let wrong = |path: &'static str, allow: &'static str| -> Result<Action, ApiError> {
        Err(ApiError::MethodNotAllowed { method: method.to_string(), path, allow })
    };
    match (method, segs.as_slice()) {
        ("GET", ["v1", "healthz"]) => Ok(Action::Healthz),
        ("GET", ["v1", "capacity"]) => Ok(Action::Capacity),
        ("GET", ["metrics"]) => Ok(Action::Metrics),
        ("GET", ["v1", "sandboxes"]) => Ok(Action::ListSandboxes),
        ("POST", ["v1", "sandboxes"]) => create(&Body::parse(body)?).map(Action::Create),
        ("GET", ["v1", "sandboxes", id]) => Ok(Action::GetSandbox { id: s(id) }),
        ("DELETE", ["v1", "sandboxes", id]) => Ok(Action::Delete { id: s(id) }),
        ("POST", ["v1", "sandboxes", id, "exec"]) => exec(id, &Body::parse(body)?),
        ("POST", ["v1", "sandboxes", id, "fork"]) => {
            let n = Body::parse(body)?.int_in("n", 1, MAX_FORK)?.unwrap_or(1) as u32;
            Ok(Action::Fork { id: s(id), n })
        }
        ("POST", ["v1", "sandboxes", parent, "merge_into", winner]) => {
            if parent == winner {
                return Err(ApiError::field("winner", "cannot merge a sandbox into itself"));
            }
            Ok(Action::MergeInto { parent: s(parent), winner: s(winner) })
        }
        ("GET", ["v1", "sandboxes", id, "replay"]) => Ok(Action::Replay { id: s(id) }),
        ("POST", ["v1", "spaces", space, "resume"]) => {
            let b = Body::parse(body)?;
            let params = ResumeParams {
                timeout_seconds: b.positive("timeout_seconds")?,
                idle_timeout_seconds: b.positive("idle_timeout_seconds")?,
                persistent: b.boolean("persistent")?.unwrap_or(false),
                egress: b.boolean("egress")?.unwrap_or(true),
            };
            Ok(Action::ResumeSpace { space: s(space), params })
        }
        ("DELETE", ["v1", "spaces", space]) => Ok(Action::DeleteSpace { space: s(space) }),
        ("POST", ["v1", "sandboxes", id, "pty"]) => pty_create(id, &Body::parse(body)?),
        ("GET", ["v1", "sandboxes", id, "pty"]) => Ok(Action::PtyList { id: s(id) }),
        ("POST", ["v1", "sandboxes", id, "pty", pty, "input"]) => {
            let b = Body::parse(body)?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(b.required_string("data_b64")?)
                .map_err(|e| ApiError::field("data_b64", format!("is not valid base64: {e}")))?;
            Ok(Action::PtyInput { id: s(id), pty: s(pty), data })
        }
        ("POST", ["v1", "sandboxes", id, "pty", pty, "resize"]) => {
            let b = Body::parse(body)?;
            let cols = b.int_in("cols", 1, u16::MAX.into())?.ok_or_else(|| ApiError::field("cols", "is required"))?;
            let rows = b.int_in("rows", 1, u16::MAX.into())?.ok_or_else(|| ApiError::field("rows", "is required"))?;
            Ok(Action::PtyResize { id: s(id), pty: s(pty), cols: cols as u16, rows: rows as u16 })
        }
        ("POST", ["v1", "sandboxes", id, "pty", pty, "kill"]) => Ok(Action::PtyKill { id: s(id), pty: s(pty) }),
        ("GET", ["v1", "sandboxes", id, "pty", pty, "attach"]) => Ok(Action::PtyAttach { id: s(id), pty: s(pty) }),
        ("POST", ["v1", "sandboxes", id, "pty", pty, "read"]) => {
            let b = Body::parse(body)?;
            let params = PtyReadParams {
                since_seq: b.int_in("since_seq", 0, u64::MAX)?.unwrap_or(0),
                max_bytes: b.int_in("max_bytes", 1, 64 << 20)?.unwrap_or(65_536),
                timeout_ms: b.int_in("timeout_ms", 0, u64::MAX)?.unwrap_or(10_000).min(MAX_PTY_READ_MS),
            };
            Ok(Action::PtyRead { id: s(id), pty: s(pty), params })
        }
        // Known paths, wrong method.
        (_, segs) => match known(segs) {
            Some((template, allow)) => wrong(template, allow),
            None => Err(ApiError::NotFound(format!("no such route: {method} {path}"))),
        },
    }
}

/// The route template of a known path and the methods it allows.
fn known(segs: &[&str]) -> Option<(&'static str, &'static str)> {
    Some(match segs {
        ["v1", "healthz"] => ("/v1/healthz", "GET"),
        ["v1", "capacity"] => ("/v1/capacity", "GET"),
        ["metrics"] => ("/metrics", "GET"),
        ["v1", "sandboxes"] => ("/v1/sandboxes", "GET, POST"),
        ["v1", "sandboxes", _] => ("/v1/sandboxes/{id}", "DELETE, GET"),
        ["v1", "sandboxes", _, "exec"] => ("/v1/sandboxes/{id}/exec", "POST"),
        ["v1", "sandboxes", _, "fork"] => ("/v1/sandboxes/{id}/fork", "POST"),
        ["v1", "sandboxes", _, "merge_into", _] => ("/v1/sandboxes/{id}/merge_into/{winner}", "POST"),
        ["v1", "sandboxes", _, "replay"] => ("/v1/sandboxes/{id}/replay", "GET"),
        ["v1", "spaces", _, "resume"] => ("/v1/spaces/{space}/resume", "POST"),
        ["v1", "spaces", _] => ("/v1/spaces/{space}", "DELETE"),
        ["v1", "sandboxes", _, "pty"] => ("/v1/sandboxes/{id}/pty", "GET, POST"),
        ["v1", "sandboxes", _, "pty", _, "input"] => ("/v1/sandboxes/{id}/pty/{pty}/input", "POST"),
        ["v1", "sandboxes", _, "pty", _, "resize"] => ("/v1/sandboxes/{id}/pty/{pty}/resize", "POST"),
        ["v1", "sandboxes", _, "pty", _, "kill"] => ("/v1/sandboxes/{id}/pty/{pty}/kill", "POST"),
        ["v1", "sandboxes", _, "pty", _, "attach"] => ("/v1/sandboxes/{id}/pty/{pty}/attach", "GET"),
        ["v1", "sandboxes", _, "pty", _, "read"] => ("/v1/sandboxes/{id}/pty/{pty}/read", "POST"),
        _ => return None,
    })
}

/// The route template of `url` (`/v1/sandboxes/{id}/exec`), or
/// `"unmatched"`: a metrics label that never carries an id.
pub fn route_template(url: &str) -> &'static str {
    let path = strip(url);
    let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    known(&segs).map_or("unmatched", |(template, _)| template)
}

fn create(b: &Body) -> Result<CreateParams, ApiError> {
    let template = b.string("template")?.map(str::to_string);
    // The contract's template names; whether this host serves one is the
    // controller's question.
    if let Some(t) = &template {
        if t != "default" && t != "python-datasci" {
            return Err(ApiError::field("template", format!("unknown template {t:?}; use \"default\" or \"python-datasci\"")));
        }
    }
    Ok(CreateParams {
        template,
        timeout_seconds: b.positive("timeout_seconds")?,
        idle_timeout_seconds: b.positive("idle_timeout_seconds")?,
        ram_mib: b.positive("ram_mib")?,
        rootfs_gb: b.positive("rootfs_gb")?,
        persistent: b.boolean("persistent")?.unwrap_or(false),
        egress: b.boolean("egress")?.unwrap_or(true),
    })
}

fn exec(id: &str, b: &Body) -> Result<Action, ApiError> {
    let code = b.required_string("code")?.to_string();
    let language = match b.string("language")? {
        None | Some("python") => Language::Python,
        Some("bash") => Language::Bash,
        Some(other) => {
            return Err(ApiError::field("language", format!("unknown language {other:?}; use \"python\" or \"bash\"")))
        }
    };
    Ok(Action::Exec { id: id.to_string(), language, code })
}

fn pty_create(id: &str, b: &Body) -> Result<Action, ApiError> {
    let command = match (b.string("shellCmd")?, b.strings("argv")?) {
        (Some(_), Some(_)) => return Err(ApiError::field("argv", "give shellCmd or argv, not both")),
        (Some(cmd), None) => PtyCommand::Shell(cmd.to_string()),
        (None, Some(argv)) if argv.is_empty() => return Err(ApiError::field("argv", "must not be empty")),
        (None, Some(argv)) => PtyCommand::Argv(argv),
        (None, None) => PtyCommand::LoginShell,
    };
    let spec = PtySpec {
        command,
        cols: b.int_in("cols", 1, u16::MAX.into())?.unwrap_or(80) as u16,
        rows: b.int_in("rows", 1, u16::MAX.into())?.unwrap_or(24) as u16,
        cwd: b.string("cwd")?.map(str::to_string),
        env: b.env("env")?,
    };
    Ok(Action::PtyCreate { id: id.to_string(), spec })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse("GET", "/v1/healthz?x=1", b"").unwrap(), Action::Healthz);
        assert_eq!(parse("GET", "/v1/capacity/", b"").unwrap(), Action::Capacity);
        assert_eq!(parse("POST", "/v1/sandboxes", b"{}").unwrap(), Action::Create(CreateParams { egress: true, ..Default::default() }));
        assert_eq!(parse("DELETE", "/v1/sandboxes/sbx_1", b"").unwrap(), Action::Delete { id: "sbx_1".into() });
        assert_eq!(
            parse("POST", "/v1/sandboxes/a/exec", br#"{"code":"x","language":"bash","extra":1}"#).unwrap(),
            Action::Exec { id: "a".into(), language: Language::Bash, code: "x".into() }
        );
        assert_eq!(parse("POST", "/v1/sandboxes/a/fork", b"").unwrap(), Action::Fork { id: "a".into(), n: 1 });
        assert_eq!(parse("POST", "/v1/sandboxes/a/fork", br#"{"n":33}"#).unwrap_err().status(), 400);
        assert_eq!(parse("POST", "/v1/sandboxes/a/merge_into/a", b"").unwrap_err().status(), 400);
        assert_eq!(parse("PUT", "/v1/sandboxes/a/exec", b"").unwrap_err().status(), 405);
        assert_eq!(parse("GET", "/v1/nope", b"").unwrap_err().status(), 404);
        assert_eq!(parse("GET", "/metrics", b"").unwrap(), Action::Metrics);
        assert_eq!(parse("GET", "/v1/sandboxes", b"").unwrap(), Action::ListSandboxes);
        assert_eq!(parse("GET", "/v1/sandboxes/a", b"").unwrap(), Action::GetSandbox { id: "a".into() });
        assert_eq!(parse("POST", "/metrics", b"").unwrap_err().status(), 405);
        assert!(!is_public("GET", "/metrics"), "metrics are behind the gate");
        assert_eq!(route_template("/v1/sandboxes/sbx_1/exec?x"), "/v1/sandboxes/{id}/exec");
        assert_eq!(route_template("/v1/sandboxes/sbx_1/"), "/v1/sandboxes/{id}");
        assert_eq!(route_template("/v1/sandboxes/sbx_1/nope"), "unmatched");
        assert!(is_public("GET", "/v1/healthz/"));
        assert!(!is_public("POST", "/v1/healthz"));
        let Action::PtyRead { params, .. } = parse("POST", "/v1/sandboxes/a/pty/p/read", br#"{"timeout_ms":99999}"#).unwrap() else {
            panic!()
        };
        assert_eq!(params.timeout_ms, MAX_PTY_READ_MS);
    }
}

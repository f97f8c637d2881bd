//! Executes parsed [`Action`]s. Integration tests drive this directly, without
//! HTTP; the HTTP layer only parses requests and frames replies.

use std::sync::Arc;

use serde_json::json;

use super::action::{Action, Reply};
use super::manager::Manager;
use crate::guest::GuestFactory;
use super::SandboxError;
use crate::obs::Logger;
use crate::config::Config;

/// The one object the transport talks to.
pub struct Controller {
    manager: Arc<Manager>,
}

impl Controller {
    /// A controller over a new [`Manager`] (starts its reaper thread).
    pub fn new(factory: Arc<dyn GuestFactory>, cfg: &Config, log: Logger) -> Controller {
        Controller { manager: Manager::new(factory, cfg, log) }
    }

    /// The sandbox manager (registry, limits), e.g. for tests.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Runs one action.
    pub fn execute(&self, action: Action) -> Result<Reply, SandboxError> {
        let m = &self.manager;
        match action {
            Action::Healthz => Ok(Reply::Text("ok")),
            Action::Capacity => Ok(Reply::Json(m.capacity())),
            Action::Metrics => Ok(Reply::Metrics(m.metrics().render(m.metrics_snapshot()))),
            Action::ListSandboxes => Ok(Reply::Json(m.list())),
            Action::GetSandbox { id } => m.info(&id).map(Reply::Json),
            Action::Create(params) => Ok(Reply::Json(created(m, m.create(&params)?.id()))),
            Action::Delete { id } => m.destroy(&id).map(|()| Reply::NoContent),
            Action::Exec { id, language, code } => m.exec(&id, language, code).map(Reply::Stream),
            Action::Replay { id } => m.replay(&id).map(Reply::Ndjson),
            Action::Fork { id, n } => {
                let children = m.fork(&id, n)?;
                Ok(Reply::Json(json!({ "children": children.iter().map(|c| c.id()).collect::<Vec<_>>() })))
            }
            Action::MergeInto { parent, winner } => m.merge(&parent, &winner).map(|()| Reply::NoContent),
            // Answered like a create: a new sandbox.
            Action::ResumeSpace { space, params } => Ok(Reply::Json(created(m, m.resume_space(&space, &params)?.id()))),
            Action::DeleteSpace { space } => m.delete_space(&space).map(|()| Reply::NoContent),
            Action::PtyCreate { id, spec } => m.pty_create(&id, &spec).map(Reply::Pty),
            Action::PtyList { id } => m.pty_list(&id).map(Reply::Json),
            Action::PtyInput { id, pty, data } => m.pty_input(&id, &pty, &data).map(|()| Reply::NoContent),
            Action::PtyResize { id, pty, cols, rows } => m.pty_resize(&id, &pty, cols, rows).map(|()| Reply::NoContent),
            Action::PtyKill { id, pty } => m.pty_kill(&id, &pty).map(|()| Reply::NoContent),
            Action::PtyAttach { id, pty } => m.pty_attach(&id, &pty).map(Reply::Pty),
            Action::PtyRead { id, pty, params } => m.pty_read(&id, &pty, &params).map(Reply::Json),
        }
    }
}

/// The answer to a create (and a resume): the new id, and where to reach it
/// when this host is one of several (`region`, `endpoint`).
fn created(m: &Manager, id: &str) -> serde_json::Value {
    let mut body = json!({ "id": id, "state": "ready" });
    if let Some((region, endpoint)) = m.config().placement() {
        body["region"] = json!(region);
        body["endpoint"] = json!(endpoint);
    }
    body
}

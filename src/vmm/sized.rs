//! Templates in RAM sizes other than `PODFLARE_GUEST_RAM_MIB`: a sandbox
//! that asks for more RAM (`ram_mib`) is restored from a snapshot of its
//! template booted with that much ([`template::ram_class`]). Each size is
//! built on first use, by one builder thread (with its own seccomp filter:
//! it writes the snapshot into the cache), one build at a time; the create
//! that asked waits for it, and later ones find it built (also after a
//! restart: it is cached on disk like every template snapshot).

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvm_ioctls::Kvm;
use serde_json::json;

use super::template::{self, Template};
use super::{Backend, VmmConfig, VmmError};
use crate::seccomp::{self, ThreadKind};

type Built = Arc<Mutex<HashMap<(String, u64), Arc<Template>>>>;

struct Request {
    name: String,
    mib: u64,
    reply: Sender<Result<Arc<Template>, String>>,
}

/// The templates of other RAM sizes built so far, and the way to ask for one.
pub struct SizedTemplates {
    built: Built,
    requests: Mutex<Sender<Request>>,
}

impl SizedTemplates {
    /// Starts the builder thread (from an unfiltered thread: it installs
    /// its own filter first).
    /// Sizes already in the cache are loaded here, so a restart serves
    /// them at once.
    pub fn start(cfg: &VmmConfig, backend: Backend) -> Result<SizedTemplates, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let mut cached = HashMap::new();
        for name in &cfg.templates {
            for mib in template::RAM_CLASSES_MIB.into_iter().filter(|m| *m != cfg.guest_ram_mib) {
                if let Some(t) = template::cached_template_sized(&kvm, cfg, backend, name, mib)? {
                    cached.insert((name.clone(), mib), Arc::new(t));
                }
            }
        }
        let built: Built = Arc::new(Mutex::new(cached));
        let (tx, rx) = channel();
        let (cfg, shared) = (cfg.clone(), Arc::clone(&built));
        std::thread::Builder::new()
            .name("template-builder".into())
            .spawn(move || builder(&kvm, &cfg, backend, &shared, &rx))
            .map_err(VmmError::Io)?;
        Ok(SizedTemplates { built, requests: Mutex::new(tx) })
    }

    /// `name` in `mib` MiB: built already, or built now. The call waits at
    /// most `wait` for a build (on this host one takes minutes, see the
    /// README); past that it answers `Ok(None)` and the build goes on, so a
    /// later call finds it.
    pub fn get(&self, name: &str, mib: u64, wait: Duration) -> Result<Option<Arc<Template>>, VmmError> {
        if let Some(t) = self.built.lock().unwrap_or_else(PoisonError::into_inner).get(&(name.to_string(), mib)) {
            return Ok(Some(Arc::clone(t)));
        }
        let (reply, answer) = channel();
        let gone = || VmmError::Guest("the template builder thread has stopped (see the log)".into());
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Request { name: name.to_string(), mib, reply })
            .map_err(|_| gone())?;
        match answer.recv_timeout(wait) {
            Ok(built) => built.map(Some).map_err(VmmError::Guest),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }

    /// The (template, MiB) built so far.
    pub fn built(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.built.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect();
        v.sort();
        v
    }
}

fn builder(kvm: &Kvm, cfg: &VmmConfig, backend: Backend, built: &Built, rx: &Receiver<Request>) {
    // Never build unfiltered. The binary probes every filter at start-up,
    // so this fails only if the kernel changed its mind since.
    let filtered = seccomp::install(ThreadKind::TemplateBuilder).map_err(|e| e.to_string());
    if let Err(e) = &filtered {
        cfg.log.error("template builder stopped: sandboxes get the default RAM size only", &[("cause", json!(e))]);
    }
    for req in rx {
        if let Err(e) = &filtered {
            let _ = req.reply.send(Err(format!("the template builder cannot run: {e}")));
            continue;
        }
        let key = (req.name.clone(), req.mib);
        if let Some(t) = built.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            let _ = req.reply.send(Ok(Arc::clone(t)));
            continue;
        }
        cfg.log.info(
            "template: a new RAM size was asked for; loading or building its snapshot (the create waits)",
            &[("template", json!(req.name)), ("ram_mib", json!(req.mib))],
        );
        let answer = match template::prepare_template_sized(kvm, cfg, backend, &req.name, req.mib) {
            Ok(t) => {
                let t = Arc::new(t);
                built.lock().unwrap_or_else(PoisonError::into_inner).insert(key, Arc::clone(&t));
                Ok(t)
            }
            Err(e) => {
                cfg.log.error(
                    "template: building a RAM size failed",
                    &[("template", json!(req.name)), ("ram_mib", json!(req.mib)), ("cause", json!(e.to_string()))],
                );
                Err(format!("template {} with {} MiB: {e}", req.name, req.mib))
            }
        };
        let _ = req.reply.send(answer);
    }
}

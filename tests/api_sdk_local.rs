//! Runs the SDK tests (tests/sdk, the official `podflare` package) against
//! the real HTTP server backed by LOCAL PROCESSES instead of VMs: bash execs
//! are `bash -c` on this machine and Python execs share one persistent
//! `python3` per sandbox. This checks the SDK <-> HTTP contract without
//! `/dev/kvm`; it is not isolation (all "sandboxes" share this filesystem).
//!
//! Needs a Python with `podflare==0.0.22` and pytest: set
//! `PODFLARE_SDK_PYTHON=/path/to/venv/bin/python`. Without it the test says
//! it skipped and passes; `scripts/test` runs tests/sdk against real VMs.

mod api_support;

use std::io::{BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use podflare_hostd::guest::stream::{bounded, StreamRx, StreamTx};
use podflare_hostd::guest::EXEC_STREAM_LIMIT;
use std::sync::{Arc, Mutex};

use podflare_hostd::api::{serve, Gate};
use podflare_hostd::obs::Logger;
use podflare_hostd::config::AuthMode;
use podflare_hostd::guest::{ExecChunk, Guest, GuestError, GuestFactory, GuestSpec, Language};
use podflare_hostd::sandbox::Controller;

/// The Python side: runs each framed code string in one shared globals
/// dict, frames stdout/stderr/exit back. `O`/`E` + u32 len + bytes; `X` +
/// u32 4 + i32 exit code.
const DRIVER: &str = r#"
import io, os, struct, sys, traceback
inp = sys.stdin.buffer
out = os.fdopen(os.dup(1), 'wb', buffering=0)
def send(kind, payload):
    out.write(kind + struct.pack('<I', len(payload)) + payload)
class W(io.TextIOBase):
    def __init__(self, kind): self.kind = kind
    def writable(self): return True
    def write(self, s):
        b = s.encode('utf-8', 'surrogateescape')
        if b: send(self.kind, b)
        return len(s)
sys.stdout, sys.stderr = W(b'O'), W(b'E')
g = {'__name__': '__main__'}
while True:
    hdr = inp.read(4)
    if len(hdr) < 4: break
    code = inp.read(struct.unpack('<I', hdr)[0]).decode()
    rc = 0
    try:
        exec(compile(code, '<exec>', 'exec'), g)
    except SystemExit as e:
        if e.code is None: rc = 0
        elif isinstance(e.code, int): rc = e.code
        else: print(e.code, file=sys.stderr); rc = 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    send(b'X', struct.pack('<i', rc))
"#;

struct LocalFactory;

impl GuestFactory for LocalFactory {
    fn templates(&self) -> Vec<String> {
        vec!["default".into(), "python-datasci".into()]
    }
    fn create(&self, _spec: &GuestSpec) -> Result<Box<dyn Guest>, GuestError> {
        let mut child = Command::new("python3")
            .args(["-c", DRIVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| GuestError::Internal(e.to_string()))?;
        let stdin = child.stdin.take().ok_or_else(|| GuestError::Internal("no stdin".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| GuestError::Internal("no stdout".into()))?;
        Ok(Box::new(LocalGuest { child: Mutex::new(child), stdin: Mutex::new(stdin), stdout: Arc::new(Mutex::new(Some(BufReader::new(stdout)))) }))
    }
    fn capacity(&self) -> serde_json::Value {
        serde_json::json!({ "local_processes": true })
    }
}

struct LocalGuest {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    stdout: Arc<Mutex<Option<BufReader<ChildStdout>>>>,
}

impl Drop for LocalGuest {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pump(mut r: impl Read, tx: StreamTx<ExecChunk>, err: bool) {
    let mut buf = vec![0; 64 << 10];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        let b = buf[..n].to_vec();
        let _ = tx.push(if err { ExecChunk::Stderr(b) } else { ExecChunk::Stdout(b) });
    }
}

fn python_frames(slot: Arc<Mutex<Option<BufReader<ChildStdout>>>>, tx: StreamTx<ExecChunk>) {
    let Some(mut r) = slot.lock().unwrap().take() else {
        let _ = tx.push(ExecChunk::Failed("python reader busy".into()));
        return;
    };
    loop {
        let mut hdr = [0u8; 5];
        if r.read_exact(&mut hdr).is_err() {
            let _ = tx.push(ExecChunk::Failed("python exited".into()));
            return;
        }
        let mut payload = vec![0; u32::from_le_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize];
        if r.read_exact(&mut payload).is_err() {
            let _ = tx.push(ExecChunk::Failed("python exited".into()));
            return;
        }
        match hdr[0] {
            b'O' => drop(tx.push(ExecChunk::Stdout(payload))),
            b'E' => drop(tx.push(ExecChunk::Stderr(payload))),
            _ => {
                let code = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                *slot.lock().unwrap() = Some(r); // back before Exit: the next exec needs it
                let _ = tx.push(ExecChunk::Exit(code));
                return;
            }
        }
    }
}

impl Guest for LocalGuest {
    fn exec(&self, language: Language, code: &str) -> Result<StreamRx<ExecChunk>, GuestError> {
        let (tx, rx) = bounded(EXEC_STREAM_LIMIT);
        match language {
            Language::Python => {
                let mut w = self.stdin.lock().unwrap();
                w.write_all(&(code.len() as u32).to_le_bytes()).and_then(|()| w.write_all(code.as_bytes())).and_then(|()| w.flush())
                    .map_err(|e| GuestError::Failed(e.to_string()))?;
                let slot = Arc::clone(&self.stdout);
                std::thread::spawn(move || python_frames(slot, tx));
            }
            Language::Bash => {
                let mut child = Command::new("bash")
                    .args(["-c", code])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| GuestError::Internal(e.to_string()))?;
                let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
                std::thread::spawn(move || {
                    let t2 = tx.clone();
                    let e = std::thread::spawn(move || pump(err, t2, true));
                    pump(out, tx.clone(), false);
                    let _ = e.join();
                    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(137);
                    let _ = tx.push(ExecChunk::Exit(code));
                });
            }
        }
        Ok(rx)
    }
    fn private_memory_bytes(&self) -> u64 {
        0
    }
}

#[test]
fn sdk_tests_against_local_processes() {
    let Ok(python) = std::env::var("PODFLARE_SDK_PYTHON") else {
        println!("SKIPPED: set PODFLARE_SDK_PYTHON to a python with podflare==0.0.22 and pytest to run tests/sdk here");
        return;
    };
    let cfg = api_support::test_config();
    let (log, _logs) = Logger::memory(cfg.log_format);
    let controller = Arc::new(Controller::new(Arc::new(LocalFactory), &cfg, log.clone()));
    let auth = AuthMode::Keys(vec![api_support::KEY.into()]);
    let server = serve(cfg.bind().unwrap(), &cfg, Gate::new(&auth), controller, log).unwrap();
    let status = Command::new(python)
        .args(["-m", "pytest", "-q", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk")])
        .env("PODFLARE_HOSTD_URL", format!("http://{}", server.addr()))
        .env("PODFLARE_API_KEY", api_support::KEY)
        .env("PODFLARE_SDK_SHARED_FS", "1")
        .status()
        .expect("run pytest");
    server.shutdown();
    assert!(status.success(), "pytest failed");
}

//! The virtio-console port the agent serves, and frame output to it.

use crate::frames::put_header;
use crate::sys;
use podflare_proto::{Kind, HEADER_LEN};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest single write the virtio-console driver accepts (it truncates
/// longer ones), so one frame up to this size costs one `write(2)`.
pub const MAX_WRITE: usize = 32 * 1024;

/// Finds `/dev/vport<N>p<port>` (N is the virtio device index, unknown in
/// advance). The node may appear a moment after boot, so poll until `deadline`.
pub fn find(port: u32, deadline: Duration) -> Option<String> {
    let suffix = format!("p{port}");
    let t0 = Instant::now();
    let mut nap = Duration::from_millis(5);
    loop {
        if let Ok(dir) = std::fs::read_dir("/dev") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if let Some(rest) = name.strip_prefix("vport") {
                    if rest.ends_with(&suffix)
                        && rest[..rest.len() - suffix.len()]
                            .bytes()
                            .all(|b| b.is_ascii_digit())
                    {
                        return Some(format!("/dev/{name}"));
                    }
                }
            }
        }
        if t0.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(200));
    }
}

/// An open port. The driver allows one open per port, so one descriptor
/// serves the reader thread (no lock: only it reads) and every writer.
/// Writes are serialised: frames from many threads never interleave, and
/// each frame goes out in as few writes as the driver allows (usually one).
pub struct Port {
    fd: OwnedFd,
    write_lock: Mutex<()>,
}

impl Port {
    /// Wraps an open port.
    pub fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            write_lock: Mutex::new(()),
        }
    }

    /// Reads what the driver has (at most one 4 KiB buffer per call).
    /// `Ok(0)` means the host side is not connected.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        sys::read(self.fd.as_raw_fd(), buf)
    }

    /// Writes already-encoded bytes (one or more whole frames).
    pub fn write_raw(&self, bytes: &[u8]) -> io::Result<()> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        sys::write_all(self.fd.as_raw_fd(), bytes)
    }

    /// Encodes and writes one frame.
    pub fn send(&self, kind: Kind, stream: u32, payload: &[u8]) -> io::Result<()> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        put_header(&mut buf, kind, stream, payload.len());
        buf[HEADER_LEN..].copy_from_slice(payload);
        self.write_raw(&buf)
    }
}

/// Where a service sends its encoded frames: the port, or a test's buffer.
pub trait Sink: Send + Sync {
    /// Writes one or more whole frames, never interleaved with other
    /// writers' frames.
    fn send_frames(&self, bytes: &[u8]) -> io::Result<()>;
}

impl Sink for Port {
    fn send_frames(&self, bytes: &[u8]) -> io::Result<()> {
        self.write_raw(bytes)
    }
}

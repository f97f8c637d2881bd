//! Readiness and stop notifications to the service manager (`Type=notify`).
//!
//! A manager that starts hostd as a notify service puts the name of a Unix
//! datagram socket in `NOTIFY_SOCKET`: a filesystem path, or an abstract
//! socket when it starts with `@`. hostd sends one datagram of `KEY=value`
//! lines to it: `READY=1` once it serves, `STOPPING=1` when it begins an
//! orderly shutdown. Without the variable nothing is sent (a plain start).
//!
//! A failed send is the caller's to log: it never stops hostd, since the
//! host serves either way and a manager that missed `READY=1` says so
//! itself (its start times out).

use std::ffi::{OsStr, OsString};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable naming the manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` names something that is not a Unix socket address
    /// (empty, relative, or another address family).
    #[error("{NOTIFY_SOCKET}={socket:?} is not a socket path or @abstract name")]
    Address {
        /// The variable's value.
        socket: OsString,
    },
    /// The address is well formed but unusable (too long for a socket
    /// address, or a socket could not be made).
    #[error("{NOTIFY_SOCKET}={socket:?}: {source}")]
    Socket {
        /// The variable's value.
        socket: OsString,
        /// What the kernel or std said.
        #[source]
        source: std::io::Error,
    },
    /// The datagram was not delivered (no listener, refused, or cut short).
    #[error("sending {state:?} to {NOTIFY_SOCKET}={socket:?}: {source}")]
    Send {
        /// What was being said.
        state: String,
        /// The variable's value.
        socket: OsString,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// The message that says hostd serves on `addr`.
pub fn ready_message(addr: &str) -> String {
    format!("READY=1\nSTATUS=serving on {addr}")
}

/// The message that says an orderly shutdown has begun.
pub const STOPPING: &str = "STOPPING=1\nSTATUS=shutting down";

/// Sends `state` to the socket `NOTIFY_SOCKET` names. `Ok(false)` when the
/// variable is unset (not started as a notify service), `Ok(true)` once
/// the datagram is sent.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) => send_to(&socket, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` as one datagram to `socket`, a path or an `@abstract` name.
pub fn send_to(socket: &OsStr, state: &str) -> Result<(), NotifyError> {
    let addr = address(socket)?;
    let sock_err = |source| NotifyError::Socket { socket: socket.to_owned(), source };
    let sock = UnixDatagram::unbound().map_err(sock_err)?;
    let send_err = |source| NotifyError::Send { state: state.to_owned(), socket: socket.to_owned(), source };
    let sent = sock.send_to_addr(state.as_bytes(), &addr).map_err(send_err)?;
    // A datagram is all or nothing; a short count would be a kernel oddity,
    // but a manager reading half a message must not be assumed.
    if sent != state.len() {
        return Err(send_err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        )));
    }
    Ok(())
}

/// The socket address `socket` names.
fn address(socket: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = socket.as_bytes();
    let made = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket),
        // The name is what follows the '@' (the kernel's leading NUL).
        Some(b'@') if bytes.len() > 1 => SocketAddr::from_abstract_name(&bytes[1..]),
        _ => return Err(NotifyError::Address { socket: socket.to_owned() }),
    };
    made.map_err(|source| NotifyError::Socket { socket: socket.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_arrives_on_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("pf-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), &ready_message("127.0.0.1:7070")).unwrap();
        let got = recv(&manager);
        assert_eq!(got.lines().next(), Some("READY=1"), "{got:?}");
        assert!(got.contains("STATUS=serving on 127.0.0.1:7070"), "{got:?}");
        send_to(path.as_os_str(), STOPPING).unwrap();
        assert!(recv(&manager).starts_with("STOPPING=1\n"));
        drop(manager);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ready_arrives_on_an_abstract_socket() {
        let name = format!("pf-notify-test-{}", std::process::id());
        let manager = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send_to(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        assert_eq!(recv(&manager), "READY=1");
    }

    #[test]
    fn bad_addresses_are_errors_not_panics() {
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            let e = send_to(OsStr::new(bad), "READY=1").unwrap_err();
            assert!(matches!(e, NotifyError::Address { .. }), "{bad:?}: {e}");
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(matches!(send_to(OsStr::new(&long), "READY=1"), Err(NotifyError::Socket { .. })));
        // Nobody listening: a send error naming the socket, nothing else.
        let e = send_to(OsStr::new("/nonexistent/pf-notify.sock"), "READY=1").unwrap_err();
        assert!(matches!(e, NotifyError::Send { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/pf-notify.sock"), "{e}");
    }
}

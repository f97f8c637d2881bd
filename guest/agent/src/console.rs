//! The serial console: boot failures, the readiness line, selftest output.
//! Every byte is an emulated UART write, so it stays quiet otherwise.

/// Writes one line to the console (PID 1's fd 1, opened on /dev/console by
/// the kernel) in a single write.
pub fn line(msg: &str) {
    let mut s = String::with_capacity(msg.len() + 1);
    s.push_str(msg);
    s.push('\n');
    let _ = crate::sys::write_all(1, s.as_bytes());
}

//! Thin wrappers over the system calls the agent uses. Each is one call (every
//! guest syscall costs ~0.4 ms on PVM, so nothing here adds extra ones).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `mount(2)`; `data` is the filesystem's option string.
pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (src, target, fstype, data) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    check(rc).map(drop)
}

/// Moves the mount at `from` to `to` (`MS_MOVE`).
pub fn move_mount(from: &str, to: &str) -> io::Result<()> {
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: NUL-terminated strings that outlive the call; fstype/data may be NULL for MS_MOVE.
    let rc = unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    check(rc).map(drop)
}

/// `pivot_root(2)` (no libc wrapper exists).
pub fn pivot_root(new_root: &str, put_old: &str) -> io::Result<()> {
    let (new_root, put_old) = (cstr(new_root)?, cstr(put_old)?);
    // SAFETY: the syscall reads two NUL-terminated paths that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(rc as libc::c_int).map(drop)
}

/// Lazy unmount.
pub fn umount_detach(target: &str) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: NUL-terminated path that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

/// `mkdir(2)`; an existing directory is fine.
pub fn mkdir(path: &str, mode: libc::mode_t) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: NUL-terminated path that outlives the call.
    match check(unsafe { libc::mkdir(p.as_ptr(), mode) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map(drop),
    }
}

/// `chdir(2)`.
pub fn chdir(path: &str) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: NUL-terminated path that outlives the call.
    check(unsafe { libc::chdir(p.as_ptr()) }).map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, alive for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// Opens `path` with `flags | O_CLOEXEC`.
pub fn open(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = cstr(path)?;
    // SAFETY: NUL-terminated path; the returned fd is fresh and owned by us.
    let fd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o600) })?;
    // SAFETY: `fd` was just returned by open and is not owned by anything else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets `O_NONBLOCK` (the only status flag our pipe ends ever carry).
pub fn set_nonblock(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }).map(drop)
}

/// Opens a new pseudo-terminal master (`/dev/ptmx`: close-on-exec,
/// non-blocking, never our controlling terminal). Its slave stays locked
/// until [`pty_unlock`].
pub fn pty_open() -> io::Result<OwnedFd> {
    open(
        "/dev/ptmx",
        libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK,
    )
}

/// Unlocks the slave of `master` so it can be opened (`unlockpt(3)`; on
/// devpts `grantpt(3)` has nothing to do, the kernel sets the owner).
pub fn pty_unlock(master: &OwnedFd) -> io::Result<()> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the valid `unlock`.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) }).map(drop)
}

/// The path of the slave of `master` (`ptsname(3)`, without its extra stat).
pub fn pty_slave_path(master: &OwnedFd) -> io::Result<String> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int into the valid `n`.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) })?;
    Ok(format!("/dev/pts/{n}"))
}

/// Sets a terminal's size (`TIOCSWINSZ`). On a pty master the kernel then
/// sends SIGWINCH to the terminal's foreground process group.
pub fn set_winsize(tty: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the valid `ws`.
    check(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// An eventfd (close-on-exec), used to wake a thread blocked in `poll`.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is fresh.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `read(2)`, retried on EINTR.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid writable memory of `buf.len()` bytes for the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One `write(2)`, retried on EINTR; returns how much was written.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid readable memory of `buf.len()` bytes for the call.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Calls `write_at(rest, done)` until all of `buf` is written: `rest` is
/// what is left, `done` how much went before; EINTR is retried.
fn write_fully(buf: &[u8], mut write_at: impl FnMut(&[u8], usize) -> isize) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let n = write_at(&buf[done..], done);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// Writes all of `buf` (as few `write(2)` calls as the file allows).
pub fn write_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `rest` is valid readable memory of its length for the call.
    write_fully(buf, |rest, _| unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) })
}

/// An anonymous in-memory file (`memfd_create(2)`, close-on-exec).
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    let n = cstr(name)?;
    // SAFETY: NUL-terminated name that outlives the call; the fd is fresh.
    let fd = check(unsafe { libc::memfd_create(n.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes all of `buf` at offset 0 of `fd` (the file offset, shared with
/// whoever reads the file, stays where it is).
pub fn pwrite_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    write_fully(buf, |rest, done| {
        // SAFETY: `rest` is valid readable memory of its length for the call.
        unsafe { libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), done as libc::off_t) }
    })
}

/// The file offset of `fd` (`lseek(fd, 0, SEEK_CUR)`).
pub fn file_offset(fd: RawFd) -> io::Result<u64> {
    // SAFETY: plain syscall on a descriptor number; no memory involved.
    let off = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    if off < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(off as u64)
}

/// Moves process `pid` to `SCHED_IDLE` (runs only when nothing else
/// wants the CPU) or back to `SCHED_OTHER`.
pub fn set_sched_idle(pid: libc::pid_t, idle: bool) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `param` is a valid sched_param for the call.
    check(unsafe { libc::sched_setscheduler(pid, policy, &param) }).map(drop)
}

/// Four bytes from the kernel's CRNG (re-keyed by every Hello).
pub fn random_u32() -> io::Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: `b` is valid writable memory of 4 bytes for the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n != 4 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(u32::from_ne_bytes(b))
}

/// `poll(2)` retried on EINTR; `timeout_ms` < 0 waits forever.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether a clock reading `guest_now` (ns) should be replaced by the host's
/// `host_sent` (its wall clock when it sent the Hello). hostd restores the
/// guest's kvm-clock advanced by the time since the snapshot, so the guest
/// clock is usually right already and a little ahead of `host_sent` (by the
/// frame's transit time); setting it then would only move it back. A clock
/// behind the host's, or far ahead of it, is wrong and gets replaced.
pub fn clock_needs_setting(guest_now: u64, host_sent: u64) -> bool {
    guest_now < host_sent || guest_now - host_sent > 2_000_000_000
}

/// Current wall clock in ns (vDSO: no system call).
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Sets the wall clock.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// `RNDADDENTROPY = _IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Mixes `bytes` into the kernel pool and credits them as entropy.
pub fn add_entropy(urandom: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = bytes.len().div_ceil(4);
    let mut req = vec![0u32; 2 + words];
    req[0] = (bytes.len() * 8) as u32;
    req[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        req[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `req` is a rand_pool_info whose buf holds buf_size bytes, alive for the call.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, req.as_ptr()) })?;
    // Re-key the CRNG now: otherwise every copy of a snapshot keeps the
    // shared key until the kernel's next scheduled reseed.
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) }).map(drop)
}

/// `RNDRESEEDCRNG = _IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Brings up the loopback interface (best effort: one socket + two ioctls).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation; the fd is owned below.
    let s =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `s` was just created and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags member of the valid `ifr`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: the kernel just initialised the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the valid `ifr`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) }).map(drop)
}

/// `kill(2)` of a whole process group.
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: plain syscall; a stale group only yields ESRCH.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Flushes file systems and powers the machine off (selftest end).
pub fn power_off() -> ! {
    // SAFETY: plain syscalls; PID 1 may call reboot.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Without a power-off device the kernel only halts; PID 1 then waits forever.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod clock_tests {
    use super::clock_needs_setting;

    #[test]
    fn a_clock_just_ahead_of_the_hosts_send_time_is_kept() {
        let sent = 1_700_000_000_000_000_000;
        assert!(
            !clock_needs_setting(sent + 300_000_000, sent),
            "transit time is not an error"
        );
        assert!(clock_needs_setting(sent - 1, sent), "behind the host: set");
        assert!(
            clock_needs_setting(sent + 3_000_000_000, sent),
            "far ahead: set"
        );
        assert!(clock_needs_setting(0, sent), "never set: set");
    }
}

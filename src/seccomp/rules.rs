//! The syscall allow-lists, one per [`ThreadKind`], built from groups. Each
//! group says why its thread kinds need it. Filters stack: a thread made by
//! a filtered thread runs under its parent's filters too (from its very
//! first instruction, before it installs its own), so a kind that creates
//! threads must allow what those threads do, start-up included.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    BackendError, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::{kvm, ThreadKind};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type Built = Result<(), BackendError>;

/// Allows `nrs` with any arguments (overrides conditions added earlier).
fn any(r: &mut Rules, nrs: &[c_long]) {
    for &nr in nrs {
        r.insert(nr, Vec::new());
    }
}

/// Allows `nr` when argument `arg` (a 32-bit value) passes `op` against
/// `value`. Rules of one syscall are alternatives; a syscall already allowed
/// with any arguments stays so.
fn when(r: &mut Rules, nr: c_long, arg: u8, op: Op, value: u64) -> Built {
    let rule = SeccompRule::new(vec![Cond::new(arg, Len::Dword, op, value)?])?;
    match r.get_mut(&nr) {
        Some(rules) if rules.is_empty() => {}
        Some(rules) => rules.push(rule),
        None => _ = r.insert(nr, vec![rule]),
    }
    Ok(())
}

/// Every thread: the Rust runtime, glibc and the allocator.
fn runtime(r: &mut Rules) -> Built {
    // Heap and thread stacks. Never executable memory: no code is loaded
    // after start, and W^X takes shellcode's easiest next step away.
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        when(r, nr, 2, Op::MaskedEq(libc::PROT_EXEC as u64), 0)?;
    }
    any(r, &[libc::SYS_munmap, libc::SYS_mremap, libc::SYS_madvise, libc::SYS_brk]);
    // Locks, condvars, channels, sleeps, clocks (vDSO fallbacks), HashMap keys.
    any(r, &[libc::SYS_futex, libc::SYS_sched_yield, libc::SYS_nanosleep, libc::SYS_clock_nanosleep]);
    any(r, &[libc::SYS_clock_gettime, libc::SYS_gettimeofday, libc::SYS_getrandom]);
    // CPU count: std's thread start, glibc's malloc sizing its arenas.
    any(r, &[libc::SYS_sched_getaffinity]);
    // Log lines and panic messages on stderr; dropping what a thread owns.
    any(r, &[libc::SYS_write, libc::SYS_close]);
    // Thread exit (stack and signal stack freed, robust futexes), signal
    // delivery (the vCPU kick's handler returns through rt_sigreturn), abort.
    any(r, &[libc::SYS_exit, libc::SYS_exit_group, libc::SYS_sigaltstack, libc::SYS_rt_sigprocmask]);
    any(r, &[libc::SYS_rt_sigreturn, libc::SYS_gettid, libc::SYS_getpid]);
    // Signals to our own threads only (vCPU kicks, abort's raise).
    when(r, libc::SYS_tgkill, 0, Op::Eq, u64::from(std::process::id()))
}

/// Threads that create threads (HTTP workers restoring VMs, the pool
/// filler): the parent's side of `pthread_create`, and the child's start-up
/// before it installs its own filter.
fn thread_start(r: &mut Rules) -> Built {
    // clone3 passes its flags in memory where BPF cannot look: the clone3
    // filter answers ENOSYS and glibc falls back to clone, checked here
    // (and a clone without CLONE_THREAD, a new process, kills: see `never`).
    any(r, &[libc::SYS_clone3]);
    let thread = libc::CLONE_THREAD as u64;
    when(r, libc::SYS_clone, 0, Op::MaskedEq(thread), thread)?;
    // The child's start: robust list, rseq, its name.
    any(r, &[libc::SYS_set_robust_list, libc::SYS_rseq]);
    when(r, libc::SYS_prctl, 0, Op::Eq, libc::PR_SET_NAME as u64)?;
    // A vCPU thread's scheduling slice, its own only (pid 0: the caller).
    when(r, libc::SYS_sched_setattr, 0, Op::Eq, 0)?;
    // Then it installs its own filters (only ever narrowing).
    when(r, libc::SYS_prctl, 0, Op::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)?;
    when(r, libc::SYS_seccomp, 0, Op::Eq, u64::from(libc::SECCOMP_SET_MODE_FILTER))
}

/// Sockets handed over by the accept thread or accepted by it.
fn socket_io(r: &mut Rules) -> Built {
    // std's recv/send are recvfrom/sendto; read/write for the wake-up pair.
    any(r, &[libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll]);
    // Write deadlines (SO_SNDTIMEO), TCP_NODELAY.
    any(r, &[libc::SYS_setsockopt]);
    // set_nonblocking is ioctl(FIONBIO).
    when(r, libc::SYS_ioctl, 1, Op::Eq, libc::FIONBIO)
}

/// Files opened read-only: /dev/urandom (ids, guest entropy), /proc
/// (capacity: meminfo, pagemap), snapshot and image files, their sizes, and
/// dup of already open fds (templates hand out clones of theirs). Nothing
/// here writes a file: O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND are refused.
fn files_read_only(r: &mut Rules) -> Built {
    let write = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    when(r, libc::SYS_openat, 2, Op::MaskedEq(write), 0)?;
    any(r, &[libc::SYS_read, libc::SYS_pread64, libc::SYS_lseek]);
    any(r, &[libc::SYS_statx, libc::SYS_fstat, libc::SYS_newfstatat]);
    for cmd in [libc::F_DUPFD_CLOEXEC, libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL] {
        when(r, libc::SYS_fcntl, 1, Op::Eq, cmd as u64)?;
    }
    Ok(())
}

/// Building, restoring and tearing down VMs (vmm/vm.rs, vmm/persist.rs),
/// and, because filters stack, everything the VM's own device and vCPU
/// threads do before and after they narrow themselves.
fn vm_build(r: &mut Rules) -> Built {
    // KVM ioctls only (type 0xAE): /dev/kvm, VM and vCPU fds.
    when(r, libc::SYS_ioctl, 1, Op::MaskedEq(0xff00), kvm::KVM_IOCTL_TYPE)?;
    // irqfds, ioeventfds, the device thread's epoll set (and its wait).
    any(r, &[libc::SYS_eventfd2, libc::SYS_epoll_create1, libc::SYS_epoll_ctl, libc::SYS_epoll_wait]);
    // The vCPU kick handler, installed by the first VM of the process.
    when(r, libc::SYS_rt_sigaction, 0, Op::Eq, libc::SIGRTMIN() as u64)?;
    device_work(r);
    disk_copies(r)?;
    files_read_only(r)
}

/// Each VM's writable disk (vmm/scratch.rs): an unnamed file (O_TMPFILE:
/// never a named file opened for writing) filled with a copy of another
/// disk's data extents, found with lseek(SEEK_DATA/SEEK_HOLE), and sized.
fn disk_copies(r: &mut Rules) -> Built {
    let tmpfile = libc::O_TMPFILE as u64;
    when(r, libc::SYS_openat, 2, Op::MaskedEq(tmpfile), tmpfile)?;
    any(r, &[libc::SYS_copy_file_range, libc::SYS_lseek, libc::SYS_ftruncate, libc::SYS_pwrite64]);
    Ok(())
}

/// Device emulation, on the device thread and, for MMIO register writes
/// (queue notify, activation), on a vCPU thread: eventfds (kicks,
/// interrupts), reads of the disks, writes of the writable one and the
/// holes its discards punch.
fn device_work(r: &mut Rules) {
    any(r, &[libc::SYS_read, libc::SYS_write, libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fallocate]);
}

/// A fork's capture (vmm/memory.rs): a new sealed memfd sized to guest RAM,
/// filled with the parent's own pages; then mapped over guest RAM, which the
/// runtime group's mmap rule already allows (never executable).
fn fork_image(r: &mut Rules) -> Built {
    let flags = (libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) as u64;
    when(r, libc::SYS_memfd_create, 1, Op::Eq, flags)?;
    any(r, &[libc::SYS_ftruncate, libc::SYS_pwrite64]);
    when(r, libc::SYS_fcntl, 1, Op::Eq, libc::F_ADD_SEALS as u64)
}

/// Frozen spaces (vmm/space.rs): a directory per space made, its files
/// created new (O_EXCL: never an existing file opened for writing),
/// written, fsynced and renamed into place; removed when resumed or
/// deleted.
fn space_files(r: &mut Rules) -> Built {
    when(r, libc::SYS_openat, 2, Op::MaskedEq(libc::O_EXCL as u64), libc::O_EXCL as u64)?;
    any(r, &[libc::SYS_mkdir, libc::SYS_mkdirat, libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2]);
    any(r, &[libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_rmdir, libc::SYS_getdents64]);
    any(r, &[libc::SYS_fsync, libc::SYS_fdatasync, libc::SYS_ftruncate, libc::SYS_pwrite64]);
    Ok(())
}

/// Writing a template snapshot into the cache (vmm/template.rs,
/// vmm/persist.rs): its directory and lock file, the sparse memory file and
/// the state file written, fsynced and renamed into place, stale snapshots
/// of the same size removed.
fn snapshot_files(r: &mut Rules) {
    any(r, &[libc::SYS_openat, libc::SYS_flock, libc::SYS_readlink, libc::SYS_readlinkat]);
    any(r, &[libc::SYS_mkdir, libc::SYS_mkdirat, libc::SYS_rename, libc::SYS_renameat, libc::SYS_renameat2]);
    any(r, &[libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_rmdir, libc::SYS_getdents64]);
    any(r, &[libc::SYS_fsync, libc::SYS_fdatasync, libc::SYS_ftruncate, libc::SYS_pwrite64]);
}

/// The allow-list of `kind` (a syscall not in it fails with EPERM).
pub fn allowed(kind: ThreadKind) -> Result<Rules, BackendError> {
    let mut r = Rules::new();
    runtime(&mut r)?;
    match kind {
        ThreadKind::HttpAccept => {
            socket_io(&mut r)?;
            any(&mut r, &[libc::SYS_accept4]);
        }
        ThreadKind::HttpWorker => {
            socket_io(&mut r)?;
            // A reply is shut for writing before the connection lingers.
            any(&mut r, &[libc::SYS_shutdown]);
            // The controller creates sandboxes: VM restores on this thread.
            thread_start(&mut r)?;
            vm_build(&mut r)?;
            // And forks them, resumes spaces (removing them once resumed)
            // and deletes spaces.
            fork_image(&mut r)?;
            space_files(&mut r)?;
        }
        ThreadKind::PoolFiller => {
            thread_start(&mut r)?;
            vm_build(&mut r)?;
        }
        ThreadKind::TemplateBuilder => {
            thread_start(&mut r)?;
            vm_build(&mut r)?;
            snapshot_files(&mut r);
            // A new template's memory file locked in RAM (a shared,
            // read-only mapping: the runtime group's mmap rule).
            any(&mut r, &[libc::SYS_mlock]);
        }
        // Dropping VMs (kicks, joins, closes, unmaps) needs only the runtime;
        // the memory watchdog reads /proc/meminfo and /proc/self/pagemap.
        // Freezing a persistent sandbox saves its VM state (KVM ioctls on
        // the VM fd) and writes its space.
        ThreadKind::Reaper => {
            files_read_only(&mut r)?;
            // The disk's data copied into the space.
            any(&mut r, &[libc::SYS_copy_file_range]);
            when(&mut r, libc::SYS_ioctl, 1, Op::MaskedEq(0xff00), kvm::KVM_IOCTL_TYPE)?;
            space_files(&mut r)?;
        }
        ThreadKind::Device => {
            device_work(&mut r);
            any(&mut r, &[libc::SYS_epoll_wait]);
        }
        ThreadKind::Vcpu => {
            device_work(&mut r);
            for nr in kvm::vcpu_thread_ioctls() {
                when(&mut r, libc::SYS_ioctl, 1, Op::Eq, nr)?;
            }
        }
    }
    Ok(r)
}

/// Syscalls nothing in hostd ever makes, and an attacker's next step after
/// taking over a thread: a new program or process, another process's
/// memory, the kernel's state (modules, kexec, mounts, namespaces, BPF,
/// perf, keys, userfaultfd for race exploits). These kill the whole
/// process: there is no operation to fail gracefully, only an intrusion.
pub fn never() -> Result<Rules, BackendError> {
    let mut r = Rules::new();
    any(
        &mut r,
        &[
            libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork,
            libc::SYS_ptrace, libc::SYS_process_vm_readv, libc::SYS_process_vm_writev,
            libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_chroot,
            libc::SYS_fsopen, libc::SYS_fsmount, libc::SYS_move_mount, libc::SYS_open_tree,
            libc::SYS_unshare, libc::SYS_setns, libc::SYS_kexec_load, libc::SYS_kexec_file_load,
            libc::SYS_init_module, libc::SYS_finit_module, libc::SYS_delete_module,
            libc::SYS_bpf, libc::SYS_perf_event_open, libc::SYS_userfaultfd,
            libc::SYS_keyctl, libc::SYS_add_key, libc::SYS_request_key,
            libc::SYS_reboot, libc::SYS_swapon, libc::SYS_swapoff, libc::SYS_acct,
            libc::SYS_open_by_handle_at, libc::SYS_iopl, libc::SYS_ioperm,
        ],
    );
    // clone without CLONE_THREAD makes a process (fork).
    when(&mut r, libc::SYS_clone, 0, Op::MaskedEq(libc::CLONE_THREAD as u64), 0)?;
    Ok(r)
}

/// The three filters of `kind`, in install order: `never` (match: kill the
/// process), clone3 (match: ENOSYS), the allow-list (mismatch: EPERM). The
/// kernel runs every filter and keeps the strictest answer; the allow-list
/// goes last so a thread that creates none needs no prctl/seccomp itself.
pub fn filters(kind: ThreadKind) -> Result<[SeccompFilter; 3], BackendError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let clone3: Rules = [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    Ok([
        SeccompFilter::new(never()?, SeccompAction::Allow, SeccompAction::KillProcess, arch)?,
        SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?,
        // EPERM, not a kill: a syscall missed here fails one operation with
        // a clear error instead of killing every VM of the process.
        SeccompFilter::new(allowed(kind)?, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)?,
    ])
}

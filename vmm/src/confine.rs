//! What podbox-vmm gives up before the guest runs (issue 13): a device
//! model bug the guest exploits should find a process that can do little
//! more than run this VM.
//!
//! - Capabilities: none in any thread (but see `tap=NAME` below). They go at the start of
//!   [`crate::builder::run`], before any thread exists (Linux keeps them
//!   per thread, and threads inherit them). The setup needs none: podbox-vmm
//!   runs as root, which owns /dev/kvm and the pod's state directory, and
//!   virtiofsd, a root process exec'd from here, gets its own from the
//!   bounding set, which stays. Only a `tap=NAME` NIC (a developer's
//!   command line; the shim hands over an open tap) keeps CAP_NET_ADMIN:
//!   [`lock_down`] drops it in the main thread, but the threads started
//!   before it (signals, virtiofsd's watchers) keep it for the VM's life.
//! - `no_new_privs`, and a seccomp filter on every thread (TSYNC), put on
//!   by [`lock_down`] once the VM is built and before its vCPUs start: the
//!   syscalls listed in [`ALLOWED`] only, with `ioctl` limited to KVM's
//!   request type and six listed tap and std requests, `fcntl` to five
//!   commands (no F_SETOWN/F_SETSIG/O_ASYNC), `socket` to AF_UNIX, `clone`
//!   to new threads, `prctl` to naming, `tgkill` to podbox-vmm itself, no
//!   `kill` (virtiofsd is signalled through its pidfd) and no `execve`, so
//!   the bounding set cannot be used to regain capabilities.
//!   Anything else kills the VMM with SIGSYS (`--seccomp kill`), which the
//!   shim reports as the pod's tasks ending.
//! - A third filter on each vCPU thread, inherited by the device threads
//!   the guest's driver starts through it ([`confine_vcpu_thread`]): none
//!   of [`NOT_FOR_VCPUS`] (waiting for and signalling virtiofsd, unlinking,
//!   listing directories).
//! - Resource limits ([`limit_resources`]); the mount namespace and root
//!   are [`crate::jail`]'s.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::config::SeccompMode;

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("dropping capabilities ({set}): {source}")]
    Capabilities {
        set: &'static str,
        source: caps::errors::CapsError,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(std::io::Error),
    #[error("building the seccomp filter: {0}")]
    Filter(String),
    #[error("installing the seccomp filter: {0}")]
    Install(seccompiler::Error),
    #[error("setting {name} to {limit}: {source}")]
    Limit {
        name: &'static str,
        limit: u64,
        source: nix::Error,
    },
}

/// The syscalls podbox-vmm's threads make once the guest runs (vCPUs and
/// their exits, device workers, vsock and vhost-user sockets, the console
/// and log files, signals, virtiofsd's supervision, the profiler), read
/// off `strace -f` of pods through containerd. `ioctl` and `clone` are
/// allowed with conditions (see [`filters`]).
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_dup,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_renameat,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_readlink,
    libc::SYS_getdents64,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getrandom,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Answered ENOSYS by the first filter (glibc then uses clone, whose
    // flags this one can check); listed so that this filter allows it.
    libc::SYS_clone3,
];

/// KVM's ioctl request type (KVMIO, bits 8-15): every vCPU and VM request.
const KVMIO: u64 = 0xAE;
/// The other ioctl requests podbox-vmm makes once the guest runs, exactly:
/// FIONBIO, FIOCLEX, FIONCLEX and TCGETS (std), TUNGETIFF and TUNSETOFFLOAD
/// (the tap, when the guest sets its offloads). Not the whole 'T' type: it
/// holds TIOCSTI, TIOCSETD and the other terminal requests.
const IOCTLS: [u64; 6] = [0x5421, 0x5451, 0x5450, 0x5401, 0x8004_54d2, 0x4004_54d0];
/// fcntl commands: F_GETFD, F_SETFD, F_GETFL and F_DUPFD_CLOEXEC; F_SETFL
/// is allowed only without O_ASYNC. F_SETOWN/F_SETSIG are not: with them a
/// root process can have SIGIO (or any signal) sent to any process.
const FCNTLS: [u64; 4] = [
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

/// Drops every capability of the calling thread but CAP_NET_ADMIN where
/// `keep_net_admin` (a NIC podbox-vmm attaches to by name). Call before
/// any thread is started: threads inherit the caller's.
pub fn drop_capabilities(keep_net_admin: bool) -> Result<(), ConfineError> {
    let keep: CapsHashSet = if keep_net_admin {
        [Capability::CAP_NET_ADMIN].into_iter().collect()
    } else {
        CapsHashSet::new()
    };
    set_caps(&keep)
}

/// Leaves the calling thread `keep` (effective and permitted) and nothing
/// else: no inheritable or ambient capability.
pub(crate) fn set_caps(keep: &CapsHashSet) -> Result<(), ConfineError> {
    let err = |set| move |source| ConfineError::Capabilities { set, source };
    caps::clear(None, CapSet::Ambient).map_err(err("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(err("inheritable"))?;
    caps::set(None, CapSet::Effective, keep).map_err(err("effective"))?;
    caps::set(None, CapSet::Permitted, keep).map_err(err("permitted"))?;
    Ok(())
}

/// Resource limits for the rest of podbox-vmm's life (the process's, so
/// every thread's): descriptors up to `open_files`, no file written past
/// `file_bytes` (SIGXFSZ ends the VMM), and no core dump, which would hold
/// the guest's memory.
pub fn limit_resources(open_files: u64, file_bytes: u64) -> Result<(), ConfineError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    for (resource, name, wanted) in [
        (Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", open_files),
        (Resource::RLIMIT_FSIZE, "RLIMIT_FSIZE", file_bytes),
        (Resource::RLIMIT_CORE, "RLIMIT_CORE", 0),
    ] {
        // Without capabilities a hard limit can only be lowered.
        let hard = getrlimit(resource).map_or(wanted, |(_, hard)| hard);
        let limit = wanted.min(hard);
        setrlimit(resource, limit, limit).map_err(|source| ConfineError::Limit {
            name,
            limit,
            source,
        })?;
    }
    Ok(())
}

/// The rest, once the VM is built: no capability left in the calling
/// thread, `no_new_privs`, and (unless `mode` is off) the seccomp filters
/// on every thread of the process.
pub fn lock_down(mode: SeccompMode, pidfds: &[RawFd]) -> Result<(), ConfineError> {
    set_caps(&CapsHashSet::new())?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(ConfineError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    let Some(mismatch) = mismatch_action(mode) else {
        tracing::warn!("--seccomp off: podbox-vmm runs without a syscall filter");
        return Ok(());
    };
    for filter in filters(mismatch, std::process::id() as libc::pid_t, pidfds)? {
        seccompiler::apply_filter_all_threads(&filter).map_err(ConfineError::Install)?;
    }
    tracing::info!(
        "confined: no capabilities, no_new_privs, seccomp ({} syscalls, otherwise {})",
        ALLOWED.len() + CONDITIONAL.len(),
        mode.as_arg()
    );
    Ok(())
}

fn mismatch_action(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Off => None,
        SeccompMode::Kill => Some(SeccompAction::KillProcess),
        SeccompMode::Log => Some(SeccompAction::Log),
    }
}

/// Syscalls [`filters`] allows only with conditions on their arguments.
const CONDITIONAL: [i64; 7] = [
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_socket,
    libc::SYS_clone,
    libc::SYS_tgkill,
    libc::SYS_prctl,
    libc::SYS_seccomp,
];

/// prctl options a thread uses once the guest runs: naming itself (std at
/// a thread's start), glibc's naming of the memory it maps, and
/// `no_new_privs`, which seccompiler sets before it adds a vCPU thread's
/// filter ([`confine_vcpu_thread`]; setting it only takes away).
const PRCTLS: [u64; 4] = [
    libc::PR_SET_NAME as u64,
    libc::PR_GET_NAME as u64,
    0x5356_4d41, // PR_SET_VMA
    libc::PR_SET_NO_NEW_PRIVS as u64,
];

/// What a vCPU thread, and the device threads it starts when the guest
/// activates a device, never need of what [`ALLOWED`] lets the rest of
/// podbox-vmm do: supervising virtiofsd (waiting, signalling), the clean-up
/// at the VM's end (removing sockets), listing directories.
const NOT_FOR_VCPUS: [i64; 9] = [
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_pidfd_send_signal,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_pipe2,
    libc::SYS_ftruncate,
];

/// The vCPU threads' own filter, stacked on the process's (call at the
/// start of each vCPU thread, after [`lock_down`]): the syscalls of
/// [`NOT_FOR_VCPUS`] get the mismatch action of `mode`. The vCPU threads
/// run the device models' register and queue handling, the guest's first
/// point of contact, so a bug there finds even less.
pub fn confine_vcpu_thread(mode: SeccompMode) -> Result<(), ConfineError> {
    let Some(mismatch) = mismatch_action(mode) else {
        return Ok(());
    };
    seccompiler::apply_filter(&vcpu_filter(mismatch)?).map_err(ConfineError::Install)
}

fn vcpu_filter(mismatch: SeccompAction) -> Result<BpfProgram, ConfineError> {
    let rules = NOT_FOR_VCPUS.iter().map(|&nr| (nr, Vec::new())).collect();
    SeccompFilter::new(rules, SeccompAction::Allow, mismatch, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| ConfineError::Filter(e.to_string()))
}

/// Two filters (the kernel runs both; the stricter answer wins): clone3 is
/// answered ENOSYS, and the allowlist with `mismatch` for the rest.
/// `tgkill` only reaches podbox-vmm's own threads (`pid`: the profiler's
/// vCPU kicks, abort); `kill` is not allowed at all: virtiofsd is
/// signalled through its pidfd, and `pidfd_send_signal` only takes
/// `pidfds` (any other pidfd, e.g. a /proc/<pid> directory, is refused).
fn filters(
    mismatch: SeccompAction,
    pid: libc::pid_t,
    pidfds: &[RawFd],
) -> Result<[BpfProgram; 2], ConfineError> {
    let build = |rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch, matched| {
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(|e| ConfineError::Filter(e.to_string()))
    };
    let no_clone3 = build(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let cond = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
            .map_err(|e| ConfineError::Filter(e.to_string()))
    };
    let rule =
        |conditions| SeccompRule::new(conditions).map_err(|e| ConfineError::Filter(e.to_string()));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // The kernel takes an ioctl's request, and fcntl's command, as an int:
    // compare the low 32 bits only.
    let low = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .map_err(|e| ConfineError::Filter(e.to_string()))
    };
    let mut ioctl = vec![rule(vec![low(
        1,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?];
    for request in IOCTLS {
        ioctl.push(rule(vec![low(1, SeccompCmpOp::Eq, request)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl);
    let mut fcntl = FCNTLS
        .iter()
        .map(|&cmd| rule(vec![low(1, SeccompCmpOp::Eq, cmd)?]))
        .collect::<Result<Vec<_>, _>>()?;
    fcntl.push(rule(vec![
        low(1, SeccompCmpOp::Eq, libc::F_SETFL as u64)?,
        low(2, SeccompCmpOp::MaskedEq(libc::O_ASYNC as u64), 0)?,
    ])?);
    rules.insert(libc::SYS_fcntl, fcntl);
    // Unix sockets only: the vsock device's host connections.
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![low(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?],
    );
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    let own = |arg, pid: libc::pid_t| rule(vec![cond(arg, SeccompCmpOp::Eq, pid as u64)?]);
    rules.insert(libc::SYS_tgkill, vec![own(0, pid)?]);
    if !pidfds.is_empty() {
        let signals = pidfds
            .iter()
            .map(|&fd| rule(vec![low(0, SeccompCmpOp::Eq, fd as u64)?]))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_pidfd_send_signal, signals);
    }
    let prctl = PRCTLS
        .iter()
        .map(|&option| rule(vec![low(0, SeccompCmpOp::Eq, option)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_prctl, prctl);
    // A vCPU thread adds its own filter: a filter can only take away.
    rules.insert(
        libc::SYS_seccomp,
        vec![rule(vec![low(
            0,
            SeccompCmpOp::Eq,
            libc::SECCOMP_SET_MODE_FILTER as u64,
        )?])?],
    );
    debug_assert!(CONDITIONAL.iter().all(|nr| rules.contains_key(nr)));
    let allowlist = build(rules, mismatch, SeccompAction::Allow)?;
    Ok([no_clone3, allowlist])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_build_for_every_mode() {
        for mismatch in [SeccompAction::KillProcess, SeccompAction::Log] {
            let [no_clone3, allowlist] = filters(mismatch.clone(), 1, &[3]).expect("filters");
            assert!(!vcpu_filter(mismatch).expect("vcpu filter").is_empty());
            assert!(!no_clone3.is_empty() && allowlist.len() > ALLOWED.len());
        }
    }

    /// In a child process (the filter is for ever, and kills): allowed
    /// syscalls work, clone3 is ENOSYS, a thread can still be started,
    /// the child may signal itself and its own child (through a pidfd),
    /// name a thread and use a unix socket; an ioctl outside the list
    /// (BLKGETSIZE64, TIOCSTI), kill(2), F_SETOWN, an AF_INET socket,
    /// execve, another prctl, and (with the vCPU layer) wait4 kill it.
    #[test]
    fn the_filter_allows_the_list_and_kills_the_rest() {
        let run = |case: u8| -> i32 {
            // SAFETY: fork in a test; the child only makes raw syscalls
            // and std::thread calls before _exit.
            match unsafe { libc::fork() } {
                0 => {
                    let code = (|| {
                        // Case 0 signals a child of its own, which only
                        // waits to be killed; the others name one that
                        // does not exist.
                        let grandchild = if case == 0 {
                            // SAFETY: fork in the single-threaded child.
                            match unsafe { libc::fork() } {
                                0 => loop {
                                    // SAFETY: die with the child whatever
                                    // it does, and wait for that.
                                    unsafe {
                                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                                        libc::pause();
                                    }
                                },
                                pid => pid,
                            }
                        } else {
                            libc::pid_t::MAX
                        };
                        // SAFETY: getpid has no preconditions; pidfd_open
                        // of our own child (or of no process: -1).
                        let (me, pidfd) = unsafe {
                            (
                                libc::getpid(),
                                libc::syscall(libc::SYS_pidfd_open, grandchild, 0),
                            )
                        };
                        for f in filters(SeccompAction::KillProcess, me, &[pidfd as RawFd]).ok()? {
                            seccompiler::apply_filter_all_threads(&f).ok()?;
                        }
                        if case >= 8 {
                            confine_vcpu_thread(SeccompMode::Kill).ok()?;
                        }
                        match case {
                            0 => {
                                // SAFETY: clone3 with no arguments fails either way.
                                let r = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
                                let enosys = r == -1
                                    && std::io::Error::last_os_error().raw_os_error()
                                        == Some(libc::ENOSYS);
                                let thread = std::thread::spawn(|| 7).join().ok()?;
                                // SAFETY: signals to the grandchild through
                                // its pidfd and to this process (0: only
                                // checks it exists); naming this thread.
                                let signals = unsafe {
                                    libc::syscall(
                                        libc::SYS_pidfd_send_signal,
                                        pidfd,
                                        libc::SIGKILL,
                                        0,
                                        0,
                                    ) == 0
                                        && libc::syscall(libc::SYS_tgkill, me, me, 0) == 0
                                        && libc::prctl(libc::PR_SET_NAME, c"t".as_ptr()) == 0
                                };
                                // SAFETY: a unix socket of this process,
                                // made non-blocking two allowed ways.
                                let unix = unsafe {
                                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                                    let on: libc::c_int = 1;
                                    fd >= 0
                                        && libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) == 0
                                        && libc::ioctl(fd, libc::FIONBIO, &on) == 0
                                };
                                Some(if enosys && thread == 7 && signals && unix {
                                    0
                                } else {
                                    1
                                })
                            }
                            // SAFETY: BLKGETSIZE64 (type 0x12, which the
                            // filter refuses) on stdin, into a local.
                            1 => {
                                let mut size = 0u64;
                                Some(unsafe { libc::ioctl(0, 0x8008_1272, &mut size) })
                            }
                            // SAFETY: kill(1, 0) only checks that init exists.
                            2 => Some(unsafe { libc::kill(1, 0) }),
                            // SAFETY: F_SETOWN on stdin (refused before it acts).
                            3 => Some(unsafe { libc::fcntl(0, libc::F_SETOWN, 1) }),
                            // SAFETY: socket(2) returns a descriptor or -1.
                            4 => Some(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }),
                            // SAFETY: TIOCSTI on stdin with a local byte.
                            5 => Some(unsafe { libc::ioctl(0, libc::TIOCSTI, c"x".as_ptr()) }),
                            // SAFETY: prctl with integer arguments.
                            7 => Some(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) }),
                            // SAFETY: wait4 for any child, which a vCPU
                            // thread may not (there is none: ECHILD).
                            8 => Some(unsafe {
                                libc::wait4(-1, std::ptr::null_mut(), 0, std::ptr::null_mut())
                            }),
                            // The vCPU layer went on (case 8's SIGSYS is
                            // its wait4), and what a vCPU does still works.
                            9 => Some(i32::from(
                                std::thread::spawn(|| 7).join().ok()? != 7
                                    || std::fs::write("/dev/null", b"x").is_err(),
                            )),
                            6 => {
                                // SAFETY: execve of /bin/true with empty argv and envp.
                                let argv = [std::ptr::null::<libc::c_char>()];
                                unsafe {
                                    libc::execve(
                                        c"/bin/true".as_ptr(),
                                        argv.as_ptr(),
                                        argv.as_ptr(),
                                    )
                                };
                                Some(2)
                            }
                            _ => None,
                        }
                    })();
                    // SAFETY: _exit in the forked child.
                    unsafe { libc::_exit(code.unwrap_or(100)) }
                }
                pid => {
                    let mut status = 0;
                    // SAFETY: waitpid on our own child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                    status
                }
            }
        };
        assert_eq!(run(0), 0, "clone3 ENOSYS, threads still start");
        assert_eq!(
            run(9),
            0,
            "a vCPU thread's filter goes on, and threads still start"
        );
        for case in 1..=8 {
            let status = run(case);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "case {case}: status {status:#x}"
            );
        }
    }
}

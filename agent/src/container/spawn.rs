//! Starts stage 2 (this binary re-executed with `stage2::ARG`) in the right
//! namespaces, puts it in its cgroup and hands it its InitConfig.
//!
//! The agent is multi-threaded, so the namespace changes that can only
//! affect a whole process (mount) are left to stage 2, which is a fresh
//! single-threaded process. IPC, UTS and "PID namespace for children" are
//! per-thread, so a short-lived thread joins those and spawns stage 2: the
//! child inherits them while the agent's other threads are untouched.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use nix::sched::{setns, unshare, CloneFlags};

use super::cgroup::Cgroup;
use super::process::{read_status, Process};
use super::stdio::ProcessIo;
use super::{stage2, Error, InitConfig};
use crate::reaper::{self, ExitCell};

/// Where the new process's PID namespace comes from.
#[derive(Debug, Clone)]
pub enum PidNs {
    /// A fresh one; the process becomes its PID 1.
    New,
    /// Join the namespace behind this nsfs path (/proc/PID/ns/pid).
    Join(PathBuf),
}

/// Namespaces the process joins besides its own mount namespace.
#[derive(Debug, Clone)]
pub struct Namespaces {
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub pid: PidNs,
}

fn join(path: &PathBuf, kind: CloneFlags) -> Result<(), Error> {
    let f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    setns(&f, kind).map_err(|e| Error::sys(format!("setns {}", path.display()), e))
}

/// Starts stage 2 from a thread that first enters `ns`; registers the
/// child with the reaper before anyone can reap it.
fn spawn_in_namespaces(
    ns: &Namespaces,
    stdio: [OwnedFd; 3],
    sync: OwnedFd,
) -> Result<(i32, Arc<ExitCell>), Error> {
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(p) = &ns.ipc {
                join(p, CloneFlags::CLONE_NEWIPC)?;
            }
            if let Some(p) = &ns.uts {
                join(p, CloneFlags::CLONE_NEWUTS)?;
            }
            match &ns.pid {
                PidNs::New => unshare(CloneFlags::CLONE_NEWPID)
                    .map_err(|e| Error::sys("unshare pid namespace", e))?,
                PidNs::Join(p) => join(p, CloneFlags::CLONE_NEWPID)?,
            }
            let mut reg = reaper::registry();
            let pid = spawn_stage2(stdio, sync)?;
            Ok((pid, reaper::register(&mut reg, pid)))
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Setup("namespace thread panicked".into())))
    })
}

/// `fd` at a number above the ones it is dup2'ed onto in the child (0-3),
/// so that no dup2 there overwrites another's source.
fn above_targets(fd: OwnedFd) -> Result<OwnedFd, Error> {
    if fd.as_raw_fd() > stage2::SYNC_FD {
        return Ok(fd);
    }
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
        // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor.
        .map(|n| unsafe { OwnedFd::from_raw_fd(n) })
        .map_err(|e| Error::sys("dup container stdio", e))
}

/// posix_spawn of this binary as stage 2: stdio on 0-2, the sync socket
/// on 3, empty environment, every signal default and unblocked. glibc
/// spawns with clone(CLONE_VM|CLONE_VFORK): the child borrows the agent's
/// memory until its exec, where fork would copy the agent's page tables
/// (and take copy-on-write faults) only for exec to throw the copy away,
/// guest kernel work that PVM hosts emulate. Every other descriptor of the
/// agent is close-on-exec.
fn spawn_stage2(stdio: [OwnedFd; 3], sync: OwnedFd) -> Result<i32, Error> {
    let fds = stdio
        .into_iter()
        .chain([sync])
        .map(above_targets)
        .collect::<Result<Vec<_>, _>>()?;
    let path = c"/proc/self/exe";
    let arg = std::ffi::CString::new(stage2::ARG).expect("no NUL in the stage 2 argument");
    let argv = [
        path.as_ptr() as *mut libc::c_char,
        arg.as_ptr() as *mut _,
        std::ptr::null_mut(),
    ];
    let envp = [std::ptr::null_mut()];
    let fail = |what: &str, rc: i32| Error::io(what, std::io::Error::from_raw_os_error(rc));
    // SAFETY: the file actions and attributes are initialised before use
    // and destroyed once; every pointer passed lives across the call.
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut actions);
        libc::posix_spawnattr_init(&mut attr);
        let mut rc = 0;
        for (target, fd) in fds.iter().enumerate() {
            if rc == 0 {
                rc = libc::posix_spawn_file_actions_adddup2(
                    &mut actions,
                    fd.as_raw_fd(),
                    target as i32,
                );
            }
        }
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigemptyset(&mut none);
        if rc == 0 {
            rc = libc::posix_spawnattr_setsigdefault(&mut attr, &all);
        }
        if rc == 0 {
            rc = libc::posix_spawnattr_setsigmask(&mut attr, &none);
        }
        if rc == 0 {
            let flags = libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETSIGMASK;
            rc = libc::posix_spawnattr_setflags(&mut attr, flags as libc::c_short);
        }
        let mut pid: libc::pid_t = 0;
        let result = if rc != 0 {
            Err(fail("prepare stage 2 spawn", rc))
        } else {
            match libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                &actions,
                &attr,
                argv.as_ptr(),
                envp.as_ptr(),
            ) {
                0 => Ok(pid),
                rc => Err(fail("spawn container setup process", rc)),
            }
        };
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        result
    }
}

/// Spawns stage 2 for `cfg`, waits until it reports its setup done (it
/// then waits for `Process::start`). On any error the helper is killed.
pub fn spawn(
    ns: &Namespaces,
    cgroup: &Cgroup,
    terminal: bool,
    cfg: &InitConfig,
) -> Result<Process, Error> {
    let (io, child_fds) = ProcessIo::new(terminal)?;
    let (mut ours, theirs) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
    let (pid, exit) = spawn_in_namespaces(ns, child_fds, theirs.into())?;
    let sync = ours
        .try_clone()
        .map_err(|e| Error::io("dup sync socket", e));
    let proc_ = match sync {
        Ok(sync) => Process::new(pid, exit, io, sync),
        Err(e) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(e);
        }
    };
    let setup = (|| {
        // Into the cgroup before it runs any container code, so limits
        // and OOM accounting cover everything it does.
        cgroup.add_pid(pid)?;
        let mut line = serde_json::to_vec(cfg)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode process config: {e}")))?;
        line.push(b'\n');
        ours.write_all(&line)
            .map_err(|e| Error::io("send config to container setup", e))?;
        read_status(&mut ours)
    })();
    match setup {
        Ok(()) => Ok(proc_),
        Err(error) => {
            if !proc_.kill_and_wait(std::time::Duration::from_secs(5)) {
                log::error!("container helper {pid} did not exit after SIGKILL");
            }
            Err(error)
        }
    }
}

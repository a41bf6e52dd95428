//! Starts stage 2 (this binary re-executed with `stage2::ARG`) in the right
//! namespaces, puts it in its cgroup and hands it its InitConfig.
//!
//! The agent is multi-threaded, so the namespace changes that can only
//! affect a whole process (mount) are left to stage 2, which is a fresh
//! single-threaded process. IPC, UTS and "PID namespace for children" are
//! per-thread, so a short-lived thread joins those and forks: the child
//! inherits them while the agent's other threads are untouched.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
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

/// Forks `cmd` from a thread that first enters `ns`; registers the child
/// with the reaper before anyone can reap it.
pub fn fork_in_namespaces(
    ns: &Namespaces,
    mut cmd: Command,
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
            spawn_registered(&mut cmd)
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Setup("namespace thread panicked".into())))
    })
}

/// Spawns `cmd` and registers the child with the reaper under its lock.
pub fn spawn_registered(cmd: &mut Command) -> Result<(i32, Arc<ExitCell>), Error> {
    let mut reg = reaper::registry();
    let child = cmd
        .spawn()
        .map_err(|e| Error::io("spawn helper process", e))?;
    let pid = child.id() as i32;
    // The reaper thread collects the status; std's Child is not used to
    // wait.
    drop(child);
    Ok((pid, reaper::register(&mut reg, pid)))
}

/// Builds the command that re-executes this binary as stage 2 with the
/// given stdio and the sync socket as fd 3.
fn stage2_command(stdio: [OwnedFd; 3], sync: OwnedFd) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(stage2::ARG).env_clear();
    let [i, o, e] = stdio;
    cmd.stdin(Stdio::from(i))
        .stdout(Stdio::from(o))
        .stderr(Stdio::from(e));
    let fd = sync.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &sync;
            if fd == stage2::SYNC_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, stage2::SYNC_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
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
    let (pid, exit) = fork_in_namespaces(ns, stage2_command(child_fds, theirs.into()))?;
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

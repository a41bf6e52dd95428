//! Containers from OCI specs: namespaces, mounts, cgroups, processes and
//! stdio. Knows nothing about ttrpc; `rpc` maps `Error` onto status codes.

pub mod cgroup;
pub mod mounts;
pub mod process;
pub mod seccomp;
pub mod spawn;
pub mod stage2;
pub mod stdio;

use std::path::PathBuf;

use oci_spec::runtime::{Process as OciProcess, Spec};
use serde::{Deserialize, Serialize};

/// Everything that can go wrong; the variant decides the ttrpc code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client sent something that cannot be honoured.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is valid but the object is in the wrong state.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The in-container setup (mounts, pivot_root, user, exec) failed.
    #[error("container setup failed: {0}")]
    Setup(String),
    #[error("cleanup failed: {0}")]
    Cleanup(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::errno::Errno,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn sys(context: impl Into<String>, source: nix::errno::Errno) -> Error {
        Error::Sys {
            context: context.into(),
            source,
        }
    }
}

/// What the re-executed helper (stage 2) must do; sent to it as one JSON
/// line on its sync socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    pub mode: InitMode,
    pub process: OciProcess,
    /// The container's seccomp profile, compiled by the agent; installed
    /// by stage 2 right before execve (also for exec'd processes, as runc).
    #[serde(default)]
    pub seccomp: Option<seccomp::Program>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum InitMode {
    /// A new container: new mount namespace, rootfs, pivot_root.
    Create { rootfs: PathBuf, spec: Box<Spec> },
    /// A process inside the container whose init has this (agent) PID.
    Exec { target_pid: i32 },
}

/// Container and exec ids end up in cgroup paths and log lines: keep them
/// to a safe alphabet.
pub fn validate_id(kind: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !id.starts_with('.')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{kind} {id:?} must be 1-128 characters of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )))
    }
}

/// Checks the parts of a process description stage 2 relies on.
pub fn validate_process(p: &OciProcess) -> Result<(), Error> {
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => {
            return Err(Error::InvalidArgument(
                "process.args must name a program".into(),
            ))
        }
    }
    if !p.cwd().is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "process.cwd {:?} must be absolute",
            p.cwd()
        )));
    }
    for arg in p.args().iter().flatten().chain(p.env().iter().flatten()) {
        if arg.contains('\0') {
            return Err(Error::InvalidArgument(
                "process args and env must not contain NUL".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("container", "web-1.a_b").is_ok());
        for bad in ["", "../x", "a/b", ".x", "-x", "a b"] {
            assert!(validate_id("container", bad).is_err(), "{bad:?}");
        }
    }
}

//! Why a pod's VM did not come up, and which ttrpc code containerd gets.

use std::path::PathBuf;

use containerd_shim::protos::ttrpc::Code;
use thiserror::Error;

use super::state_dir::StateDirError;

#[derive(Debug, Error)]
pub enum VmmError {
    #[error("no {binary} beside {shim} or on PATH")]
    NoVmm { binary: &'static str, shim: PathBuf },
    #[error("podbox config key `virtiofsd`: {0} is not a file")]
    NoVirtiofsd(PathBuf),
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding the agent's ready socket {path}: {source}")]
    ReadySocket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a pod's VM did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("the pod's host cgroup: {0}")]
    Cgroup(#[from] super::cgroup::CgroupError),
    #[error("booting the pod VM: {reason}\n--- podbox-vmm ---\n{vmm_log}\n--- guest console ---\n{console}")]
    NoAgent {
        reason: String,
        vmm_log: String,
        console: String,
    },
}

impl BootError {
    /// The ttrpc code containerd gets: the pod's own fault, the node's
    /// set-up, or a VM that did not come up.
    pub fn code(&self) -> Code {
        match self {
            BootError::StateDir(StateDirError::BadId(_)) => Code::INVALID_ARGUMENT,
            BootError::Vmm(VmmError::NoVmm { .. } | VmmError::NoVirtiofsd(_)) => {
                Code::FAILED_PRECONDITION
            }
            _ => Code::INTERNAL,
        }
    }
}

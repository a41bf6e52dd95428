//! What starting or driving a [`Containerd`](super::Containerd) can fail with.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use thiserror::Error;

use crate::cri::CriError;
use crate::oci_image::ImageError;

#[derive(Debug, Error)]
pub enum ContainerdError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("containerd exited during startup ({status}); its log:\n{log}")]
    ExitedEarly { status: ExitStatus, log: String },
    #[error(
        "containerd's CRI plugin was not ready within {timeout:?} (last: {last}); its log:\n{log}"
    )]
    NotReady {
        timeout: Duration,
        last: String,
        log: String,
    },
    #[error("`ctr {args}` failed ({status}): {stderr}")]
    Ctr {
        args: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("restarting containerd: {0}")]
    Restart(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Cri(#[from] CriError),
}

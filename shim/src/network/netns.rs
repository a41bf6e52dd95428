//! The pod's network namespace: which one the OCI spec asks for, holding
//! it by a descriptor, and running netlink work inside it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::NetworkError;

/// The network namespace a container's spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSource {
    /// One that exists (a CRI pod's, made by containerd, CNI already run).
    Path(PathBuf),
    /// A new one (`ctr run`: CNI, if any, runs after the task exists, in
    /// `/proc/<task pid>/ns/net`, which is the VMM's and so this one).
    New,
}

impl NetnsSource {
    /// From `linux.namespaces`; no network entry is the host's network,
    /// which a pod in a VM cannot have.
    pub fn from_spec(spec: &Spec) -> Result<NetnsSource, NetworkError> {
        let network = spec
            .linux()
            .as_ref()
            .and_then(|linux| linux.namespaces().as_ref())
            .and_then(|namespaces| {
                namespaces
                    .iter()
                    .find(|n| n.typ() == LinuxNamespaceType::Network)
            })
            .ok_or(NetworkError::HostNetwork)?;
        Ok(match network.path() {
            Some(path) if !path.as_os_str().is_empty() => NetnsSource::Path(path.clone()),
            _ => NetnsSource::New,
        })
    }
}

/// A network namespace held open (it lives at least as long as this).
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    /// Made by the shim (not CNI's): nothing outside the pod knows it.
    pub created: bool,
    /// Where it came from, for messages.
    pub origin: String,
}

impl Netns {
    pub fn open_or_create(source: &NetnsSource) -> Result<Netns, NetworkError> {
        match source {
            NetnsSource::Path(path) => Netns::open(path),
            NetnsSource::New => Netns::create(),
        }
    }

    pub fn open(path: &Path) -> Result<Netns, NetworkError> {
        let fd: OwnedFd = std::fs::File::open(path)
            .map_err(|source| NetworkError::OpenNetns {
                path: path.to_path_buf(),
                source,
            })?
            .into();
        // A path that is no network namespace fails setns later, with a
        // worse message; check now.
        run_in(fd.as_fd(), || Ok(())).map_err(|e| NetworkError::OpenNetns {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Netns {
            fd,
            created: false,
            origin: path.display().to_string(),
        })
    }

    /// A new, empty one (loopback only), held by its descriptor alone: no
    /// bind mount, so nothing of it outlives the shim and the VMM.
    pub fn create() -> Result<Netns, NetworkError> {
        let fd = std::thread::spawn(|| -> Result<OwnedFd, NetworkError> {
            // The thread is discarded after: only it enters the new netns.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetworkError::CreateNetns(e.into()))?;
            let own = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(NetworkError::CreateNetns)?;
            Ok(own.into())
        })
        .join()
        .map_err(|_| NetworkError::CreateNetns(std::io::Error::other("netns thread panicked")))??;
        Ok(Netns {
            fd,
            created: true,
            origin: "a network namespace of the pod's own".into(),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A path naming it while the shim lives (its descriptor in /proc):
    /// tests name it in specs and nsenter.
    #[cfg(test)]
    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }

    /// Runs `f` on a thread of its own that has entered this namespace
    /// (a netlink socket opened there stays in it).
    pub fn run<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, NetworkError> + Send,
    ) -> Result<T, NetworkError> {
        run_in(self.fd(), f)
    }

    /// Whether `path` names this namespace (same nsfs inode).
    pub fn is(&self, path: &Path) -> Result<bool, std::io::Error> {
        let theirs = std::fs::metadata(path)?;
        let ours = nix::sys::stat::fstat(self.fd.as_raw_fd()).map_err(std::io::Error::from)?;
        Ok(theirs.dev() == ours.st_dev as u64 && theirs.ino() == ours.st_ino)
    }
}

fn run_in<T: Send>(
    netns: BorrowedFd<'_>,
    f: impl FnOnce() -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Only this scoped thread moves; it ends with `f`.
                nix::sched::setns(netns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetworkError::EnterNetns(e.into()))?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetworkError::EnterNetns(std::io::Error::other(
                    "netns thread panicked",
                )))
            })
    })
}

//! A pod's state directory on the host, and the virtio-fs share in it that
//! carries container root filesystems and volumes into the guest.
//!
//! Layout of `/run/podbox/<namespace>/<pod-id>/` (mode 0700, as are
//! `/run/podbox` and each namespace's directory: keyed by the containerd
//! namespace, so same-id pods in two namespaces never share state):
//!
//! ```text
//! vsock.sock      podbox-vmm's hybrid vsock socket (the agent is behind it)
//! vsock.sock_1025 where the agent's ready call arrives (bound by the shim
//!                 before the VMM starts; podbox_agent_client::ReadyListener)
//! virtiofsd.sock  virtiofsd's vhost-user socket
//! staging/        the share's directory tree as the shim builds it: mount
//!                 points for container root filesystems (<cid>/rootfs) and
//!                 volumes (<cid>/mounts/N); never exported to the guest
//! share/          a read-only, nosuid, nodev bind mount of staging/ with
//!                 shared propagation, served by virtiofsd and mounted in the
//!                 guest at GUEST_SHARE; the rootfs and volume mounts are made
//!                 here, each with its own flags, so the guest can write
//!                 inside a rootfs or a rw volume but can neither create,
//!                 rename nor replace anything of the tree around them
//! console.log     the guest's serial console (size-capped, rotated to .1)
//! vmm.log         podbox-vmm's stdout and stderr (size-capped, rotated to .1)
//! vmm.pid         podbox-vmm's pid (for tests that kill it, and for humans)
//! ```
//!
//! [`StateDir::remove`] takes all of it down again, mounts first.
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use thiserror::Error;

use crate::hostfs;

/// Where pods keep their state on the host.
pub const STATE_ROOT: &str = "/run/podbox";
/// The virtio-fs tag of the share, and where the agent mounts it in the guest.
pub const SHARE_TAG: &str = "podbox";
pub const GUEST_SHARE: &str = "/run/podbox/shared";

#[derive(Debug, Error)]
pub enum StateDirError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("pod id {0:?} cannot name a directory")]
    BadId(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateDirError + 'a {
    move |source| StateDirError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> StateDirError + 'a {
    move |source| StateDirError::Sys {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The pod's directory under [`STATE_ROOT`].
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

/// containerd's names ([A-Za-z0-9_.-]) and nothing else: a slash or ".."
/// could make a path escape [`STATE_ROOT`].
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

impl StateDir {
    /// `/run/podbox/<namespace>/<pod_id>`.
    pub fn for_pod(namespace: &str, pod_id: &str) -> Result<StateDir, StateDirError> {
        Self::under(Path::new(STATE_ROOT), namespace, pod_id)
    }

    /// The same layout under another root (tests).
    pub fn under(root: &Path, namespace: &str, pod_id: &str) -> Result<StateDir, StateDirError> {
        for name in [namespace, pod_id] {
            if !is_plain_name(name) {
                return Err(StateDirError::BadId(name.to_string()));
            }
        }
        Ok(StateDir {
            dir: root.join(namespace).join(pod_id),
        })
    }

    /// `<namespace>-<pod_id>.profile`: the pod's guest profile's name in
    /// the node's `guest_profile_dir` (outside the state directory, which
    /// goes with the pod).
    pub fn profile_file_name(&self) -> String {
        let mut parts = self.dir.iter().rev().take(2).map(|p| p.to_string_lossy());
        let pod = parts.next().unwrap_or_default();
        let namespace = parts.next().unwrap_or_default();
        format!("{namespace}-{pod}.profile")
    }

    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn fs_socket(&self) -> PathBuf {
        self.dir.join("virtiofsd.sock")
    }
    /// The tree the shim creates mount points in (never seen by the guest).
    pub fn staging(&self) -> PathBuf {
        self.dir.join("staging")
    }
    /// The read-only view of [`Self::staging`] that virtiofsd serves.
    pub fn share(&self) -> PathBuf {
        self.dir.join("share")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn vmm_pid_file(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }

    /// Creates the directory (0700 up to the state root) and the share: a
    /// read-only, nosuid, nodev bind of `staging/` (itself a private mount)
    /// with shared propagation of its own.
    /// virtiofsd runs in its own mount namespace (a slave copy of ours),
    /// and only a shared mount lets the rootfs and volume mounts the shim
    /// makes under it later reach virtiofsd's view.
    pub fn create(&self) -> Result<(), StateDirError> {
        let mut private = std::fs::DirBuilder::new();
        private.mode(0o700);
        for dir in self
            .dir
            .ancestors()
            .take(3)
            .collect::<Vec<_>>()
            .iter()
            .rev()
        {
            match private.create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("creating", dir)(e)),
            }
            refuse_symlink(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("restricting", dir))?;
        }
        let (staging, share) = (self.staging(), self.share());
        let mut public = std::fs::DirBuilder::new();
        public.mode(0o755);
        public.create(&staging).map_err(io("creating", &staging))?;
        public.create(&share).map_err(io("creating", &share))?;
        let none = None::<&str>;
        // staging/ becomes a private mount of its own first: otherwise the
        // share would join the peer group of whatever mount staging/ is on
        // (on systemd hosts "/" and /run are shared), and a snapshot
        // mounted in staging/ would propagate into the share, unrestricted,
        // before it is attached there restricted.
        mount(Some(&staging), &staging, none, MsFlags::MS_BIND, none)
            .map_err(sys("bind-mounting", &staging))?;
        mount(none, &staging, none, MsFlags::MS_PRIVATE, none)
            .map_err(sys("making a private mount of", &staging))?;
        mount(Some(&staging), &share, none, MsFlags::MS_BIND, none)
            .map_err(sys("bind-mounting", &share))?;
        let read_only = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(none, &share, none, read_only, none).map_err(sys("making read-only", &share))?;
        mount(none, &share, none, MsFlags::MS_SHARED, none)
            .map_err(sys("making a shared mount of", &share))?;
        Ok(())
    }

    /// Unmounts everything under the directory (deepest first), then removes
    /// it unless something is still mounted there: a volume's host data is
    /// never deleted, whatever the guest did. Safe to call more than once.
    pub fn remove(&self) -> Vec<String> {
        let mut problems = hostfs::unmount_all_under(&self.dir);
        if problems.is_empty() {
            if let Err(e) = hostfs::remove_tree(&self.dir) {
                problems.push(e);
            }
            // The namespace's directory goes with its last pod.
            if let Some(namespace_dir) = self.dir.parent() {
                let _ = std::fs::remove_dir(namespace_dir);
            }
        } else {
            problems.push(format!("left {} in place", self.dir.display()));
        }
        problems
    }
}

/// State directories are created by root under root-owned /run; one that
/// is a symlink was planted and is not followed.
fn refuse_symlink(dir: &Path) -> Result<(), StateDirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io("inspecting", dir))?;
    if meta.file_type().is_symlink() {
        return Err(StateDirError::Io {
            what: "refusing the symlink",
            path: dir.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ids_that_could_escape_the_state_root_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(256)] {
            assert!(
                matches!(
                    StateDir::for_pod("default", bad),
                    Err(StateDirError::BadId(_))
                ),
                "{bad:?}"
            );
            assert!(
                matches!(StateDir::for_pod(bad, "pod"), Err(StateDirError::BadId(_))),
                "namespace {bad:?}"
            );
        }
        let state = StateDir::for_pod("k8s.io", "pod-1_a.b").expect("valid id");
        assert_eq!(state.dir, Path::new("/run/podbox/k8s.io/pod-1_a.b"));
        assert_eq!(
            state.share(),
            Path::new("/run/podbox/k8s.io/pod-1_a.b/share")
        );
        let other = StateDir::for_pod("default", "pod-1_a.b").expect("valid id");
        assert_ne!(
            state.dir, other.dir,
            "same id, other namespace: other state"
        );
    }
}

//! A container's files on their way into the guest: the bundle's root
//! filesystem (containerd's snapshot mounts) and the spec's bind-mounted
//! volumes are mounted under the pod's virtio-fs share, and the OCI spec is
//! rewritten so that every host path in it becomes the path the agent sees.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount as ContainerdMount;
use std::os::unix::fs::OpenOptionsExt;

use oci_spec::runtime::{Mount, Root, Spec};
use thiserror::Error;

use podbox_mountfd::tree::Tree;

use crate::hostfs;
use crate::sandbox::state_dir::{StateDir, GUEST_SHARE};

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting {source_desc} on {target}: {reason}")]
    Mount {
        source_desc: String,
        target: PathBuf,
        reason: String,
    },
    #[error("the bundle's OCI spec {path}: {reason}")]
    Spec { path: PathBuf, reason: String },
}

/// Where one container's files live: its mount points in the pod's
/// staging tree (host-only), the same tree as the guest-facing share, and
/// in the guest.
#[derive(Debug, Clone)]
pub struct ContainerShare {
    /// `staging/<cid>`: where the shim creates mount points.
    pub staging_dir: PathBuf,
    /// `share/<cid>`: where the mounts go (read-only around them).
    pub host_dir: PathBuf,
    pub guest_dir: PathBuf,
}

impl ContainerShare {
    pub fn new(state: &StateDir, container_id: &str) -> Self {
        ContainerShare {
            staging_dir: state.staging().join(container_id),
            host_dir: state.share().join(container_id),
            guest_dir: Path::new(GUEST_SHARE).join(container_id),
        }
    }
    pub fn host_rootfs(&self) -> PathBuf {
        self.host_dir.join("rootfs")
    }
    pub fn guest_rootfs(&self) -> PathBuf {
        self.guest_dir.join("rootfs")
    }

    /// Everything the container needs in the share, from the bundle: its
    /// root filesystem and the spec's volumes mounted there, and the spec
    /// rewritten for the guest (see [`rewrite_spec`]).
    /// `spec` is the bundle's (see [`crate::spec::load`]).
    pub async fn prepare(
        &self,
        mounts: &[ContainerdMount],
        bundle: &Path,
        mut spec: Spec,
    ) -> Result<Spec, RootfsError> {
        let read_only = spec
            .root()
            .as_ref()
            .and_then(|root| root.readonly())
            .unwrap_or(false);
        // Read before the rewrite: a bind's kind comes from its host source.
        let destinations = read_only.then(|| mount_destinations(&spec));
        let volumes = rewrite_spec(&mut spec, self).map_err(|reason| RootfsError::Spec {
            path: bundle.join("config.json"),
            reason,
        })?;
        self.mount_rootfs(mounts, bundle, destinations.as_deref())
            .await?;
        for volume in volumes {
            self.mount_volume(&volume)?;
        }
        Ok(spec)
    }

    /// Mounts the container's root filesystem at `<share>/<id>/rootfs`:
    /// containerd's snapshot mounts when it sent some, else the bundle's
    /// `rootfs` directory (a bundle already mounted; never a symlink, see
    /// [`bundle_rootfs`]). A spec's `root.path` other than `rootfs` (`ctr
    /// run --rootfs DIR` writes DIR there) is refused before this
    /// ([`crate::spec::check`]): it is not what would be served.
    /// Snapshot mounts are made in the private staging tree first and then
    /// attached to the share nosuid and nodev (see
    /// [`hostfs::attach_restricted`]): the guest decides what its own mount
    /// honours, but neither virtiofsd nor any host process may open a
    /// device node or run a setuid file that the image or the guest put
    /// there. With `read_only` (the spec's `root.readonly`: the mount
    /// destinations to create first) it is attached read-only as well.
    async fn mount_rootfs(
        &self,
        mounts: &[ContainerdMount],
        bundle: &Path,
        read_only: Option<&[Destination]>,
    ) -> Result<(), RootfsError> {
        let staged = self.staging_dir.join("rootfs");
        create_dirs(&staged)?;
        let target = self.host_rootfs();
        let attach = |source: &Path, recursive| {
            if let Some(destinations) = read_only {
                create_destinations(source, destinations)?;
            }
            hostfs::attach_restricted(source, &target, recursive, read_only.is_some()).map_err(
                |reason| RootfsError::Mount {
                    source_desc: source.display().to_string(),
                    target: target.clone(),
                    reason,
                },
            )
        };
        if mounts.is_empty() {
            return attach(&bundle_rootfs(bundle)?, false);
        }
        for m in mounts {
            containerd_shim::util::mount_rootfs(m, &staged)
                .await
                .map_err(|e| RootfsError::Mount {
                    source_desc: format!("{} ({})", m.source, m.type_),
                    target: staged.clone(),
                    reason: e.to_string(),
                })?;
        }
        let attached = attach(&staged, true);
        // The staging copy has served its purpose either way (what fails
        // here, remove() retries).
        for problem in hostfs::unmount_all_under(&staged) {
            tracing::warn!("unmounting the staged rootfs: {problem}");
        }
        attached
    }

    /// Binds a host volume into the share: nosuid, nodev, and read-only on
    /// the host too where the spec says `ro`, so that no guest can write
    /// it through virtio-fs.
    fn mount_volume(&self, volume: &Volume) -> Result<(), RootfsError> {
        prepare_point(&volume.host_source, &volume.staging_path)?;
        hostfs::attach_restricted(
            &volume.host_source,
            &volume.share_path,
            volume.mode.recursive,
            volume.mode.read_only,
        )
        .map_err(|reason| RootfsError::Mount {
            source_desc: volume.host_source.display().to_string(),
            target: volume.share_path.clone(),
            reason,
        })
    }

    /// Takes down everything mounted for this container and, unless
    /// something stayed mounted, its mount points.
    pub fn remove(&self) -> Vec<String> {
        // The staging tree too: a snapshot whose attach failed stays there.
        let mut problems = hostfs::unmount_all_under(&self.host_dir);
        problems.extend(hostfs::unmount_all_under(&self.staging_dir));
        if problems.is_empty() {
            if let Err(e) = hostfs::remove_tree(&self.staging_dir) {
                problems.push(e);
            }
        } else {
            problems.push(format!("left {} in place", self.staging_dir.display()));
        }
        problems
    }
}

/// The bundle's `rootfs` directory, which the share serves when
/// containerd sent no snapshot mounts. A symlink there is refused: the
/// bind would follow it and give the guest whatever it points at.
fn bundle_rootfs(bundle: &Path) -> Result<PathBuf, RootfsError> {
    let rootfs = bundle.join("rootfs");
    let refused = |reason: String| RootfsError::Spec {
        path: bundle.join("config.json"),
        reason: format!("root.path rootfs: {} {reason}", rootfs.display()),
    };
    match std::fs::symlink_metadata(&rootfs) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(&rootfs).unwrap_or_default();
            Err(refused(format!(
                "is a symlink (to {}); the rootfs must be the bundle's own directory",
                target.display()
            )))
        }
        Ok(meta) if !meta.is_dir() => Err(refused("is not a directory".to_string())),
        Ok(_) => Ok(rootfs),
        Err(e) => Err(refused(e.to_string())),
    }
}

/// A mount destination of the spec (absolute, inside the container), and
/// whether it is a file (a bind of anything but a directory: a file, a
/// socket, a device) rather than a directory.
pub type Destination = (PathBuf, bool);

/// Every mount destination of `spec`, with its kind.
fn mount_destinations(spec: &Spec) -> Vec<Destination> {
    spec.mounts()
        .iter()
        .flatten()
        .map(|m| {
            let is_file = is_bind(m) && m.source().as_ref().is_some_and(|source| !source.is_dir());
            (m.destination().clone(), is_file)
        })
        .collect()
}

/// The spec's mounts, checked before anything is mounted; each error names
/// `mounts[N]` and the field:
/// - every destination is an absolute path without `..` (the agent
///   resolves it inside the container's root either way, but such a
///   destination is a mistake or an attempt, never what a caller meant);
/// - a bind's source (other than `/dev/shm`, which becomes a guest tmpfs)
///   is an absolute path without `..` that exists, and what it resolves to
///   (symlinks followed) is not under `/run/podbox`: the pods' shares,
///   agent sockets and VM state there are never any guest's volume.
///
/// A relative source would be taken from the shim's working directory,
/// which is a bundle but not necessarily this container's.
pub fn check_mounts(spec: &Spec) -> Result<(), String> {
    let has_parent = |p: &Path| {
        p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    };
    for (index, m) in spec.mounts().iter().flatten().enumerate() {
        let destination = m.destination();
        if !destination.is_absolute() {
            return Err(format!(
                "mounts[{index}].destination {}: not an absolute path",
                destination.display()
            ));
        }
        if has_parent(destination) {
            return Err(format!(
                "mounts[{index}].destination {}: a `..` component",
                destination.display()
            ));
        }
        if !is_bind(m) || destination == Path::new("/dev/shm") {
            continue;
        }
        let Some(source) = m.source().as_ref() else {
            return Err(format!(
                "mounts[{index}].source: bind mount on {} has no source",
                destination.display()
            ));
        };
        let bad = |reason: String| format!("mounts[{index}].source {}: {reason}", source.display());
        if !source.is_absolute() {
            return Err(bad("not an absolute path".to_string()));
        }
        if has_parent(source) {
            return Err(bad(
                "a `..` component (give the volume's own path)".to_string()
            ));
        }
        let resolved = source
            .canonicalize()
            .map_err(|e| bad(format!("cannot be resolved: {e}")))?;
        let state_root = Path::new(crate::sandbox::state_dir::STATE_ROOT);
        if resolved.starts_with(state_root) {
            return Err(bad(format!(
                "resolves to {}, inside {}: podbox's own state (pod shares, agent sockets) is no volume",
                resolved.display(),
                state_root.display()
            )));
        }
    }
    Ok(())
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// Creates the mount destinations inside a root filesystem that is about
/// to be attached read-only (the agent cannot create them later). Through
/// the image's own symlinks, but never out of it (see podbox_mountfd::tree).
fn create_destinations(rootfs: &Path, destinations: &[Destination]) -> Result<(), RootfsError> {
    let failed = |reason: String| RootfsError::Mount {
        source_desc: "the spec's mount destinations".to_string(),
        target: rootfs.to_path_buf(),
        reason,
    };
    let tree = Tree::open(rootfs).map_err(failed)?;
    for (destination, is_file) in destinations {
        let created = if *is_file {
            tree.file(destination)
        } else {
            tree.dir(destination)
        };
        created.map_err(failed)?;
    }
    Ok(())
}

/// A host path the spec bind-mounts, and where it goes in the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host_source: PathBuf,
    /// The mount point, created in the staging tree...
    pub staging_path: PathBuf,
    /// ...and the same point in the share, where the bind goes.
    pub share_path: PathBuf,
    pub mode: BindMode,
}

/// How a bind mount is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BindMode {
    /// `ro` in the spec: read-only on the host side as well, so the guest
    /// cannot write the host's files through virtio-fs whatever it does.
    pub read_only: bool,
    /// `rbind`: mounts below the source come along (restricted too).
    pub recursive: bool,
}

/// Rewrites `spec` for the agent and returns the volumes to bind into the share:
/// - `root.path` becomes the rootfs in the guest share;
/// - bind mounts of host paths get their source moved into the share
///   (`<id>/mounts/<n>`); `/dev/shm` becomes a guest tmpfs instead, since a
///   host tmpfs seen through virtio-fs would be neither fast nor shared memory;
/// - namespace paths are dropped (they name host namespaces; the agent puts
///   the container into the pod's namespaces in the guest);
/// - hooks are dropped (they are host programs).
pub fn rewrite_spec(spec: &mut Spec, share: &ContainerShare) -> Result<Vec<Volume>, String> {
    // Not Root::default(): that one is read-only.
    let mut root = spec.root().clone().unwrap_or_else(|| {
        let mut root = Root::default();
        root.set_readonly(None);
        root
    });
    root.set_path(share.guest_rootfs());
    spec.set_root(Some(root));
    spec.set_hooks(None);
    if let Some(namespaces) = spec
        .linux_mut()
        .as_mut()
        .and_then(|linux| linux.namespaces_mut().as_mut())
    {
        for namespace in namespaces {
            namespace.set_path(None);
        }
    }
    let mut volumes = Vec::new();
    for (index, m) in spec.mounts_mut().iter_mut().flatten().enumerate() {
        if !is_bind(m) {
            continue;
        }
        if m.destination() == Path::new("/dev/shm") {
            m.set_typ(Some("tmpfs".into()));
            m.set_source(Some("shm".into()));
            m.set_options(Some(
                ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                    .map(String::from)
                    .to_vec(),
            ));
            continue;
        }
        let source = m.source().clone().ok_or(format!(
            "mounts[{index}]: bind mount on {} has no source",
            m.destination().display()
        ))?;
        let options = m.options().clone().unwrap_or_default();
        let name = format!("{index}");
        volumes.push(Volume {
            host_source: source,
            staging_path: share.staging_dir.join("mounts").join(&name),
            share_path: share.host_dir.join("mounts").join(&name),
            mode: BindMode {
                read_only: options.iter().any(|o| o == "ro"),
                recursive: options.iter().any(|o| o == "rbind"),
            },
        });
        m.set_source(Some(share.guest_dir.join("mounts").join(&name)));
    }
    Ok(volumes)
}

fn create_dirs(dir: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(dir).map_err(|source| RootfsError::Io {
        what: "creating",
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates the mount point for `source` in the staging tree, as the same
/// kind of thing (directory or file). The staging tree is the shim's own:
/// the guest sees it only through the read-only share, so nothing in
/// these paths can have been planted.
fn prepare_point(source: &Path, point: &Path) -> Result<(), RootfsError> {
    let meta = std::fs::metadata(source).map_err(|e| RootfsError::Io {
        what: "reading",
        path: source.to_path_buf(),
        source: e,
    })?;
    if meta.is_dir() {
        return create_dirs(point);
    }
    if let Some(parent) = point.parent() {
        create_dirs(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(point)
        .map(drop)
        .map_err(|source| RootfsError::Io {
            what: "creating",
            path: point.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_in_the_spec_become_guest_share_paths() {
        let state = StateDir::for_pod("ns", "pod").expect("valid ids");
        let share = ContainerShare::new(&state, "c1");
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": false},
            "hooks": {"createRuntime": [{"path": "/usr/bin/hook"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/containerd/hosts", "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/shm", "options": ["rbind"]},
                {"destination": "/data", "source": "/srv/data", "options": ["bind"]}
            ],
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "mount"}]}
        }))
        .expect("a valid spec");
        let volumes = rewrite_spec(&mut spec, &share).expect("rewrites");
        let spec = serde_json::to_value(&spec).expect("serialises");
        assert_eq!(spec["root"]["path"], "/run/podbox/shared/c1/rootfs");
        assert!(spec.get("hooks").is_none(), "host hooks are dropped");
        assert_eq!(spec["mounts"][0]["source"], "proc", "non-bind mounts stay");
        assert_eq!(
            spec["mounts"][1]["source"],
            "/run/podbox/shared/c1/mounts/1"
        );
        assert_eq!(
            spec["mounts"][2]["type"], "tmpfs",
            "/dev/shm is a guest tmpfs"
        );
        assert_eq!(
            spec["mounts"][3]["source"],
            "/run/podbox/shared/c1/mounts/3"
        );
        assert!(
            spec["linux"]["namespaces"][0].get("path").is_none(),
            "host namespace paths are dropped"
        );
        assert_eq!(
            volumes,
            vec![
                Volume {
                    host_source: "/var/lib/containerd/hosts".into(),
                    staging_path: "/run/podbox/ns/pod/staging/c1/mounts/1".into(),
                    share_path: "/run/podbox/ns/pod/share/c1/mounts/1".into(),
                    mode: BindMode {
                        read_only: true,
                        recursive: true
                    },
                },
                Volume {
                    host_source: "/srv/data".into(),
                    staging_path: "/run/podbox/ns/pod/staging/c1/mounts/3".into(),
                    share_path: "/run/podbox/ns/pod/share/c1/mounts/3".into(),
                    mode: BindMode::default(),
                },
            ]
        );
    }

    #[test]
    fn mounts_that_escape_or_cannot_be_bound_are_refused_naming_them() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).expect("mkdir");
        let into_state = tmp.path().join("into-state");
        std::os::unix::fs::symlink("/run/podbox", &into_state).expect("symlink");
        let spec_with = |m: serde_json::Value| -> Spec {
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2", "mounts": [m]}))
                .expect("a valid spec")
        };
        let bind = |source: &str, destination: &str| {
            spec_with(serde_json::json!({
                "destination": destination, "type": "bind", "source": source, "options": ["rbind"]
            }))
        };
        let volume_path = volume.display().to_string();
        assert_eq!(check_mounts(&bind(&volume_path, "/data")), Ok(()));
        // /dev/shm's source is never bound (it becomes a guest tmpfs).
        assert_eq!(check_mounts(&bind("/nonexistent", "/dev/shm")), Ok(()));
        let dotdot = format!("{volume_path}/../volume");
        let missing = format!("{volume_path}/absent");
        let via_link = into_state.display().to_string();
        for (spec, expected) in [
            (
                bind(&volume_path, "/a/../../etc"),
                "mounts[0].destination /a/../../etc: a `..`",
            ),
            (
                bind("volume", "/data"),
                "mounts[0].source volume: not an absolute path",
            ),
            (bind(&dotdot, "/data"), "a `..` component"),
            (bind(&missing, "/data"), "cannot be resolved"),
            (bind("/run/podbox", "/data"), "podbox's own state"),
            (bind(&via_link, "/data"), "podbox's own state"),
        ] {
            let error = check_mounts(&spec).expect_err(expected);
            assert!(
                error.starts_with("mounts[0].") && error.contains(expected),
                "{expected}: {error}"
            );
        }
    }

    #[test]
    fn a_bundle_rootfs_that_is_a_symlink_is_refused() {
        let bundle = tempfile::tempdir().expect("temp dir");
        let error = bundle_rootfs(bundle.path()).expect_err("absent");
        assert!(error.to_string().contains("root.path rootfs"), "{error}");
        std::os::unix::fs::symlink("/", bundle.path().join("rootfs")).expect("symlink");
        let error = bundle_rootfs(bundle.path()).expect_err("a symlink to /");
        assert!(error.to_string().contains("is a symlink (to /)"), "{error}");
        std::fs::remove_file(bundle.path().join("rootfs")).expect("rm");
        std::fs::create_dir(bundle.path().join("rootfs")).expect("mkdir");
        assert_eq!(
            bundle_rootfs(bundle.path()).expect("a directory"),
            bundle.path().join("rootfs")
        );
    }

    #[test]
    fn a_bind_mount_without_a_source_is_refused_naming_it() {
        let share = ContainerShare::new(&StateDir::for_pod("ns", "p").expect("valid"), "c");
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [{"destination": "/x", "type": "bind"}]
        }))
        .expect("a valid spec");
        let error = rewrite_spec(&mut spec, &share).expect_err("no source");
        assert!(error.starts_with("mounts[0]: bind mount on /x"), "{error}");
    }
}

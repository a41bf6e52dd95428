//! Host-side path operations on trees that the guest can write into.
//!
//! The guest writes container root filesystems and volumes through
//! virtio-fs, so below a pod's share any path component may be a symlink
//! or be renamed at any moment. Everything here therefore walks one
//! component at a time with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! and acts on the file descriptor it got, never on a path string that the
//! kernel would resolve again:
//!
//! - [`mount_points`] reads mountinfo as bytes (a guest may name a directory
//!   with any bytes but `/` and NUL), with [`podbox_mountfd::mountinfo`];
//! - [`unmount_beneath`] unmounts a mount point reached that way;
//! - [`remove_tree`] deletes a tree without following a symlink and without
//!   ever descending into a mount (`RESOLVE_NO_XDEV`), so whatever was left
//!   mounted by mistake keeps every byte.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::unistd::{unlinkat, UnlinkatFlags};
use podbox_mountfd::{mountinfo, Attrs, Detached};

/// How deep [`remove_tree`] goes: the state directory's own layout is a
/// few levels deep; anything deeper is not ours to delete.
const MAX_REMOVE_DEPTH: usize = 64;

/// Mount points of this mount namespace, from /proc/self/mountinfo, as
/// the bytes the kernel wrote (decoded from its octal escapes; see
/// [`podbox_mountfd::mountinfo`]).
pub fn mount_points() -> Vec<PathBuf> {
    mountinfo::read(None)
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

/// Mount points at or below `dir`, deepest first (a point with stacked
/// mounts once).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

fn beneath(extra: ResolveFlag) -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | extra
}

fn open_at(dir: RawFd, name: &Path, flags: OFlag, resolve: ResolveFlag) -> nix::Result<OwnedFd> {
    // No O_NOFOLLOW: with it a trailing symlink would be opened as itself
    // instead of being refused by RESOLVE_NO_SYMLINKS (ELOOP).
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(resolve);
    let fd = openat2(dir, name, how)?;
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `path` (at or below `root`) as an O_PATH descriptor, one component
/// at a time so that neither a symlink anywhere nor a path longer than
/// PATH_MAX can redirect or stop it. `root` itself is trusted (host-owned).
pub fn open_beneath(root: &Path, path: &Path) -> Result<OwnedFd, String> {
    let relative = path
        .strip_prefix(root)
        .map_err(|_| format!("{} is not below {}", path.to_string_lossy(), root.display()))?;
    let mut fd = std::fs::File::open(root)
        .map(OwnedFd::from)
        .map_err(|e| format!("opening {}: {e}", root.display()))?;
    for component in relative.components() {
        let Component::Normal(name) = component else {
            return Err(format!(
                "{} has a non-plain component",
                path.to_string_lossy()
            ));
        };
        fd = open_at(
            fd.as_raw_fd(),
            Path::new(name),
            OFlag::O_PATH,
            beneath(ResolveFlag::empty()),
        )
        .map_err(|e| {
            format!(
                "resolving {} beneath {}: {e}",
                path.to_string_lossy(),
                root.display()
            )
        })?;
    }
    Ok(fd)
}

/// Unmounts (lazily) the mount at `point` below `root`, reached without
/// following a symlink: the kernel unmounts what the descriptor names, so a
/// guest that renames or swaps a component meanwhile cannot make it
/// unmount something else.
pub fn unmount_beneath(root: &Path, point: &Path) -> Result<(), String> {
    let fd = open_beneath(root, point)?;
    let fd_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    umount2(fd_path.as_str(), MntFlags::MNT_DETACH)
        .map_err(|e| format!("unmounting {}: {e}", point.to_string_lossy()))
}

/// How many times [`unmount_all_under`] goes over what is left: each pass
/// takes off the top mount of every stack.
const MAX_UNMOUNT_PASSES: usize = 16;

/// Unmounts everything mounted at or below `dir` (deepest first, and
/// stacked mounts one by one) and returns what went wrong, with what is
/// still mounted.
pub fn unmount_all_under(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for _ in 0..MAX_UNMOUNT_PASSES {
        let points = mounts_under(dir);
        if points.is_empty() {
            return Vec::new();
        }
        problems = points
            .iter()
            .filter_map(|point| unmount_beneath(dir, point).err())
            .collect();
    }
    for left in mounts_under(dir) {
        problems.push(format!("still mounted: {}", left.to_string_lossy()));
    }
    problems
}

/// Deletes `dir` and everything in it, without following a symlink and
/// without crossing into a mount: a mount point (even a bind mount of the
/// same filesystem) makes it stop with an error, leaving the mount's
/// contents untouched. A missing `dir` is not an error.
pub fn remove_tree(dir: &Path) -> Result<(), String> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(format!("refusing to remove {}", dir.display()));
    };
    let parent_fd = match std::fs::File::open(parent) {
        Ok(f) => OwnedFd::from(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("opening {}: {e}", parent.display())),
    };
    remove_entry(&parent_fd, Path::new(name), dir, 0)
}

fn remove_entry(parent: &OwnedFd, name: &Path, shown: &Path, depth: usize) -> Result<(), String> {
    let no_xdev = beneath(ResolveFlag::RESOLVE_NO_XDEV);
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    match open_at(parent.as_raw_fd(), name, flags, no_xdev) {
        Ok(dir) => {
            if depth >= MAX_REMOVE_DEPTH {
                return Err(format!(
                    "not removing {}: deeper than expected",
                    shown.display()
                ));
            }
            for child in list(&dir).map_err(|e| format!("listing {}: {e}", shown.display()))? {
                remove_entry(&dir, Path::new(&child), &shown.join(&child), depth + 1)?;
            }
            unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
                .map_err(|e| format!("removing {}: {e}", shown.display()))
        }
        Err(Errno::ENOENT) => Ok(()),
        // Not a directory (or a symlink to one): unlink the entry itself.
        Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => {
            match unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(format!("removing {}: {e}", shown.display())),
            }
        }
        Err(Errno::EXDEV) => Err(format!(
            "not removing {}: something is mounted there",
            shown.display()
        )),
        Err(e) => Err(format!("opening {}: {e}", shown.display())),
    }
}

/// The names in an open directory.
fn list(dir: &OwnedFd) -> std::io::Result<Vec<OsString>> {
    std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect()
}

/// Mounts `source` at `target` so that the mount, and every copy mount
/// propagation makes of it (virtiofsd's, in its own namespace), is
/// nosuid and nodev (and read-only when asked) from its first moment: the
/// tree is cloned detached, restricted (on the whole tree when
/// `recursive`) and only then attached (see [`podbox_mountfd`]). A remount
/// after a plain bind would change the host's copy only, and leave
/// virtiofsd's as it was. `target` is in the shim's own tree.
pub fn attach_restricted(
    source: &Path,
    target: &Path,
    recursive: bool,
    read_only: bool,
) -> Result<(), String> {
    let mut set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if read_only {
        set |= libc::MOUNT_ATTR_RDONLY;
    }
    let tree = Detached::bind(source, recursive)
        .map_err(|e| format!("cloning the mount at {}: {e}", source.display()))?;
    tree.set_attrs(Attrs { set, clear: 0 }, recursive)
        .map_err(|e| format!("restricting the mount of {}: {e}", source.display()))?;
    // A clone of a shared mount is a peer of it: mounts the host makes
    // under the source later would reach the share with their own flags.
    // Private, it gets a peer group of its own when attached under the
    // (shared) share, which still carries it to virtiofsd.
    tree.set_propagation(libc::MS_PRIVATE, recursive)
        .map_err(|e| format!("making the mount of {} private: {e}", source.display()))?;
    let attach_error = |e: std::io::Error| {
        format!(
            "attaching {} at {}: {e}",
            source.display(),
            target.display()
        )
    };
    let target = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(target)
        .map_err(attach_error)?;
    tree.attach(target.as_fd()).map_err(attach_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn open_beneath_refuses_symlinks_in_any_component() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::os::unix::fs::symlink("/", root.join("link")).expect("symlink");
        assert!(open_beneath(root, &root.join("a/b")).is_ok());
        assert!(open_beneath(root, &root.join("link")).is_err());
        assert!(open_beneath(root, &root.join("link/etc")).is_err());
        assert!(open_beneath(root, Path::new("/etc")).is_err());
    }

    #[test]
    fn remove_tree_deletes_files_and_symlinks_but_not_their_targets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"x").expect("write");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
        std::fs::write(tree.join("a/b/f"), b"y").expect("write");
        std::os::unix::fs::symlink(&outside, tree.join("a/to-outside")).expect("symlink");
        let odd = OsString::from_vec(b"\xff\xfe-not-utf8".to_vec());
        std::fs::create_dir(tree.join(&odd)).expect("mkdir");
        remove_tree(&tree).expect("removes");
        assert!(!tree.exists());
        assert!(outside.join("keep").exists(), "the symlink's target stays");
        remove_tree(&tree).expect("a missing tree is fine");
    }
}

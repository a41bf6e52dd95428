//! Lookups and creations inside a root someone else can write (a
//! container's rootfs, from the agent; a staged image, from the shim):
//! every path goes through one `pathrs::Root` (openat2 RESOLVE_IN_ROOT, as
//! runc does), so a symlink can only lead back inside the root, and what
//! comes back is a descriptor to mount on, never a path to look up again.
//! Errors are strings naming the path under the root.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use pathrs::error::{Error as PathError, ErrorKind};
use pathrs::flags::OpenFlags;
use pathrs::{Handle, InodeType, Root};

use crate::Detached;

type R<T> = Result<T, String>;

/// How many dangling symlinks in a row [`Tree::file`] follows.
const MAX_LINK_HOPS: usize = 8;
/// How often a lookup is retried when the kernel reports a racing rename
/// or mount (EAGAIN); pathrs's resolver gives up after as many.
const LOOKUP_RETRIES: usize = 128;

/// Where the symlink at `at` (absolute, inside the root) points, as an
/// absolute path inside the root: relative to its directory, and `..`
/// never above "/" (the root is "/" for everything in it).
fn link_target(at: &Path, link: &Path) -> PathBuf {
    let start = if link.is_absolute() {
        PathBuf::from("/")
    } else {
        at.parent().unwrap_or(Path::new("/")).to_path_buf()
    };
    let mut target = PathBuf::from("/");
    for component in start.components().chain(link.components()) {
        match component {
            Component::Normal(name) => target.push(name),
            Component::ParentDir => {
                target.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    target
}

/// `dest` (absolute, inside the container) as a path under `rootfs`, for
/// messages: lookups go through `Tree`. `..` and relative paths are
/// refused outright.
pub fn in_root(rootfs: &Path, dest: &Path) -> R<PathBuf> {
    if !dest.is_absolute() || dest.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "mount destination {} must be absolute without '..'",
            dest.display()
        ));
    }
    Ok(rootfs.join(dest.strip_prefix("/").unwrap_or(dest)))
}

/// `e` with its causes: pathrs puts the failing syscall and errno there.
fn why(e: &PathError) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s = format!("{s}: {c}");
        cause = c.source();
    }
    s
}

fn errno(e: &PathError) -> Option<i32> {
    match e.kind() {
        ErrorKind::OsError(n) => n,
        _ => None,
    }
}

/// The container's rootfs: its path, for messages, and the pathrs root
/// that every lookup under it goes through.
pub struct Tree {
    path: PathBuf,
    root: Root,
}

impl Tree {
    /// The root's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open(path: &Path) -> R<Tree> {
        let root =
            Root::open(path).map_err(|e| format!("open rootfs {}: {}", path.display(), why(&e)))?;
        Ok(Tree {
            path: path.to_path_buf(),
            root,
        })
    }

    /// `dest` as a directory, created (with its parents) if missing.
    ///
    /// Looked up first: most destinations exist (/proc, /dev, /sys in an
    /// image). Missing ones are made one component at a time with
    /// `Root::create`, every lookup still inside the root. pathrs's
    /// `mkdir_all` would re-open what it finds through its private procfs,
    /// ~30 syscalls each time, guest kernel work that PVM hosts emulate.
    pub fn dir(&self, dest: &Path) -> R<Handle> {
        let host = in_root(&self.path, dest)?;
        let fail = |e: &PathError| format!("create directory {}: {}", host.display(), why(e));
        let dest: PathBuf = dest
            .components()
            .filter(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            .collect();
        let lookup = |p: &Path| {
            self.lookup(p)
                .map_err(|e| format!("resolve {}: {e}", host.display()))
        };
        let found = match lookup(&dest)? {
            Some(h) => h,
            None => {
                // The deepest ancestor that exists, then the rest made below it.
                let mut absent = vec![dest.as_path()];
                for a in dest.ancestors().skip(1) {
                    if a == Path::new("/") || lookup(a)?.is_some() {
                        break;
                    }
                    absent.push(a);
                }
                let perm = InodeType::Directory(std::fs::Permissions::from_mode(0o755));
                for a in absent.into_iter().rev() {
                    match self.root.create(a, &perm) {
                        Err(e) if errno(&e) != Some(libc::EEXIST) => return Err(fail(&e)),
                        _ => {}
                    }
                }
                self.root.resolve(&dest).map_err(|e| fail(&e))?
            }
        };
        match crate::is_dir(found.as_fd()) {
            Ok(true) => Ok(found),
            Ok(false) => Err(format!("{} exists and is not a directory", host.display())),
            Err(e) => Err(format!("stat {}: {e}", host.display())),
        }
    }

    /// `dest` as a file, created empty (and its parent directories) if
    /// missing. A dangling symlink at `dest` (images have them, e.g.
    /// /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf) gets
    /// its target created, inside the root, as runc does.
    pub fn file(&self, dest: &Path) -> R<Handle> {
        self.file_through_links(dest, 0)
    }

    fn file_through_links(&self, dest: &Path, hops: usize) -> R<Handle> {
        let host = in_root(&self.path, dest)?;
        // Most destinations exist (an image's /etc/hosts): one lookup.
        if let Ok(Some(found)) = self.lookup(dest) {
            return Ok(found);
        }
        if let Some(parent) = dest.parent() {
            self.dir(parent)?;
        }
        // O_EXCL|O_NOFOLLOW: never open, let alone create through, a
        // symlink someone put at `dest`; an existing entry is resolved
        // (inside the root) below.
        let flags = OpenFlags::O_EXCL | OpenFlags::O_NOFOLLOW;
        match self
            .root
            .create_file(dest, flags, &std::fs::Permissions::from_mode(0o644))
        {
            Ok(_) => {}
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(format!("create file {}: {}", host.display(), why(&e))),
        }
        match self.root.resolve(dest) {
            Err(e) if errno(&e) == Some(libc::ENOENT) && hops < MAX_LINK_HOPS => {
                let link = self
                    .root
                    .readlink(dest)
                    .map_err(|e| format!("resolve {}: {}", host.display(), why(&e)))?;
                self.file_through_links(&link_target(dest, &link), hops + 1)
            }
            resolved => resolved.map_err(|e| format!("resolve {}: {}", host.display(), why(&e))),
        }
    }

    /// `dest` if it exists (symlinks followed, inside the root).
    pub fn existing(&self, dest: &Path) -> R<Option<Handle>> {
        let host = in_root(&self.path, dest)?;
        match self.lookup(dest) {
            Err(nix::errno::Errno::ENOTDIR) => Ok(None),
            found => found.map_err(|e| format!("resolve {}: {e}", host.display())),
        }
    }

    /// `dest` resolved inside the root (symlinks followed, never out of
    /// it), or None where it does not exist: the one openat2 that pathrs's
    /// kernel resolver makes (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS),
    /// without the error pathrs builds for a miss, which names the root by
    /// reading its /proc/thread-self/fd link (eight more syscalls; many
    /// lookups of a container's setup miss, e.g. masked paths).
    fn lookup(&self, dest: &Path) -> Result<Option<Handle>, nix::errno::Errno> {
        use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // RESOLVE_IN_ROOT fails with EAGAIN when a rename or mount anywhere
        // races a lookup through a `..` (e.g. /var/run -> ../run); the
        // kernel asks for a retry, as pathrs's resolver does.
        let mut tries = 0;
        loop {
            match openat2(self.root.as_fd().as_raw_fd(), dest, how) {
                // SAFETY: openat2 just returned this descriptor; nothing else owns it.
                Ok(fd) => return Ok(Some(Handle::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))),
                Err(nix::errno::Errno::ENOENT) => return Ok(None),
                Err(nix::errno::Errno::EAGAIN) if tries < LOOKUP_RETRIES => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// A symlink at `dest` pointing to `to`, unless `dest` exists.
    pub fn symlink(&self, dest: &Path, to: &str) -> R<()> {
        let host = in_root(&self.path, dest)?;
        match self.root.create(dest, &InodeType::Symlink(to.into())) {
            Err(e) if errno(&e) != Some(libc::EEXIST) => {
                Err(format!("symlink {}: {}", host.display(), why(&e)))
            }
            _ => Ok(()),
        }
    }

    /// Attaches `m` (made from `what`) onto `target`, which is `dest`.
    pub fn attach(&self, m: Detached, target: &Handle, what: &str, dest: &Path) -> R<()> {
        let host = in_root(&self.path, dest)?;
        m.attach(target.as_fd())
            .map_err(|e| format!("mount {what} on {}: {e}", host.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_stay_in_root() {
        let t = |at: &str, link: &str| link_target(Path::new(at), Path::new(link));
        assert_eq!(
            t("/etc/resolv.conf", "../run/x.conf"),
            PathBuf::from("/run/x.conf")
        );
        assert_eq!(
            t("/etc/a", "../../../../etc/passwd"),
            PathBuf::from("/etc/passwd")
        );
        assert_eq!(t("/etc/a", "/srv/./b"), PathBuf::from("/srv/b"));
        assert_eq!(t("/a", "b"), PathBuf::from("/b"));
    }

    #[test]
    fn a_dangling_symlink_gets_its_target_created_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir(root.join("etc")).expect("mkdir");
        std::os::unix::fs::symlink("../run/stub.conf", root.join("etc/resolv.conf")).expect("ln");
        std::os::unix::fs::symlink("/podbox-outside-test", root.join("etc/abs")).expect("ln");
        let tree = Tree::open(root).expect("open");
        tree.file(Path::new("/etc/resolv.conf"))
            .expect("created through the link");
        assert!(root.join("run/stub.conf").is_file());
        tree.file(Path::new("/etc/abs"))
            .expect("created inside the root");
        assert!(root.join("podbox-outside-test").is_file());
        assert!(!Path::new("/podbox-outside-test").exists());
    }

    /// A lookup through a `..` symlink while renames run elsewhere: the
    /// kernel's EAGAIN is retried, never an error.
    #[test]
    fn lookups_through_dotdot_links_survive_racing_renames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("run/secrets")).expect("mkdir");
        std::fs::create_dir(root.join("var")).expect("mkdir");
        std::os::unix::fs::symlink("../run", root.join("var/run")).expect("ln");
        let tree = Tree::open(&root).expect("open");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for i in 0..4 {
                let (stop, scratch) = (&stop, dir.path().join(format!("r{i}")));
                s.spawn(move || {
                    std::fs::write(&scratch, b"").expect("scratch file");
                    let other = scratch.with_extension("b");
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = std::fs::rename(&scratch, &other);
                        let _ = std::fs::rename(&other, &scratch);
                    }
                });
            }
            let failures = (0..20_000)
                .filter(|_| {
                    tree.dir(Path::new("/var/run/secrets")).is_err()
                        || !matches!(tree.existing(Path::new("/var/run/secrets")), Ok(Some(_)))
                })
                .count();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(failures, 0, "lookups failed under racing renames");
        });
    }

    #[test]
    fn destinations_stay_in_root() {
        assert!(in_root(Path::new("/r"), Path::new("/../etc")).is_err());
        assert!(in_root(Path::new("/r"), Path::new("etc")).is_err());
        assert_eq!(
            in_root(Path::new("/r"), Path::new("/proc")).unwrap(),
            PathBuf::from("/r/proc")
        );
    }
}

//! podbox-vmm's own mount and IPC namespaces (issue 13, `--jail on`): once
//! the VM is built, the process's root is a read-only tmpfs that holds
//! only the directories podbox-vmm still writes in (its sockets, console
//! and profile), each bind-mounted at its own path, nosuid, nodev, noexec
//! and without the mounts below it (a pod's share, with the containers'
//! root filesystems, is an empty directory there). The kernel, initramfs,
//! /dev/kvm and taps were opened before; the host's file system is gone
//! from view, so a device-model bug the guest exploits finds nothing to
//! open but the pod's own state directory.
//!
//! Why it is done in two steps, by two threads:
//! - `unshare(CLONE_NEWNS)` must come while the process has one thread
//!   ([`Jailer::enter`], first thing in [`crate::builder::run`]): with
//!   more, only the caller would move, and threads started before would
//!   keep the host's view.
//! - The pivot must come after the setup (virtiofsd is exec'd from the
//!   host's file system, the console and sockets are created by path), and
//!   needs CAP_SYS_ADMIN, which every other thread has dropped by then. So
//!   one thread, started before the main thread drops its capabilities,
//!   keeps CAP_SYS_ADMIN alone, waits, makes the new root and
//!   `pivot_root`s into it ([`Jailer::pivot`]) and ends. Threads share
//!   their root and working directory (CLONE_FS), so all of them move.
//!
//! The namespace's mounts are made slaves of the host's: mounts the shim
//! adds under a pod's share later still reach virtiofsd (started inside
//! it, in a mount namespace of its own), and nothing done here reaches the
//! host.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use caps::{Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("podbox-vmm already runs {0} threads; its namespaces must be entered with one")]
    Threads(usize),
    #[error("{what}: {source} (podbox-vmm needs CAP_SYS_ADMIN for --jail on)")]
    Sys { what: String, source: nix::Error },
    #[error("{what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the jail thread: {0}")]
    Thread(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// The thread that keeps CAP_SYS_ADMIN until the pivot, and how to reach it.
pub struct Jailer {
    order: mpsc::Sender<Vec<PathBuf>>,
    done: mpsc::Receiver<Result<(), JailError>>,
    thread: JoinHandle<()>,
}

impl Jailer {
    /// Moves the process into new mount and IPC namespaces (mounts: slaves
    /// of the host's) and starts the jail thread. Call while the process
    /// has a single thread, before it drops its capabilities.
    pub fn enter() -> Result<Jailer, JailError> {
        let threads = std::fs::read_dir("/proc/self/task")
            .map_err(|source| JailError::Path {
                what: "listing",
                path: "/proc/self/task".into(),
                source,
            })?
            .count();
        if threads != 1 {
            return Err(JailError::Threads(threads));
        }
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC)
            .map_err(sys("unshare(CLONE_NEWNS | CLONE_NEWIPC)"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )
        .map_err(sys("making / a recursive slave"))?;
        let (order, orders) = mpsc::channel::<Vec<PathBuf>>();
        let (report, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("jail".into())
            .spawn(move || {
                let result = keep_only_sys_admin().and_then(|()| match orders.recv() {
                    Ok(dirs) => pivot_into(&dirs),
                    // run() ended before the pivot (a build error).
                    Err(_) => Ok(()),
                });
                let _ = report.send(result);
            })
            .map_err(|e| JailError::Thread(e.to_string()))?;
        Ok(Jailer {
            order,
            done,
            thread,
        })
    }

    /// Makes the new root of `dirs` (absolute, existing directories) and
    /// moves every thread into it; the jail thread ends.
    pub fn pivot(self, dirs: Vec<PathBuf>) -> Result<(), JailError> {
        tracing::info!("jail: root of {dirs:?}");
        self.order
            .send(dirs)
            .map_err(|_| JailError::Thread("ended early".into()))?;
        let result = self
            .done
            .recv()
            .map_err(|_| JailError::Thread("ended without a word".into()))?;
        self.thread
            .join()
            .map_err(|_| JailError::Thread("panicked".into()))?;
        result
    }
}

/// The jail thread gives up all but what the pivot takes.
fn keep_only_sys_admin() -> Result<(), JailError> {
    let keep: CapsHashSet = [Capability::CAP_SYS_ADMIN].into_iter().collect();
    crate::confine::set_caps(&keep)
        .map_err(|e| JailError::Thread(format!("dropping capabilities: {e}")))
}

/// A detached copy of the mount at `dir` (not of the mounts below it),
/// taken before anything is mounted over the path it was found at.
fn clone_tree(dir: &Path) -> Result<OwnedFd, JailError> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| JailError::Path {
        what: "a NUL in",
        path: dir.to_owned(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_SYMLINK_NOFOLLOW as u32;
    // SAFETY: open_tree with a valid C string; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    if fd < 0 {
        return Err(JailError::Path {
            what: "open_tree(OPEN_TREE_CLONE)",
            path: dir.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the detached tree `tree` at `target`.
fn attach_tree(tree: &OwnedFd, target: &Path) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    let to = CString::new(target.as_os_str().as_bytes()).expect("checked in clone_tree");
    // SAFETY: move_mount of our own detached tree fd to a valid C path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(JailError::Path {
            what: "move_mount",
            path: target.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

const LOCKED: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Builds the new root on a tmpfs over the temp directory (of this mount
/// namespace only), with `dirs` bind-mounted at their own paths, and
/// pivots into it; the old root is detached.
fn pivot_into(dirs: &[PathBuf]) -> Result<(), JailError> {
    let trees = dirs
        .iter()
        .map(|d| Ok((d, clone_tree(d)?)))
        .collect::<Result<Vec<_>, JailError>>()?;
    let masked = mount_points_below(dirs)?;
    let cwd = std::env::current_dir().ok();
    let root = std::env::temp_dir();
    mount(
        Some("podbox-jail"),
        &root,
        Some("tmpfs"),
        LOCKED,
        Some("mode=0755,size=1m"),
    )
    .map_err(sys(format!(
        "mounting the jail's tmpfs on {}",
        root.display()
    )))?;
    for (dir, tree) in &trees {
        let target = root.join(dir.strip_prefix("/").unwrap_or(dir));
        std::fs::create_dir_all(&target).map_err(|source| JailError::Path {
            what: "creating the jail's mount point",
            path: target.clone(),
            source,
        })?;
        attach_tree(tree, &target)?;
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | LOCKED,
            None::<&str>,
        )
        .map_err(sys(format!(
            "remounting {} nosuid,nodev,noexec",
            dir.display()
        )))?;
        // A clone keeps its original's master: host mounts made below it
        // later would appear here with their own flags.
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(sys(format!("making {} private", dir.display())))?;
    }
    for point in &masked {
        mask(&root.join(point.strip_prefix("/").unwrap_or(point)), &root)?;
    }
    mount(
        None::<&str>,
        &root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | LOCKED,
        None::<&str>,
    )
    .map_err(sys("making the jail's root read-only"))?;
    nix::unistd::chdir(&root).map_err(sys(format!("chdir {}", root.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    // Relative paths of the command line keep working where the working
    // directory is in the jail; otherwise "/" (never a directory of the
    // old root, which a kept working directory would still reach).
    let back = cwd.filter(|c| dirs.iter().any(|d| c.starts_with(d)));
    nix::unistd::chdir(back.as_deref().unwrap_or(Path::new("/"))).map_err(sys("chdir"))?;
    Ok(())
}

/// The mount points below `dirs` (the topmost ones), from this mount
/// namespace's mountinfo. The clones leave those mounts out, but what is
/// under them is still there, and it is not podbox-vmm's: a pod's
/// `staging/` holds the directories the share's mounts sit on, and the
/// kernel detaches a mount in every namespace when its directory is
/// removed or renamed over in one where it is not a mount point.
fn mount_points_below(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, JailError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read(path).map_err(|source| JailError::Path {
        what: "reading",
        path: path.to_owned(),
        source,
    })?;
    let mut points: Vec<PathBuf> = text
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| dirs.iter().any(|d| p != d && p.starts_with(d)))
        .collect();
    points.sort();
    points.dedup();
    let topmost = points
        .iter()
        .filter(|p| !points.iter().any(|o| o != *p && p.starts_with(o)))
        .cloned()
        .collect();
    Ok(topmost)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (field[i], octal) {
            (b'\\', Some(o)) => {
                out.push(o.iter().fold(0u8, |v, b| v.wrapping_mul(8) + (b - b'0')));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Covers `target` (in the jail) with something empty and read-only of
/// the jail's own, so that podbox-vmm can neither see nor remove nor
/// rename what is there: a tmpfs on a directory, an empty file of the
/// jail's `root` on a file.
fn mask(target: &Path, root: &Path) -> Result<(), JailError> {
    let is_dir = target.symlink_metadata().is_ok_and(|m| m.is_dir());
    let result = if is_dir {
        mount(
            Some("podbox-jail-mask"),
            target,
            Some("tmpfs"),
            LOCKED | MsFlags::MS_RDONLY,
            Some("mode=0555,size=4k"),
        )
    } else {
        let empty = root.join(".podbox-jail-empty");
        std::fs::write(&empty, b"").map_err(|source| JailError::Path {
            what: "creating",
            path: empty.clone(),
            source,
        })?;
        mount(
            Some(&empty),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    result.map_err(sys(format!("covering {} in the jail", target.display())))
}

/// The directories a jail holds for `paths` (files podbox-vmm creates,
/// connects to or rotates after the build): each one's parent, made
/// absolute and resolved, once each, none inside another.
pub fn dirs_of<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<Vec<PathBuf>, JailError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for path in paths {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::canonicalize(parent).map_err(|source| JailError::Path {
            what: "resolving",
            path: parent.to_owned(),
            source,
        })?;
        dirs.push(dir);
    }
    dirs.sort();
    dirs.dedup();
    // A directory inside another is reached through that one's bind.
    let outer: Vec<PathBuf> = dirs
        .iter()
        .filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o)))
        .cloned()
        .collect();
    Ok(outer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_fields_are_unescaped() {
        assert_eq!(
            unescape_mountinfo(br"/run/a\040b\011c\134d\012e"),
            PathBuf::from("/run/a b\tc\\d\ne")
        );
        assert_eq!(unescape_mountinfo(br"/x\04"), PathBuf::from(r"/x\04"));
    }

    #[test]
    fn dirs_are_parents_resolved_once_and_outermost() {
        let t = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(t.path()).unwrap();
        std::fs::create_dir(base.join("a")).unwrap();
        std::fs::create_dir(base.join("b")).unwrap();
        std::os::unix::fs::symlink(base.join("b"), base.join("link")).unwrap();
        let paths = [
            base.join("a/vsock.sock"),
            base.join("a/console.log"),
            base.join("link/x.sock"),
            base.join("a.sock"),
        ];
        let dirs = dirs_of(paths.iter().map(|p| p.as_path())).unwrap();
        // base holds a and b (the link's target), so base alone is bound.
        assert_eq!(dirs, vec![base.clone()]);
        let dirs = dirs_of([base.join("a/s").as_path(), base.join("link/s").as_path()]).unwrap();
        assert_eq!(dirs, vec![base.join("a"), base.join("b")]);
        assert!(matches!(
            dirs_of([base.join("missing/s").as_path()]),
            Err(JailError::Path { .. })
        ));
    }

    /// The whole jail in a forked child (it changes the process's
    /// namespaces and root): only the bound directory is left in view, the
    /// rest of the host is gone, nothing can be executed or created outside
    /// it, and the host's own mounts are untouched.
    #[test]
    fn a_jailed_child_sees_only_its_directories() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: the jail needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let state = std::fs::canonicalize(t.path()).unwrap().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("kept"), b"x").unwrap();
        std::fs::create_dir(state.join("share")).unwrap();
        // A mount under the bound directory stays out of the jail.
        mount(
            Some("tmpfs"),
            &state.join("share"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(state.join("share/secret"), b"s").unwrap();
        let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // SAFETY: the child only runs the closure below and _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = std::panic::catch_unwind(|| {
                    let check = |ok: bool, code: i32| {
                        if !ok {
                            // SAFETY: ends the child at once.
                            unsafe { libc::_exit(code) };
                        }
                    };
                    let jailer = Jailer::enter().expect("entering");
                    crate::confine::drop_capabilities(false).expect("dropping");
                    jailer.pivot(vec![state.clone()]).expect("pivoting");
                    check(
                        std::fs::read(state.join("kept")).is_ok_and(|b| b == b"x"),
                        10,
                    );
                    check(!state.join("share/secret").exists(), 11);
                    check(std::fs::remove_dir(state.join("share")).is_err(), 17);
                    check(std::fs::write(state.join("share/x"), b"").is_err(), 18);
                    check(!Path::new("/etc/passwd").exists(), 12);
                    check(!Path::new("/proc/self").exists(), 13);
                    check(std::fs::write("/outside", b"").is_err(), 14);
                    check(std::fs::write(state.join("new"), b"n").is_ok(), 15);
                    let names: Vec<_> = std::fs::read_dir("/").unwrap().collect();
                    check(names.len() == 1, 16);
                    0
                })
                .unwrap_or(99);
                // SAFETY: ends the forked child without running the test harness's exit.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                umount2(&state.join("share"), MntFlags::MNT_DETACH).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "the jailed child's checks (10 kept file, 11 share mount hidden, 12 host \
                     files hidden, 13 no /proc, 14 root read-only, 15 state dir writable, 16 \
                     one entry at /, 17 share removable, 18 share writable)"
                );
                assert!(state.join("new").exists(), "the write went to the real dir");
                assert_eq!(mounts_after, mounts_before, "the host's mounts changed");
            }
        }
    }
}

//! Builds a container's filesystem view inside its own mount namespace
//! (stage 2): the spec's mounts under the rootfs, a minimal /dev, masked
//! and read-only paths, then pivot_root. Errors are plain strings: they
//! travel back to the agent over the sync socket.
//!
//! The rootfs, and volumes mounted into it earlier, may be writable by
//! someone hostile (another container sharing a volume, a process exec'd
//! into a container): any directory under the rootfs can turn into a
//! symlink at any moment. So no path under the rootfs reaches the kernel
//! as a string. Each target is resolved once, inside the root, with pathrs
//! (openat2 RESOLVE_IN_ROOT: a symlink can only lead back into the
//! rootfs) into a descriptor, and each mount is built detached with its
//! final flags and attached onto that descriptor (`mountfd`).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

use podbox_mountfd::tree::{in_root, Tree};
use podbox_mountfd::{self as mountfd, Attrs, Detached};

type R<T> = Result<T, String>;

#[cfg(test)]
mod race_tests;

/// mount(2) by path: only for paths no container can change (the agent's
/// own "/", the rootfs itself, the container's "/" after pivot_root).
fn do_mount(
    src: Option<&Path>,
    dest: &Path,
    typ: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> R<()> {
    mount(src, dest, typ, flags, data).map_err(|e| {
        format!(
            "mount {} on {} (type {}, flags {:?}, data {:?}): {e}",
            src.map(|s| s.display().to_string()).unwrap_or_default(),
            dest.display(),
            typ.unwrap_or("none"),
            flags,
            data.unwrap_or("")
        )
    })
}

struct MountOpts {
    flags: MsFlags,
    propagation: MsFlags,
    data: Vec<String>,
    bind: bool,
}

fn parse_options(opts: &[String]) -> MountOpts {
    let mut m = MountOpts {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
    };
    for o in opts {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "atime" | "diratime" | "norelatime" | "defaults" => {
                (MsFlags::empty(), MsFlags::empty())
            }
            "bind" => {
                m.bind = true;
                (MsFlags::empty(), MsFlags::empty())
            }
            "rbind" => {
                m.bind = true;
                (MsFlags::MS_REC, MsFlags::empty())
            }
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" | "unbindable"
            | "runbindable" => {
                let mut p = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "slave" => MsFlags::MS_SLAVE,
                    "shared" => MsFlags::MS_SHARED,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                if o.starts_with('r') {
                    p |= MsFlags::MS_REC;
                }
                m.propagation = p;
                (MsFlags::empty(), MsFlags::empty())
            }
            _ => {
                m.data.push(o.clone());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        m.flags = (m.flags | set) & !clear;
    }
    m
}

/// The per-mount attributes `flags` ask for. `clear` holds what a bind
/// remount with these flags would reset (MS_BIND|MS_REMOUNT replaces the
/// mount's flags; atime only when one is named), `set` the rest.
fn mount_attrs(flags: MsFlags) -> Attrs {
    let mut a = Attrs {
        set: 0,
        clear: libc::MOUNT_ATTR_RDONLY
            | libc::MOUNT_ATTR_NOSUID
            | libc::MOUNT_ATTR_NODEV
            | libc::MOUNT_ATTR_NOEXEC,
    };
    for (ms, attr) in [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, libc::MOUNT_ATTR_NODIRATIME),
    ] {
        if flags.contains(ms) {
            a.set |= attr;
        }
    }
    let atime = MsFlags::MS_NOATIME
        | MsFlags::MS_RELATIME
        | MsFlags::MS_STRICTATIME
        | MsFlags::MS_NODIRATIME;
    if flags.intersects(atime) {
        a.clear |= libc::MOUNT_ATTR__ATIME | libc::MOUNT_ATTR_NODIRATIME;
        // The precedence mount(2) gives them; relatime is its default.
        a.set |= if flags.contains(MsFlags::MS_STRICTATIME) {
            libc::MOUNT_ATTR_STRICTATIME
        } else if flags.contains(MsFlags::MS_NOATIME) {
            libc::MOUNT_ATTR_NOATIME
        } else {
            libc::MOUNT_ATTR_RELATIME
        };
    }
    a
}

fn set_propagation(m: &Detached, opts: &MountOpts, dest: &Path) -> R<()> {
    let p = opts.propagation;
    if p.is_empty() {
        return Ok(());
    }
    let recursive = p.contains(MsFlags::MS_REC);
    let bits = (p & !MsFlags::MS_REC).bits();
    m.set_propagation(bits, recursive).map_err(|e| {
        format!(
            "set propagation {p:?} of the mount on {}: {e}",
            dest.display()
        )
    })
}

fn mount_one(tree: &Tree, mnt: &Mount) -> R<()> {
    in_root(tree.path(), mnt.destination())?;
    let typ = mnt.typ().as_deref().unwrap_or("");
    let opts = parse_options(mnt.options().as_deref().unwrap_or(&[]));
    if opts.bind || typ == "bind" {
        bind_mount(tree, mnt, &opts)
    } else {
        fs_mount(tree, mnt, typ, &opts)
    }
}

fn bind_mount(tree: &Tree, mnt: &Mount, opts: &MountOpts) -> R<()> {
    let dest = mnt.destination();
    let src = mnt
        .source()
        .as_deref()
        .ok_or_else(|| format!("bind mount on {} has no source", dest.display()))?;
    let src_err = |e: std::io::Error| format!("bind mount source {}: {e}", src.display());
    let m = Detached::bind(src, opts.flags.contains(MsFlags::MS_REC)).map_err(src_err)?;
    // A bind mount keeps the source's flags unless the spec names some;
    // then they replace them, as the classic MS_BIND|MS_REMOUNT would.
    let flags = opts.flags & !MsFlags::MS_REC;
    if !flags.is_empty() {
        m.set_attrs(mount_attrs(flags), false).map_err(|e| {
            format!(
                "set flags {flags:?} of the mount on {}: {e}",
                dest.display()
            )
        })?;
    }
    set_propagation(&m, opts, dest)?;
    // The source's type, from the copy itself: a path can change, it can't.
    let target = if m.is_dir().map_err(src_err)? {
        tree.dir(dest)?
    } else {
        tree.file(dest)?
    };
    tree.attach(m, &target, &src.display().to_string(), dest)
}

/// Superblock flags, which mount(2) takes as MS_* bits, as the options
/// the fd-based API takes them as.
fn sb_options(flags: MsFlags) -> impl Iterator<Item = String> {
    [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_SYNCHRONOUS, "sync"),
        (MsFlags::MS_DIRSYNC, "dirsync"),
    ]
    .into_iter()
    .filter(move |(ms, _)| flags.contains(*ms))
    .map(|(_, o)| o.to_string())
}

fn fs_mount(tree: &Tree, mnt: &Mount, typ: &str, opts: &MountOpts) -> R<()> {
    let dest = mnt.destination();
    let attrs = mount_attrs(opts.flags).set;
    if typ == "cgroup" || typ == "cgroup2" {
        let target = tree.dir(dest)?;
        // Best effort: the container sees its own cgroup (stage 2
        // entered a cgroup namespace) where cgroup2 is usable.
        let sb: Vec<String> = sb_options(opts.flags).collect();
        if let Ok(m) = Detached::new_fs("cgroup2", Path::new("cgroup2"), &sb, attrs) {
            let _ = m.attach(target.as_fd());
        }
        return Ok(());
    }
    if typ.is_empty() {
        return Err(format!("mount on {} has no type", dest.display()));
    }
    let src = mnt.source().clone().unwrap_or_else(|| PathBuf::from(typ));
    let options: Vec<String> = sb_options(opts.flags)
        .chain(opts.data.iter().cloned())
        .collect();
    let m = Detached::new_fs(typ, &src, &options, attrs).map_err(|e| {
        format!(
            "mount {} on {} (type {typ}, flags {:?}, options {options:?}): {e}",
            src.display(),
            dest.display(),
            opts.flags
        )
    })?;
    set_propagation(&m, opts, dest)?;
    let target = tree.dir(dest)?;
    tree.attach(m, &target, &src.display().to_string(), dest)
}

/// Device nodes every container gets when the spec mounts a tmpfs /dev:
/// bind mounts of the agent's own nodes (no mknod needed).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn populate_dev(tree: &Tree) -> R<()> {
    for name in DEVICES {
        let node = Path::new("/dev").join(name);
        let m = match Detached::bind(&node, false) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("bind mount source {}: {e}", node.display())),
        };
        // `node` names the same path inside the container.
        let target = tree.file(&node)?;
        tree.attach(m, &target, &node.display().to_string(), &node)?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        tree.symlink(&Path::new("/dev").join(link), to)?;
    }
    Ok(())
}

fn pivot_root(rootfs: &Path) -> R<()> {
    // pivot_root(".", ".") stacks the old root under the new one; a lazy
    // unmount of "." then drops the old root without a temporary dir.
    nix::unistd::chdir(rootfs).map_err(|e| format!("chdir {}: {e}", rootfs.display()))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?
        }
        // The guest agent's own root is the initramfs (rootfs), which
        // pivot_root refuses to move. Do what runc's --no-pivot does: move
        // the container root over "/" and chroot into it. The VM, not this
        // chroot, is the sandbox's security boundary.
        Err(nix::errno::Errno::EINVAL) => {
            do_mount(
                Some(Path::new(".")),
                Path::new("/"),
                None,
                MsFlags::MS_MOVE,
                None,
            )?;
            nix::unistd::chroot(".").map_err(|e| format!("chroot {}: {e}", rootfs.display()))?;
        }
        Err(e) => return Err(format!("pivot_root {}: {e}", rootfs.display())),
    }
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// Hides `path` (if it exists) under an empty read-only tmpfs, or the
/// agent's /dev/null for a file.
fn mask(tree: &Tree, path: &Path) -> R<()> {
    let Some(target) = tree.existing(path)? else {
        return Ok(());
    };
    let dir = mountfd::is_dir(target.as_fd())
        .map_err(|e| format!("stat masked path {}: {e}", path.display()))?;
    let (what, m) = if dir {
        let opts = ["ro".to_string(), "size=0".to_string()];
        let m = Detached::new_fs("tmpfs", Path::new("tmpfs"), &opts, libc::MOUNT_ATTR_RDONLY);
        ("tmpfs", m)
    } else {
        // The agent's node, opened by its own path: the container's
        // /dev/null could be anything.
        ("/dev/null", Detached::bind(Path::new("/dev/null"), false))
    };
    let m = m.map_err(|e| format!("mask {}: {what}: {e}", path.display()))?;
    tree.attach(m, &target, what, path)
}

/// Stacks a read-only copy of `path` (if it exists) on top of it.
fn make_readonly(tree: &Tree, path: &Path) -> R<()> {
    let Some(target) = tree.existing(path)? else {
        return Ok(());
    };
    let fail = |e: std::io::Error| format!("make {} read-only: {e}", path.display());
    // Recursive, copy and flag both: a mount below `path` must not stay
    // writable either.
    let m = Detached::bind_fd(target.as_fd(), true).map_err(fail)?;
    let ro = Attrs {
        set: libc::MOUNT_ATTR_RDONLY,
        clear: 0,
    };
    m.set_attrs(ro, true).map_err(fail)?;
    tree.attach(m, &target, &path.display().to_string(), path)
}

/// Everything under the rootfs, while it is still reachable from the
/// agent's root: the spec's mounts, /dev, masked and read-only paths.
/// Masking happens here rather than after pivot_root so that it, too,
/// goes through the rootfs handle and uses the agent's /dev/null.
fn populate(rootfs: &Path, spec: &Spec) -> R<()> {
    let tree = Tree::open(rootfs)?;
    let mut dev_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        mount_one(&tree, m)?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_tmpfs = true;
        }
    }
    if dev_tmpfs {
        populate_dev(&tree)?;
    }
    if let Some(linux) = spec.linux() {
        for p in linux.masked_paths().iter().flatten() {
            mask(&tree, Path::new(p))?;
        }
        for p in linux.readonly_paths().iter().flatten() {
            make_readonly(&tree, Path::new(p))?;
        }
    }
    Ok(())
}

/// Sets up the whole filesystem of a new container; the caller already
/// unshared the mount namespace. Afterwards "/" is the container's root.
pub fn setup_rootfs(rootfs: &Path, spec: &Spec) -> R<()> {
    // Nothing done below may leak back into the agent's namespace.
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    // pivot_root needs the new root to be a mount point; `populate` opens
    // the rootfs only after this, so it works on the mount that becomes "/".
    do_mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    populate(rootfs, spec)?;
    pivot_root(rootfs)?;
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        do_mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = parse_options(&[
            "rbind".into(),
            "ro".into(),
            "rprivate".into(),
            "mode=755".into(),
        ]);
        assert!(o.bind);
        assert!(o.flags.contains(MsFlags::MS_REC | MsFlags::MS_RDONLY));
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(o.data, vec!["mode=755".to_string()]);
    }
}

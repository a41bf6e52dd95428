//! Builds a container's filesystem view inside its own mount namespace
//! (stage 2): the spec's mounts under the rootfs, a minimal /dev,
//! pivot_root, then masked and read-only paths. Errors are plain strings:
//! they travel back to the agent over the sync socket.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};

type R<T> = Result<T, String>;

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

/// `dest` (absolute, inside the container) resolved under `rootfs`.
/// `..` is refused outright; symlinks are checked by `check_inside` once
/// the path exists.
fn in_root(rootfs: &Path, dest: &Path) -> R<PathBuf> {
    if !dest.is_absolute() || dest.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "mount destination {} must be absolute without '..'",
            dest.display()
        ));
    }
    Ok(rootfs.join(dest.strip_prefix("/").unwrap_or(dest)))
}

/// Refuses a path that a symlink in the rootfs made point outside it.
fn check_inside(rootfs: &Path, p: &Path) -> R<()> {
    let real = p
        .canonicalize()
        .map_err(|e| format!("resolve {}: {e}", p.display()))?;
    let root = rootfs
        .canonicalize()
        .map_err(|e| format!("resolve {}: {e}", rootfs.display()))?;
    if real.starts_with(&root) {
        Ok(())
    } else {
        Err(format!("{} resolves outside the rootfs", p.display()))
    }
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

fn mount_one(rootfs: &Path, mnt: &Mount) -> R<()> {
    let dest = in_root(rootfs, mnt.destination())?;
    let typ = mnt.typ().as_deref().unwrap_or("");
    let opts = parse_options(mnt.options().as_deref().unwrap_or(&[]));
    let data = opts.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());

    if opts.bind || typ == "bind" {
        let src = mnt.source().as_deref().ok_or_else(|| {
            format!(
                "bind mount on {} has no source",
                mnt.destination().display()
            )
        })?;
        let meta =
            fs::metadata(src).map_err(|e| format!("bind mount source {}: {e}", src.display()))?;
        if meta.is_dir() {
            fs::create_dir_all(&dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        } else if !dest.exists() {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| format!("create {}: {e}", parent.display()))?;
            }
            fs::File::create(&dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        }
        check_inside(rootfs, &dest)?;
        let rec = opts.flags & MsFlags::MS_REC;
        do_mount(Some(src), &dest, None, MsFlags::MS_BIND | rec, None)?;
        // Bind mounts ignore flags on the first call; they need a remount.
        let extra = opts.flags & !MsFlags::MS_REC;
        if !extra.is_empty() {
            do_mount(
                None,
                &dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None,
            )?;
        }
    } else {
        fs::create_dir_all(&dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
        check_inside(rootfs, &dest)?;
        if typ == "cgroup" || typ == "cgroup2" {
            // Best effort: the container sees its own cgroup (stage 2
            // entered a cgroup namespace) where cgroup2 is usable.
            let _ = do_mount(
                Some(Path::new("cgroup2")),
                &dest,
                Some("cgroup2"),
                opts.flags,
                None,
            );
            return Ok(());
        }
        if typ.is_empty() {
            return Err(format!(
                "mount on {} has no type",
                mnt.destination().display()
            ));
        }
        let src = mnt.source().clone().unwrap_or_else(|| PathBuf::from(typ));
        do_mount(Some(&src), &dest, Some(typ), opts.flags, data)?;
    }
    if !opts.propagation.is_empty() {
        do_mount(None, &dest, None, opts.propagation, None)?;
    }
    Ok(())
}

/// Device nodes every container gets when the spec mounts a tmpfs /dev:
/// bind mounts of the agent's own nodes (no mknod needed).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn populate_dev(rootfs: &Path) -> R<()> {
    let dev = rootfs.join("dev");
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        fs::File::create(&target).map_err(|e| format!("create {}: {e}", target.display()))?;
        do_mount(Some(&host), &target, None, MsFlags::MS_BIND, None)?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        if fs::symlink_metadata(&p).is_err() {
            symlink(to, &p).map_err(|e| format!("symlink {}: {e}", p.display()))?;
        }
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

fn mask(path: &Path) -> R<()> {
    match fs::metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => do_mount(
            Some(Path::new("tmpfs")),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0"),
        ),
        Ok(_) => do_mount(
            Some(Path::new("/dev/null")),
            path,
            None,
            MsFlags::MS_BIND,
            None,
        ),
    }
}

fn make_readonly(path: &Path) -> R<()> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    do_mount(
        Some(path),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    do_mount(
        None,
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None,
    )
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
    // pivot_root needs the new root to be a mount point.
    do_mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let mut dev_tmpfs = false;
    for m in spec.mounts().iter().flatten() {
        mount_one(rootfs, m)?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_tmpfs = true;
        }
    }
    if dev_tmpfs {
        populate_dev(rootfs)?;
    }
    pivot_root(rootfs)?;
    if let Some(linux) = spec.linux() {
        for p in linux.masked_paths().iter().flatten() {
            mask(Path::new(p))?;
        }
        for p in linux.readonly_paths().iter().flatten() {
            make_readonly(Path::new(p))?;
        }
    }
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

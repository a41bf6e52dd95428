//! Mounts as file descriptors (the kernel's fd-based mount API, Linux
//! 5.12+). A mount is built detached, gets its flags and propagation while
//! nothing can reach it, and is then attached onto a target the caller has
//! already opened. Nothing here looks a path up under a tree someone else
//! can write, so nothing can be swapped between a check and the mount; and
//! no remount is needed afterwards, which could only find the new mount by
//! looking its path up again (a remount through the target's descriptor
//! reaches the directory underneath, not the new mount: EINVAL).

pub mod mountinfo;
pub mod tree;

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// MOUNT_ATTR_* bits to set and to clear on a mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attrs {
    pub set: u64,
    pub clear: u64,
}

/// A mount attached nowhere yet; dropping it discards it.
#[derive(Debug)]
pub struct Detached(OwnedFd);

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
}

/// A syscall's return value as the new descriptor it names.
fn new_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

fn done(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `fd` (an O_PATH descriptor is fine) is a directory.
pub fn is_dir(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

impl Detached {
    /// A copy of the mount at `src` (a path the caller trusts), as
    /// `mount --bind` (`recursive`: `--rbind`) would make it.
    pub fn bind(src: &Path, recursive: bool) -> io::Result<Detached> {
        let path = cstring(src.as_os_str())?;
        Self::clone_tree(libc::AT_FDCWD, &path, 0, recursive)
    }

    /// A copy of the mount at `fd` itself, with no lookup at all.
    pub fn bind_fd(fd: BorrowedFd<'_>, recursive: bool) -> io::Result<Detached> {
        Self::clone_tree(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH as u32, recursive)
    }

    fn clone_tree(dfd: RawFd, path: &CStr, flags: u32, recursive: bool) -> io::Result<Detached> {
        let mut flags = flags | libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
        if recursive {
            flags |= libc::AT_RECURSIVE as u32;
        }
        // SAFETY: `path` is NUL-terminated and outlives the call.
        new_fd(unsafe { libc::syscall(libc::SYS_open_tree, dfd, path.as_ptr(), flags) })
            .map(Detached)
    }

    /// A new instance of filesystem `typ`. `options` are what mount(2)
    /// takes as data plus the superblock flags ("ro", "sync", ...), each
    /// `key` or `key=value` (the kernel parses mount(2) data the same way);
    /// `attrs` are the MOUNT_ATTR_* bits of the mount itself.
    pub fn new_fs(
        typ: &str,
        source: &Path,
        options: &[String],
        attrs: u64,
    ) -> io::Result<Detached> {
        let name = cstring(OsStr::new(typ))?;
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let fs = new_fd(unsafe {
            libc::syscall(libc::SYS_fsopen, name.as_ptr(), libc::FSOPEN_CLOEXEC)
        })?;
        let configure = || -> io::Result<()> {
            fs_config(&fs, OsStr::new("source"), Some(source.as_os_str()))?;
            for o in options {
                match o.split_once('=') {
                    Some((k, v)) => fs_config(&fs, OsStr::new(k), Some(OsStr::new(v)))?,
                    None => fs_config(&fs, OsStr::new(o), None)?,
                }
            }
            // SAFETY: a command: key and value are null pointers, aux 0.
            done(unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fs.as_raw_fd(),
                    libc::FSCONFIG_CMD_CREATE,
                    std::ptr::null::<libc::c_char>(),
                    std::ptr::null::<libc::c_char>(),
                    0 as libc::c_int,
                )
            })
        };
        configure().map_err(|e| with_fs_log(&fs, e))?;
        // SAFETY: plain syscall on our own descriptor.
        new_fd(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                libc::FSMOUNT_CLOEXEC,
                attrs,
            )
        })
        .map(Detached)
    }

    /// Sets and clears MOUNT_ATTR_* bits (on every mount of the copy if
    /// `recursive`).
    pub fn set_attrs(&self, attrs: Attrs, recursive: bool) -> io::Result<()> {
        self.setattr(attrs.set, attrs.clear, 0, recursive)
    }

    /// Sets propagation: one of MS_PRIVATE, MS_SLAVE, MS_SHARED or
    /// MS_UNBINDABLE.
    pub fn set_propagation(&self, propagation: u64, recursive: bool) -> io::Result<()> {
        self.setattr(0, 0, propagation, recursive)
    }

    fn setattr(&self, set: u64, clear: u64, propagation: u64, recursive: bool) -> io::Result<()> {
        let attr = libc::mount_attr {
            attr_set: set,
            attr_clr: clear,
            propagation,
            userns_fd: 0,
        };
        let mut flags = libc::AT_EMPTY_PATH as u32;
        if recursive {
            flags |= libc::AT_RECURSIVE as u32;
        }
        // SAFETY: `attr` is a mount_attr of the size passed; the path is "".
        done(unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                flags,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        })
    }

    /// Whether the mount's root is a directory.
    pub fn is_dir(&self) -> io::Result<bool> {
        is_dir(self.0.as_fd())
    }

    /// Attaches the mount onto exactly the inode `target` refers to (on top
    /// of whatever is already mounted there).
    pub fn attach(self, target: BorrowedFd<'_>) -> io::Result<()> {
        let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
        // SAFETY: both paths are "" (the descriptors themselves).
        done(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                target.as_raw_fd(),
                c"".as_ptr(),
                flags,
            )
        })
    }
}

/// One fsconfig(2) option: a flag (`value` None) or a string.
fn fs_config(fs: &OwnedFd, key: &OsStr, value: Option<&OsStr>) -> io::Result<()> {
    let key_c = cstring(key)?;
    let value_c = value.map(cstring).transpose()?;
    let (cmd, value_ptr) = match &value_c {
        Some(v) => (libc::FSCONFIG_SET_STRING, v.as_ptr()),
        None => (libc::FSCONFIG_SET_FLAG, std::ptr::null()),
    };
    // SAFETY: key and value are NUL-terminated (or null for a flag) and
    // outlive the call.
    done(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key_c.as_ptr(),
            value_ptr,
            0,
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("option {:?}: {e}", key.to_string_lossy())))
}

/// `e` with the messages the filesystem left in its context's log (why
/// an option was refused), which errno alone does not say.
fn with_fs_log(fs: &OwnedFd, e: io::Error) -> io::Error {
    let mut log = Vec::new();
    let mut buf = [0u8; 512];
    // Each read returns one message; ENODATA once the log is empty.
    for _ in 0..8 {
        match nix::unistd::read(fs.as_raw_fd(), &mut buf) {
            Ok(n) if n > 0 => log.push(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
            _ => break,
        }
    }
    if log.is_empty() {
        e
    } else {
        io::Error::new(e.kind(), format!("{e} ({})", log.join("; ")))
    }
}

//! One pod's microVM on the host: its state directory, the virtio-fs share
//! that carries container root filesystems and volumes into the guest, and
//! the podbox-vmm process (which starts virtiofsd for the share and stops it
//! with the VM; if virtiofsd dies, the VMM ends the VM).
//!
//! Layout of `/run/podbox/<pod-id>/`:
//!
//! ```text
//! vsock.sock      podbox-vmm's hybrid vsock socket (the agent is behind it)
//! vsock.sock_1025 where the agent's ready call arrives (bound by the shim
//!                 before the VMM starts; podbox_agent_client::ReadyListener)
//! virtiofsd.sock  virtiofsd's vhost-user socket
//! share/          the virtio-fs share (a shared bind mount of itself), mounted
//!                 in the guest at GUEST_SHARE; share/<container-id>/rootfs is a
//!                 container's root filesystem, share/<container-id>/mounts/N its volumes
//! console.log     the guest's serial console
//! vmm.log         podbox-vmm's own stdout and stderr
//! vmm.pid         podbox-vmm's pid (for tests that kill it, and for humans)
//! ```
//!
//! [`StateDir::remove`] takes all of it down again, mounts first.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use thiserror::Error;
use tokio::process::{Child, Command};

use crate::annotations::VmSettings;

/// Where pods keep their state on the host.
pub const STATE_ROOT: &str = "/run/podbox";
/// The virtio-fs tag of the share, and where the agent mounts it in the guest.
pub const SHARE_TAG: &str = "podbox";
pub const GUEST_SHARE: &str = "/run/podbox/shared";
/// The VMM binary's name, looked up beside the shim and then on PATH.
pub const VMM_BINARY: &str = "podbox-vmm";
/// How long a booting VM may go without progress (its threads neither
/// running nor waiting to run, see `VmProgress`) before the shim gives up
/// on its agent: a guest that went idle without answering is stuck. The
/// only fixed limit is AGENT_OVERALL_LIMIT, far above any boot measured: a
/// boot is a minute of emulated kernel work on a fast PVM host and several
/// minutes on a slow or loaded one.
pub const AGENT_STALL_LIMIT: Duration = Duration::from_secs(120);
/// The longest a boot may take however busy the VM is (a guest that spins
/// for ever must not hold a pod's Create for ever): more than five times
/// the slowest pod start measured on a PVM host (169 s to a ready CRI pod
/// on a fresh machine, with two guests at once). On PVM an idle guest
/// looks busy (see MIN_BUSY_PERCENT), so this is what ends the wait for an
/// agent that is stuck there.
pub const AGENT_OVERALL_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug, Error)]
pub enum VmError {
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
    #[error("no {VMM_BINARY} beside {shim} or on PATH")]
    NoVmm { shim: PathBuf },
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("pod id {0:?} cannot name a directory")]
    BadId(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> VmError + 'a {
    move |source| VmError::Sys {
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

impl StateDir {
    pub fn for_pod(pod_id: &str) -> Result<StateDir, VmError> {
        // containerd ids are [A-Za-z0-9_.-]; anything else (a slash, "..")
        // could make the path escape STATE_ROOT.
        let valid = !pod_id.is_empty()
            && pod_id != "."
            && pod_id != ".."
            && pod_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return Err(VmError::BadId(pod_id.to_string()));
        }
        Ok(StateDir {
            dir: Path::new(STATE_ROOT).join(pod_id),
        })
    }

    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn fs_socket(&self) -> PathBuf {
        self.dir.join("virtiofsd.sock")
    }
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

    /// Creates the directory and makes the share a mount point with shared
    /// propagation: virtiofsd runs in its own mount namespace (a slave copy
    /// of ours), and only a shared mount lets the rootfs mounts the shim
    /// makes under it later reach virtiofsd's view.
    pub fn create(&self) -> Result<(), VmError> {
        let share = self.share();
        std::fs::create_dir_all(&share).map_err(io("creating", &share))?;
        mount(
            Some(&share),
            &share,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind-mounting", &share))?;
        mount(
            None::<&str>,
            &share,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(sys("making a shared mount of", &share))?;
        Ok(())
    }

    /// Unmounts everything under the share (deepest first), the share
    /// itself, and removes the directory. Safe to call more than once.
    pub fn remove(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for mount_point in mounts_under(&self.dir) {
            if let Err(e) = umount2(&mount_point, MntFlags::MNT_DETACH) {
                problems.push(format!("unmounting {}: {e}", mount_point.display()));
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        problems
    }
}

/// Mount points of this mount namespace, from /proc/self/mountinfo.
pub fn mount_points() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_field(field)))
        .collect()
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// podbox-vmm beside the running shim (where `make install` and cargo put
/// both), else on PATH.
pub fn find_vmm() -> Result<PathBuf, VmError> {
    let shim = std::env::current_exe().unwrap_or_default();
    if let Some(beside) = shim
        .parent()
        .map(|d| d.join(VMM_BINARY))
        .filter(|p| p.is_file())
    {
        return Ok(beside);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(VMM_BINARY))
        .find(|p| p.is_file())
        .ok_or(VmError::NoVmm { shim })
}

/// What the VMM needs beyond the pod's [`VmSettings`].
#[derive(Debug, Clone)]
pub struct VmLaunch {
    pub vmm: PathBuf,
    pub settings: VmSettings,
    /// virtiofsd for the share; None lets podbox-vmm find one itself.
    pub virtiofsd: Option<PathBuf>,
    /// virtiofsd's cache mode (the config's `fs_cache`).
    pub fs_cache: String,
}

/// The podbox-vmm command line for `state`.
pub fn vmm_args(launch: &VmLaunch, state: &StateDir) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    let mut args = vec![
        "--kernel".to_string(),
        path(launch.settings.kernel.clone()),
        "--initrd".into(),
        path(launch.settings.initrd.clone()),
        "--vcpus".into(),
        launch.settings.vcpus.to_string(),
        "--memory-mib".into(),
        launch.settings.memory_mib.to_string(),
        "--serial".into(),
        path(state.console_log()),
        "--vsock-socket".into(),
        path(state.vsock_socket()),
        "--shared-dir".into(),
        path(state.share()),
        "--fs-tag".into(),
        SHARE_TAG.into(),
        "--fs-socket".into(),
        path(state.fs_socket()),
        "--fs-cache".into(),
        launch.fs_cache.clone(),
    ];
    if let Some(virtiofsd) = &launch.virtiofsd {
        args.extend(["--virtiofsd".into(), path(virtiofsd.clone())]);
    }
    args
}

/// Starts podbox-vmm for the pod; its output goes to `vmm.log`. The
/// caller owns the child and must wait for it (the supervisor does).
pub fn spawn_vmm(launch: &VmLaunch, state: &StateDir) -> Result<Child, VmError> {
    let log_path = state.vmm_log();
    let log = std::fs::File::create(&log_path).map_err(io("creating", &log_path))?;
    let log_err = log.try_clone().map_err(io("duplicating", &log_path))?;
    let mut command = Command::new(&launch.vmm);
    // SAFETY: prctl is async-signal-safe. If the shim dies without tearing
    // the pod down (SIGKILL), the VMM must not outlive it.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .args(vmm_args(launch, state))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // If the shim is killed outright, the VMM goes too instead of
        // running a pod nobody can reach.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| VmError::Spawn {
            binary: launch.vmm.clone(),
            source,
        })?;
    if let Some(pid) = child.id() {
        let pid_file = state.vmm_pid_file();
        std::fs::write(&pid_file, pid.to_string()).map_err(io("writing", &pid_file))?;
    }
    Ok(child)
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ids_that_could_escape_the_state_root_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(
                matches!(StateDir::for_pod(bad), Err(VmError::BadId(_))),
                "{bad:?}"
            );
        }
        let state = StateDir::for_pod("pod-1_a.b").expect("valid id");
        assert_eq!(state.dir, Path::new("/run/podbox/pod-1_a.b"));
        assert_eq!(state.share(), Path::new("/run/podbox/pod-1_a.b/share"));
    }

    #[test]
    fn the_vmm_gets_the_pod_settings_and_the_share() {
        let launch = VmLaunch {
            vmm: "/bin/podbox-vmm".into(),
            settings: VmSettings {
                vcpus: 2,
                memory_mib: 512,
                kernel: "/k".into(),
                initrd: "/i".into(),
            },
            virtiofsd: Some("/usr/libexec/virtiofsd".into()),
            fs_cache: "always".into(),
        };
        let args = vmm_args(&launch, &StateDir::for_pod("p").expect("valid id")).join(" ");
        assert_eq!(
            args,
            "--kernel /k --initrd /i --vcpus 2 --memory-mib 512 --serial /run/podbox/p/console.log \
             --vsock-socket /run/podbox/p/vsock.sock --shared-dir /run/podbox/p/share --fs-tag podbox \
             --fs-socket /run/podbox/p/virtiofsd.sock --fs-cache always --virtiofsd /usr/libexec/virtiofsd"
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
    }
}

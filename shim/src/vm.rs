//! One pod's microVM on the host: its state directory, the virtio-fs share
//! that carries container root filesystems and volumes into the guest, and
//! the podbox-vmm process (which starts virtiofsd for the share and stops it
//! with the VM; if virtiofsd dies, the VMM ends the VM).
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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use nix::mount::{mount, MsFlags};
use thiserror::Error;
use tokio::process::{Child, Command};

pub use podbox_vmm::logfile::tail;
use podbox_vmm::logfile::RotatingLog;

use crate::annotations::VmSettings;
use crate::hostfs;

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
    #[error("the pod asks for {asked} {what}; this host can give at most {most}")]
    TooBig {
        what: &'static str,
        asked: u64,
        most: u64,
    },
}

/// Refuses a VM the host cannot give: more vCPUs than KVM supports per VM
/// (KVM_CAP_MAX_VCPUS), or more memory than the host has (MemTotal).
pub fn check_fits_host(settings: &VmSettings) -> Result<(), VmError> {
    if let Ok(kvm) = kvm_ioctls::Kvm::new() {
        let most = kvm.get_max_vcpus() as u64;
        if u64::from(settings.vcpus) > most {
            return Err(VmError::TooBig {
                what: "vCPUs",
                asked: settings.vcpus.into(),
                most,
            });
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024);
    if let Some(most) = total_mib.filter(|most| u64::from(settings.memory_mib) > *most) {
        return Err(VmError::TooBig {
            what: "MiB of memory",
            asked: settings.memory_mib.into(),
            most,
        });
    }
    Ok(())
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
    pub fn for_pod(namespace: &str, pod_id: &str) -> Result<StateDir, VmError> {
        Self::under(Path::new(STATE_ROOT), namespace, pod_id)
    }

    /// The same layout under another root (tests).
    pub fn under(root: &Path, namespace: &str, pod_id: &str) -> Result<StateDir, VmError> {
        for name in [namespace, pod_id] {
            if !is_plain_name(name) {
                return Err(VmError::BadId(name.to_string()));
            }
        }
        Ok(StateDir {
            dir: root.join(namespace).join(pod_id),
        })
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
    pub fn create(&self) -> Result<(), VmError> {
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
fn refuse_symlink(dir: &Path) -> Result<(), VmError> {
    let meta = std::fs::symlink_metadata(dir).map_err(io("inspecting", dir))?;
    if meta.file_type().is_symlink() {
        return Err(VmError::Io {
            what: "refusing the symlink",
            path: dir.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    Ok(())
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
    /// Where console.log and vmm.log rotate (the config's `log_max_bytes`):
    /// each keeps one `.1`, so a pod's logs use at most 4x this on /run.
    pub log_max_bytes: u64,
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
        "--serial-max-bytes".into(),
        launch.log_max_bytes.to_string(),
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

/// Starts podbox-vmm for the pod; its output goes to `vmm.log` (see
/// [`copy_vmm_output`]). The caller owns the child and must wait for it
/// (the supervisor does).
pub fn spawn_vmm(launch: &VmLaunch, state: &StateDir) -> Result<Child, VmError> {
    let log_path = state.vmm_log();
    let log = RotatingLog::create(&log_path, launch.log_max_bytes).map_err(|e| VmError::Io {
        what: "creating",
        path: log_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let (output, log_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("a pipe for", &log_path))?;
    let log_err = log_w.try_clone().map_err(io("duplicating", &log_path))?;
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
        .stdout(log_w)
        .stderr(log_err)
        // If the shim is killed outright, the VMM goes too instead of
        // running a pod nobody can reach.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| VmError::Spawn {
            binary: launch.vmm.clone(),
            source,
        })?;
    copy_vmm_output(std::fs::File::from(output), log);
    if let Some(pid) = child.id() {
        let pid_file = state.vmm_pid_file();
        std::fs::write(&pid_file, pid.to_string()).map_err(io("writing", &pid_file))?;
    }
    Ok(child)
}

/// Copies the VMM's stdout and stderr (and virtiofsd's, which inherits
/// them) into the size-capped log. The VMM logs what the guest makes
/// happen, so a guest must not be able to grow the file without bound.
/// The thread ends at EOF, when the VMM and virtiofsd have exited.
fn copy_vmm_output(mut output: std::fs::File, mut log: RotatingLog) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        let mut warned = false;
        loop {
            match std::io::Read::read(&mut output, &mut buffer) {
                Ok(0) => return,
                Ok(n) => {
                    // Warned once: the guest decides how often this runs.
                    if let Err(e) = std::io::Write::write_all(&mut log, &buffer[..n]) {
                        if !std::mem::replace(&mut warned, true) {
                            tracing::warn!(
                                "writing {}: {e} (further errors not logged)",
                                log.path().display()
                            );
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ids_that_could_escape_the_state_root_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(256)] {
            assert!(
                matches!(StateDir::for_pod("default", bad), Err(VmError::BadId(_))),
                "{bad:?}"
            );
            assert!(
                matches!(StateDir::for_pod(bad, "pod"), Err(VmError::BadId(_))),
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

    #[test]
    fn a_vm_larger_than_the_host_is_refused_with_the_numbers() {
        let settings = |vcpus, memory_mib| VmSettings {
            vcpus,
            memory_mib,
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        check_fits_host(&settings(1, 64)).expect("a small VM fits");
        let error = check_fits_host(&settings(1, 1_048_576)).expect_err("1 TiB does not");
        assert!(
            error
                .to_string()
                .starts_with("the pod asks for 1048576 MiB of memory"),
            "{error}"
        );
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
            log_max_bytes: 1048576,
        };
        let args = vmm_args(&launch, &StateDir::for_pod("ns", "p").expect("valid id")).join(" ");
        assert_eq!(
            args,
            "--kernel /k --initrd /i --vcpus 2 --memory-mib 512 --serial /run/podbox/ns/p/console.log --serial-max-bytes 1048576 \
             --vsock-socket /run/podbox/ns/p/vsock.sock --shared-dir /run/podbox/ns/p/share --fs-tag podbox \
             --fs-socket /run/podbox/ns/p/virtiofsd.sock --fs-cache always --virtiofsd /usr/libexec/virtiofsd"
        );
    }
}

//! The pod's VM as a podbox-vmm process: its [`VmConfig`] from the pod's
//! settings and state directory, the process (with its output copied into
//! a size-capped `vmm.log`), the supervisor that reaps it, and the wait for
//! the agent's ready call. podbox-vmm starts virtiofsd for the share and
//! stops it with the VM; if virtiofsd dies, the VMM ends the VM.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use podbox_agent_client::{AgentClient, ReadyListener, VmProgress};
pub use podbox_vmm::logfile::tail;
use podbox_vmm::logfile::RotatingLog;
use podbox_vmm_config::{
    FsBackend, FsConfig, NetBackend, NetConfig, ProfileConfig, SerialOutput, VirtiofsdSpec,
    VmConfig, VsockConfig, DEFAULT_PROFILE_HZ,
};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::cgroup::PodCgroup;
use super::state_dir::{StateDir, SHARE_TAG};
use super::{kill_vmm, BootError, Sandbox, VmLauncher, VmmError};
use crate::network::PodNetwork;
use crate::settings::config::Config;
use crate::settings::VmSettings;

/// The VMM binary's name, looked up beside the shim and then on PATH.
pub const VMM_BINARY: &str = "podbox-vmm";
/// The guest's vsock CID (each VM has its own vsock device: one CID fits all).
const GUEST_CID: u64 = 3;
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
/// Lines of the VMM log and the console a boot failure quotes.
const TAIL_LINES: usize = 20;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmmError + 'a {
    move |source| VmmError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// podbox-vmm beside the running shim (where `make install` and cargo put
/// both), else on PATH.
pub fn find_vmm() -> Result<PathBuf, VmmError> {
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
        .ok_or(VmmError::NoVmm {
            binary: VMM_BINARY,
            shim,
        })
}

/// The pod's VM: its settings, with the console, vsock and share in its
/// state directory, virtiofsd as the node's config says, and the pod's NIC
/// if it has one.
pub fn vm_config(
    settings: &VmSettings,
    config: &Config,
    state: &StateDir,
    nic: Option<NetConfig>,
) -> VmConfig {
    VmConfig {
        initrd: Some(settings.initrd.clone()),
        // Bounded by the contract's range when the settings were resolved.
        vcpus: u8::try_from(settings.vcpus).unwrap_or(u8::MAX),
        memory_mib: settings.memory_mib,
        serial: SerialOutput::File {
            path: state.console_log(),
            max_bytes: config.log_max_bytes,
        },
        vsock: Some(VsockConfig {
            cid: GUEST_CID,
            socket: state.vsock_socket(),
        }),
        fs: Some(FsConfig {
            tag: SHARE_TAG.into(),
            backend: FsBackend::Spawn(VirtiofsdSpec {
                binary: config.virtiofsd.clone(),
                socket: Some(state.fs_socket()),
                cache: config.fs_cache,
                ..VirtiofsdSpec::new(state.share())
            }),
        }),
        nics: nic.into_iter().collect(),
        balloon: config.free_page_reporting,
        guest_profile: config.guest_profile_dir.as_ref().map(|dir| ProfileConfig {
            path: dir.join(state.profile_file_name()),
            hz: DEFAULT_PROFILE_HZ,
        }),
        ..VmConfig::new(&settings.kernel)
    }
}

/// What of the pod's network the VMM's process gets: it runs in `netns`,
/// and inherits `tap` (a descriptor of the shim's, close-on-exec there).
#[derive(Clone, Copy)]
struct VmmNetwork {
    netns: RawFd,
    tap: Option<RawFd>,
}

/// The VMM's place on the host besides its netns: the pod's cgroup, as
/// descriptors of its `cgroup.procs` files (empty: the shim's cgroup).
struct VmmCgroup {
    procs: Vec<RawFd>,
}

/// Starts podbox-vmm; its output goes to `vmm.log` (see
/// [`copy_vmm_output`]), rotating at `log_max_bytes`. The caller owns the
/// child and must wait for it (the supervisor does).
fn spawn_vmm(
    vmm: &Path,
    config: &VmConfig,
    state: &StateDir,
    log_max_bytes: u64,
    network: VmmNetwork,
    cgroup: VmmCgroup,
) -> Result<Child, VmmError> {
    let log_path = state.vmm_log();
    let log = RotatingLog::create(&log_path, log_max_bytes)
        .map_err(|e| io("creating", &log_path)(std::io::Error::other(e.to_string())))?;
    let (output, log_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| io("a pipe for", &log_path)(e.into()))?;
    let log_err = log_w.try_clone().map_err(io("duplicating", &log_path))?;
    let mut command = Command::new(vmm);
    // SAFETY: prctl, setns, write and fcntl are async-signal-safe
    // syscalls; the descriptors are the caller's and open until spawn
    // returns.
    unsafe {
        command.pre_exec(move || {
            // Into the pod's cgroup before exec: every thread of the VMM,
            // and virtiofsd, start there.
            super::cgroup::join(&cgroup.procs)?;
            // If the shim dies without tearing the pod down (SIGKILL), the
            // VMM must not outlive it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The VMM (and the virtiofsd it starts) live in the pod's netns,
            // as Kata's hypervisor does: containerd and CNI find it at
            // /proc/<task pid>/ns/net. Its sockets are paths, unaffected.
            if libc::setns(network.netns, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Only this child inherits the tap: the shim's descriptor stays
            // close-on-exec for every other process it starts.
            if let Some(tap) = network.tap {
                if libc::fcntl(tap, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command
        .args(config.to_args())
        .stdin(Stdio::null())
        .stdout(log_w)
        .stderr(log_err)
        // If the shim is killed outright, the VMM goes too instead of
        // running a pod nobody can reach.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| VmmError::Spawn {
            binary: vmm.to_path_buf(),
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

/// Reaps the VMM: the one place that waits for it. Then removes the pod's
/// cgroup (the VMM was its last process) before its exit lands in the
/// returned cell, so whoever sees the VM gone finds the cgroup gone too.
fn supervise(mut child: Child, cgroup: Option<PodCgroup>) -> watch::Receiver<Option<ExitStatus>> {
    let (gone, gone_rx) = watch::channel(None);
    tokio::spawn(async move {
        let status = child.wait().await.unwrap_or_else(|e| {
            tracing::error!("waiting for podbox-vmm: {e}");
            ExitStatus::from_raw(255 << 8)
        });
        if let Some(cgroup) = cgroup {
            let problems = tokio::task::spawn_blocking(move || cgroup.remove())
                .await
                .unwrap_or_default();
            log_problems(problems);
        }
        gone.send_replace(Some(status));
    });
    gone_rx
}

/// Boots pods' VMs with podbox-vmm, as the node's config says.
pub struct VmmLauncher {
    pub namespace: String,
    pub config: Config,
}

impl VmmLauncher {
    /// Everything before the VMM runs: nothing to undo but the state dir.
    fn prepare(&self, state: &StateDir) -> Result<(PathBuf, ReadyListener), BootError> {
        if let Some(virtiofsd) = self.config.virtiofsd.as_ref().filter(|p| !p.is_file()) {
            return Err(VmmError::NoVirtiofsd(virtiofsd.clone()).into());
        }
        let vmm = find_vmm()?;
        state.create()?;
        if let Some(dir) = &self.config.guest_profile_dir {
            // The VMM writes the profile there when the VM ends; without
            // the directory only that write fails (said in vmm.log).
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::warn!("guest_profile_dir {}: {e}", dir.display());
            }
        }
        // Bound before the VMM starts, so the agent's ready call cannot
        // come too early to be seen.
        let path = state.vsock_socket();
        let ready = ReadyListener::bind(&path).map_err(|source| VmmError::ReadySocket {
            path: path.clone(),
            source,
        })?;
        Ok((vmm, ready))
    }

    /// Waits for the agent while the VM makes progress, or until the VMM exits.
    async fn connect(
        state: &StateDir,
        mut ready: ReadyListener,
        vmm_pid: u32,
        gone: &watch::Receiver<Option<ExitStatus>>,
    ) -> Result<AgentClient, String> {
        let socket = state.vsock_socket();
        let mut connect = tokio::task::spawn_blocking(move || {
            let mut progress = VmProgress::new(vmm_pid, AGENT_STALL_LIMIT, AGENT_OVERALL_LIMIT);
            AgentClient::connect_when_ready(&socket, &mut ready, &mut progress)
        });
        let mut exited = gone.clone();
        tokio::select! {
            joined = &mut connect => match joined {
                Ok(Ok(agent)) => Ok(agent),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("agent connect task: {e}")),
            },
            _ = async { exited.wait_for(|s| s.is_some()).await.map(drop) } => {
                // The connect task sees the VMM gone within a check; it
                // owns the ready socket, which must go before the state
                // dir does (a new boot of this pod would bind it again).
                let _ = connect.await;
                let exit = super::describe_exit(*gone.borrow());
                Err(format!("podbox-vmm exited during boot ({exit})"))
            }
        }
    }
}

#[async_trait]
impl VmLauncher for VmmLauncher {
    async fn boot(
        &self,
        pod_id: &str,
        settings: VmSettings,
        network: Arc<PodNetwork>,
    ) -> Result<Arc<Sandbox>, BootError> {
        let state = StateDir::for_pod(&self.namespace, pod_id)?;
        // A previous shim of this pod that was killed may have left it.
        log_problems(state.remove());
        let (vmm, ready) = self
            .prepare(&state)
            .inspect_err(|_| log_problems(state.remove()))?;
        let tap = network.take_tap();
        let nic = tap.as_ref().map(|(fd, mac)| NetConfig {
            backend: NetBackend::Fd(fd.as_raw_fd()),
            mac: *mac,
        });
        let config = vm_config(&settings, &self.config, &state, nic);
        let vmm_network = VmmNetwork {
            netns: network.netns_fd().as_raw_fd(),
            tap: tap.as_ref().map(|(fd, _)| fd.as_raw_fd()),
        };
        let cgroup = PodCgroup::create(settings.cgroups_path.as_deref())
            .inspect_err(|_| log_problems(state.remove()))?;
        let vmm_cgroup = VmmCgroup {
            procs: cgroup.as_ref().map(PodCgroup::join_fds).unwrap_or_default(),
        };
        let spawned = spawn_vmm(
            &vmm,
            &config,
            &state,
            self.config.log_max_bytes,
            vmm_network,
            vmm_cgroup,
        );
        // The VMM holds the tap now: its exit must remove it.
        drop(tap);
        let child = spawned.inspect_err(|_| {
            log_problems(cgroup.as_ref().map(PodCgroup::remove).unwrap_or_default());
            log_problems(state.remove());
        })?;
        let vmm_pid = child.id().unwrap_or_default();
        tracing::info!(
            pod = pod_id,
            vmm_pid,
            "started {} {:?}",
            vmm.display(),
            config.to_args()
        );
        if let Some(cgroup) = &cgroup {
            tracing::info!(pod = pod_id, vmm_pid, "in cgroup {:?}", cgroup.dirs());
        }
        let gone = supervise(child, cgroup);
        match Self::connect(&state, ready, vmm_pid, &gone).await {
            Ok(agent) => {
                tracing::info!(pod = pod_id, "agent answered");
                Ok(Arc::new(Sandbox::new(
                    Arc::new(agent.agent),
                    vmm_pid,
                    state,
                    gone,
                    network,
                )))
            }
            Err(reason) => {
                kill_vmm(vmm_pid, &gone).await;
                let error = BootError::NoAgent {
                    reason,
                    vmm_log: tail(&state.vmm_log(), TAIL_LINES),
                    console: tail(&state.console_log(), TAIL_LINES),
                };
                log_problems(state.remove());
                Err(error)
            }
        }
    }
}

fn log_problems(problems: Vec<String>) {
    for problem in problems {
        tracing::warn!("cleaning up the pod state: {problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::ttrpc::Code;
    use podbox_vmm_config::{CachePolicy, VmArgs};

    #[tokio::test]
    async fn a_configured_virtiofsd_that_does_not_exist_fails_the_boot_naming_the_key() {
        let launcher = VmmLauncher {
            namespace: "podbox-unit-test".into(),
            config: Config {
                virtiofsd: Some("/nonexistent/virtiofsd".into()),
                ..Config::default()
            },
        };
        let settings = VmSettings {
            vcpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cgroups_path: None,
        };
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: a pod network namespace needs root");
            return;
        }
        let network = PodNetwork::set_up(&crate::network::NetnsSource::New).expect("a netns");
        let error = launcher
            .boot("pod", settings, Arc::new(network))
            .await
            .err()
            .expect("refused");
        assert_eq!(error.code(), Code::FAILED_PRECONDITION);
        assert_eq!(
            error.to_string(),
            "podbox config key `virtiofsd`: /nonexistent/virtiofsd is not a file"
        );
        assert!(
            !Path::new("/run/podbox/podbox-unit-test").exists(),
            "nothing left"
        );
    }

    /// spawn_vmm with a script standing in for podbox-vmm: it runs in the
    /// pod's netns, holds the tap at the descriptor its --net names, and
    /// the tap goes when it exits.
    #[tokio::test]
    async fn the_vmm_runs_in_the_pods_netns_and_is_the_taps_last_holder() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: a pod network namespace needs root");
            return;
        }
        let net = crate::network::testnet::TestNetns::cni_like();
        let network = PodNetwork::set_up(&crate::network::NetnsSource::Path(net.netns.path()))
            .expect("wired");
        let tmp = tempfile::tempdir().expect("temp dir");
        let vmm = tmp.path().join("fake-vmm");
        std::fs::write(
            &vmm,
            "#!/bin/sh\nreadlink /proc/self/ns/net\nfor a; do case $a in --net=fd=*) fd=${a#--net=fd=}; fd=${fd%%,*};; esac; done\nreadlink /proc/self/fd/$fd\n",
        )
        .expect("script");
        std::fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let state = StateDir::under(&tmp.path().join("state"), "ns", "p").expect("valid id");
        state.create().expect("state dir");
        let tap = network.take_tap().expect("a tap");
        let nic = NetConfig {
            backend: NetBackend::Fd(tap.0.as_raw_fd()),
            mac: tap.1,
        };
        let settings = VmSettings {
            vcpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cgroups_path: None,
        };
        let config = vm_config(&settings, &Config::default(), &state, Some(nic));
        let vmm_network = VmmNetwork {
            netns: network.netns_fd().as_raw_fd(),
            tap: Some(tap.0.as_raw_fd()),
        };
        let no_cgroup = VmmCgroup { procs: Vec::new() };
        let mut child =
            spawn_vmm(&vmm, &config, &state, 1 << 20, vmm_network, no_cgroup).expect("spawned");
        drop(tap);
        assert!(child.wait().await.expect("waited").success());
        // The output copy ends at EOF, just after the exit.
        let since = std::time::Instant::now();
        let mut log = String::new();
        while log.lines().count() < 2 && since.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
            log = std::fs::read_to_string(state.vmm_log()).unwrap_or_default();
        }
        let netns = std::fs::read_link(net.netns.path()).expect("the pod netns");
        let mut lines = log.lines();
        assert_eq!(lines.next(), Some(netns.to_str().unwrap()), "{log}");
        assert_eq!(
            lines.next(),
            Some("/dev/net/tun"),
            "the tap is inherited: {log}"
        );
        assert_eq!(
            net.link(crate::network::tap::TAP_NAME),
            None,
            "gone with the VMM"
        );
        network.tear_down();
        assert!(net.ingress_qdiscs().is_empty());
        // create() mounted the share: take it down, or every run leaves two mounts.
        assert_eq!(
            state.remove(),
            Vec::<String>::new(),
            "removing the state dir"
        );
    }

    #[test]
    fn the_vmm_gets_the_pod_settings_and_the_share() {
        let settings = VmSettings {
            vcpus: 2,
            memory_mib: 512,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cgroups_path: None,
        };
        let config = Config {
            virtiofsd: Some("/usr/libexec/virtiofsd".into()),
            fs_cache: CachePolicy::Always,
            log_max_bytes: 1048576,
            guest_profile_dir: Some("/var/lib/podbox/profiles".into()),
            ..Config::default()
        };
        let state = StateDir::for_pod("ns", "p").expect("valid id");
        let nic = NetConfig {
            backend: NetBackend::Fd(7),
            mac: podbox_vmm_config::MacAddr([0x0a, 0x58, 0x0a, 0x58, 0, 5]),
        };
        let vm = vm_config(&settings, &config, &state, Some(nic));
        assert_eq!(vm.validate(), Ok(()));
        // What podbox-vmm parses from the command line the shim writes.
        let argv = std::iter::once("podbox-vmm".into()).chain(vm.to_args());
        let parsed = <VmArgs as clap::Parser>::try_parse_from(argv)
            .expect("podbox-vmm parses it")
            .into_config()
            .expect("valid");
        assert_eq!(parsed, vm);
        let args: Vec<String> = vm
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args = args.join(" ");
        for expected in [
            "--kernel=/k",
            "--initrd=/i",
            "--vcpus=2",
            "--memory-mib=512",
            "--serial=/run/podbox/ns/p/console.log --serial-max-bytes=1048576",
            "--vsock-socket=/run/podbox/ns/p/vsock.sock",
            "--fs-tag=podbox",
            "--shared-dir=/run/podbox/ns/p/share",
            "--fs-socket=/run/podbox/ns/p/virtiofsd.sock",
            "--virtiofsd=/usr/libexec/virtiofsd",
            "--fs-cache=always",
            "--net=fd=7,mac=0a:58:0a:58:00:05",
            "--guest-profile=/var/lib/podbox/profiles/ns-p.profile,hz=100",
            "--balloon",
        ] {
            assert!(args.contains(expected), "{expected:?} in {args}");
        }
        let unset = vm_config(&settings, &Config::default(), &state, None);
        assert!(
            !format!("{:?}", unset.to_args()).contains("--net"),
            "no NIC without one"
        );
        assert!(
            !format!("{:?}", unset.to_args()).contains("--virtiofsd="),
            "without a configured virtiofsd podbox-vmm finds one"
        );
        assert_eq!(unset.guest_profile, None, "no profiling unless configured");
        let no_reporting = Config {
            free_page_reporting: false,
            ..Config::default()
        };
        let vm = vm_config(&settings, &no_reporting, &state, None);
        assert!(
            !format!("{:?}", vm.to_args()).contains("--balloon"),
            "free_page_reporting = false: no balloon"
        );
    }
}

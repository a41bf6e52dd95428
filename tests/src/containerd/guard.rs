//! The guard itself: starting containerd on a fresh config, waiting for its
//! CRI plugin, and the accessors tests use. The `ctr` helpers, the
//! footprint and the teardown (`Drop`) are in the sibling modules.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_cri::v1::PodSandboxConfig;

use super::config::{cni_conflist, containerd_config, Paths};
use super::error::ContainerdError;
use super::host_dirs;
use super::names::{CRI_NAMESPACE, TEST_NAMESPACE};
use crate::cri::{pod_sandbox_config, CriClient, CriError};
use crate::oci_image::write_test_images;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Choices for a [`Containerd`] beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Directories put first on containerd's PATH, where it looks for
    /// `containerd-shim-<name>-v2` binaries (e.g. the podbox shim's build dir).
    pub shim_dirs: Vec<PathBuf>,
    /// The podbox shim's config file: given to the shim as runtime options
    /// (CRI's `ConfigPath` for handler podbox, `ctr run --runtime-config-path`).
    pub podbox_config: Option<PathBuf>,
}

static NEXT_GUARD: AtomicUsize = AtomicUsize::new(0);
static NEXT_NAME: AtomicUsize = AtomicUsize::new(0);

pub struct Containerd {
    pub(super) dir: Option<tempfile::TempDir>,
    pub(super) daemon: Option<Child>,
    pub(super) daemon_pid: u32,
    pub(super) grpc_socket: PathBuf,
    /// Short unique tag of this guard: names the bridge, subnet, cgroup parent.
    pub(super) tag: String,
    pub(super) bridge: String,
    /// The pods' gateway: the bridge's address, first of the guard's /24.
    pub(super) gateway: Ipv4Addr,
    pub(super) cgroup_parent: String,
    pub(super) podbox_config: Option<PathBuf>,
    /// What the daemon was started with, for [`Containerd::restart`].
    pub(super) shim_dirs: Vec<PathBuf>,
}

impl Containerd {
    pub fn start() -> Result<Self, ContainerdError> {
        Self::start_with(ContainerdOptions::default())
    }

    pub fn start_with(options: ContainerdOptions) -> Result<Self, ContainerdError> {
        host_dirs::note_preexisting_host_dirs();
        let guard_number = NEXT_GUARD.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}x{guard_number}", pid % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("podbox-containerd-")
            .tempdir()
            .map_err(|source| io_error("creating a temp dir in", std::env::temp_dir(), source))?;
        let paths = Paths::new(dir.path());
        for sub in paths.dirs() {
            std::fs::create_dir_all(sub).map_err(|source| io_error("creating", sub, source))?;
        }
        let bridge = format!("pbx{tag}");
        // Private to this guard's bridge, which holds its first address: a
        // /24 of its own per guard, so two guards' routes never overlap.
        let subnet_base = Ipv4Addr::new(10, 200 + (guard_number % 50) as u8, (pid % 256) as u8, 0);
        let subnet = format!("{subnet_base}/24");
        let cgroup_parent = format!("/podbox-test-{tag}");
        write_file(
            &paths.config,
            &containerd_config(&paths, options.podbox_config.as_deref()),
        )?;
        write_file(
            &paths.cni_conf.join("10-podbox-test.conflist"),
            &cni_conflist(&tag, &bridge, &subnet, &paths.cni_ipam),
        )?;
        write_test_images(&crate::guest::busybox(), &paths.images)?;

        let daemon = spawn_daemon(&paths, &options.shim_dirs)?;
        host_dirs::guard_started();
        // From here on the guard exists, so a failure below still cleans up.
        let mut harness = Containerd {
            daemon_pid: daemon.id(),
            daemon: Some(daemon),
            dir: Some(dir),
            grpc_socket: paths.grpc.clone(),
            tag,
            bridge,
            gateway: Ipv4Addr::from(u32::from(subnet_base) + 1),
            cgroup_parent,
            podbox_config: options.podbox_config.clone(),
            shim_dirs: options.shim_dirs.clone(),
        };
        harness.wait_until_ready()?;
        for namespace in [TEST_NAMESPACE, CRI_NAMESPACE] {
            harness.ctr_ok(
                namespace,
                &["images", "import", &paths.images.display().to_string()],
            )?;
        }
        Ok(harness)
    }

    pub(super) fn dir(&self) -> &Path {
        // Only Drop takes the dir out.
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    pub fn grpc_socket(&self) -> &Path {
        &self.grpc_socket
    }

    /// The CNI bridge's address: the pods' default gateway, and the host's
    /// address on the pods' subnet.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The CRI plugin's files of pod `pod_id` (hosts, hostname, resolv.conf
    /// that every container of the pod gets).
    pub fn sandbox_files(&self, pod_id: &str) -> PathBuf {
        self.root()
            .join("io.containerd.grpc.v1.cri/sandboxes")
            .join(pod_id)
    }

    pub fn root(&self) -> PathBuf {
        Paths::new(self.dir()).root
    }

    /// The cgroup parent every container and pod of this guard lives under;
    /// CRI pods must be given it (see [`crate::cri::pod_sandbox_config`]).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// Where CRI pods of this guard should write their logs.
    pub fn pod_log_dir(&self, pod_name: &str) -> PathBuf {
        Paths::new(self.dir()).pod_logs.join(pod_name)
    }

    /// A CRI pod config for this guard: a unique name from `prefix` (also
    /// its hostname), its log directory (created) and this guard's cgroup
    /// parent.
    pub fn pod_config(&self, prefix: &str) -> Result<PodSandboxConfig, ContainerdError> {
        let name = self.unique_name(prefix);
        let log_dir = self.pod_log_dir(&name);
        std::fs::create_dir_all(&log_dir).map_err(|source| ContainerdError::Io {
            what: "creating pod log dir",
            path: log_dir.clone(),
            source,
        })?;
        Ok(pod_sandbox_config(&name, &log_dir, &self.cgroup_parent))
    }

    /// runc's state directory for this guard's tasks (`ctr run --runc-root`,
    /// and the CRI runtime options), instead of /run/containerd/runc.
    pub fn runc_root(&self) -> PathBuf {
        Paths::new(self.dir()).runc_root
    }

    /// Where ctr should make its stdio FIFOs (`--fifo-dir`).
    pub fn fifo_dir(&self) -> PathBuf {
        Paths::new(self.dir()).fifo
    }

    /// A name unique among all guards of this process, for containers and pods.
    pub fn unique_name(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}-{}",
            self.tag,
            NEXT_NAME.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub fn cri(&self) -> Result<CriClient, CriError> {
        CriClient::connect(&self.grpc_socket)
    }

    /// containerd's log so far (every start of the daemon, and what its
    /// shims logged: they log to containerd through the bundle's FIFO).
    pub fn log(&self) -> String {
        std::fs::read_to_string(Paths::new(self.dir()).log).unwrap_or_default()
    }

    /// Stops the daemon (SIGTERM, as a service manager does) and starts it
    /// again on the same config, state and sockets, then waits for its CRI
    /// plugin. Shims live on across it (they are not containerd's
    /// children once started); the new daemon reconnects to them.
    pub fn restart(&mut self) -> Result<(), ContainerdError> {
        let mut problems = Vec::new();
        self.stop_daemon(&mut problems);
        if let Some(problem) = problems.pop() {
            return Err(ContainerdError::Restart(problem));
        }
        let daemon = spawn_daemon(&Paths::new(self.dir()), &self.shim_dirs)?;
        self.daemon_pid = daemon.id();
        self.daemon = Some(daemon);
        self.wait_until_ready()
    }

    /// Waits until the CRI plugin reports the runtime and the network ready
    /// (the network is ready once it has loaded our CNI config).
    fn wait_until_ready(&mut self) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("socket absent");
        while Instant::now() < deadline {
            if let Some(daemon) = self.daemon.as_mut() {
                if let Ok(Some(status)) = daemon.try_wait() {
                    return Err(ContainerdError::ExitedEarly {
                        status,
                        log: self.log(),
                    });
                }
            }
            if self.grpc_socket.exists() {
                match self.cri().and_then(|mut cri| cri.conditions()) {
                    Ok(conditions) => {
                        let ready = |name: &str| conditions.get(name).copied().unwrap_or(false);
                        if ready("RuntimeReady") && ready("NetworkReady") {
                            return Ok(());
                        }
                        last = format!("conditions {conditions:?}");
                    }
                    Err(error) => last = error.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ContainerdError::NotReady {
            timeout: READY_TIMEOUT,
            last,
            log: self.log(),
        })
    }
}

/// Starts containerd on the config in `paths`, its output to its log, with
/// `shim_dirs` first on its PATH.
fn spawn_daemon(paths: &Paths, shim_dirs: &[PathBuf]) -> Result<Child, ContainerdError> {
    // Appended to: a restarted daemon keeps the earlier run's log.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .map_err(|source| io_error("opening", &paths.log, source))?;
    let log_for_stderr = log
        .try_clone()
        .map_err(|source| io_error("duplicating", &paths.log, source))?;
    let mut search_path = std::env::join_paths(shim_dirs.iter()).unwrap_or_default();
    if let Some(host_path) = std::env::var_os("PATH") {
        if !search_path.is_empty() {
            search_path.push(":");
        }
        search_path.push(host_path);
    }
    Command::new("containerd")
        .arg("--config")
        .arg(&paths.config)
        .env("PATH", search_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_for_stderr)
        .spawn()
        .map_err(|source| ContainerdError::Spawn {
            program: "containerd".into(),
            source,
        })
}

fn io_error(
    what: &'static str,
    path: impl Into<PathBuf>,
    source: std::io::Error,
) -> ContainerdError {
    ContainerdError::Io {
        what,
        path: path.into(),
        source,
    }
}

fn write_file(path: &Path, contents: &str) -> Result<(), ContainerdError> {
    std::fs::write(path, contents).map_err(|source| io_error("writing", path, source))
}

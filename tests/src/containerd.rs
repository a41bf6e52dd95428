//! A private containerd for tests: Debian's containerd 1.6 started from its
//! own generated config (root, state, sockets, opt, CNI config and IPAM state
//! all under one temp dir), with the CRI plugin on, runtimes `runc` and
//! `podbox` (io.containerd.podbox.v2), and the test images imported.
//!
//! [`Containerd`] is a guard: dropping it deletes every pod, task and
//! container it ran, stops the daemon and everything it started, and removes
//! what it made on the host (mounts, network namespaces, the CNI bridge,
//! cgroups, /run/containerd directories, the temp dir). Several guards can
//! live at once (tests run on parallel threads): each has its own sockets,
//! bridge name, subnet and cgroup parent.

use podbox_shim::hostfs::mount_points;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::cri::{pod_sandbox_config, CriClient, CriError};
use crate::oci_image::{write_test_images, ImageError, BUSYBOX_IMAGE, PAUSE_IMAGE};
use k8s_cri::v1::PodSandboxConfig;

/// The containerd namespace the `ctr` helpers use.
pub const TEST_NAMESPACE: &str = "podbox-test";
/// The namespace the CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// `ctr --runtime` values and CRI runtime handlers for the two runtimes.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
pub const PODBOX_RUNTIME: &str = "io.containerd.podbox.v2";
pub const RUNC_HANDLER: &str = "runc";
pub const PODBOX_HANDLER: &str = "podbox";

/// Where Debian's containernetworking-plugins puts the CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Host directories containerd 1.6, its CRI plugin and libcni create
/// whatever the config says, with the subdirectories they make there. Where
/// a directory did not exist before this process started a containerd, the
/// last guard to go removes the empty ones (anything in them is someone's).
const HOST_DIRS_MADE_REGARDLESS: [(&str, &[&str]); 3] = [
    (
        "/run/containerd",
        &["runc/podbox-test", "runc/k8s.io", "runc", "fifo", "s"],
    ),
    ("/var/lib/cni", &["results"]),
    ("/run/netns", &[]),
];
/// Where the CRI plugin of containerd 1.6 bind-mounts pod network namespaces.
const NETNS_DIR: &str = "/var/run/netns";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ContainerdError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("containerd exited during startup ({status}); its log:\n{log}")]
    ExitedEarly { status: ExitStatus, log: String },
    #[error(
        "containerd's CRI plugin was not ready within {timeout:?} (last: {last}); its log:\n{log}"
    )]
    NotReady {
        timeout: Duration,
        last: String,
        log: String,
    },
    #[error("`ctr {args}` failed ({status}): {stderr}")]
    Ctr {
        args: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Cri(#[from] CriError),
}

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

/// What one `ctr run` gave.
#[derive(Debug)]
pub struct CtrRunOutput {
    pub container_id: String,
    /// ctr exits with the task's exit status.
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawning ctr to its exit: create, start, run, exit, delete.
    pub elapsed: Duration,
}

/// Guards that are alive in this process; /run/containerd is tidied only
/// when the last one goes, since the others may be using it.
static LIVE_GUARDS: Mutex<usize> = Mutex::new(0);
static NEXT_GUARD: AtomicUsize = AtomicUsize::new(0);
static NEXT_NAME: AtomicUsize = AtomicUsize::new(0);
/// Which of [`HOST_DIRS_MADE_REGARDLESS`] existed before this process
/// started any containerd; those belong to someone else and are left alone.
static HOST_DIRS_PREEXISTED: OnceLock<[bool; 3]> = OnceLock::new();

pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    daemon: Option<Child>,
    daemon_pid: u32,
    grpc_socket: PathBuf,
    /// Short unique tag of this guard: names the bridge, subnet, cgroup parent.
    tag: String,
    bridge: String,
    cgroup_parent: String,
    podbox_config: Option<PathBuf>,
}

/// Everything a [`Containerd`] made on the host, to check after drop that it is gone.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub daemon_pid: u32,
    pub dir: PathBuf,
    pub grpc_socket: PathBuf,
    pub bridge: String,
    pub cgroup_parent: String,
    pub netns: Vec<PathBuf>,
}

impl Containerd {
    pub fn start() -> Result<Self, ContainerdError> {
        Self::start_with(ContainerdOptions::default())
    }

    pub fn start_with(options: ContainerdOptions) -> Result<Self, ContainerdError> {
        HOST_DIRS_PREEXISTED
            .get_or_init(|| HOST_DIRS_MADE_REGARDLESS.map(|(dir, _)| Path::new(dir).exists()));
        let guard_number = NEXT_GUARD.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}x{guard_number}", pid % 100_000);
        let dir = tempfile::Builder::new()
            .prefix("podbox-containerd-")
            .tempdir()
            .map_err(|source| io_error("creating a temp dir in", std::env::temp_dir(), source))?;
        let paths = Paths::new(dir.path());
        for sub in [
            &paths.root,
            &paths.state,
            &paths.opt,
            &paths.cni_conf,
            &paths.cni_ipam,
            &paths.fifo,
            &paths.runc_root,
            &paths.pod_logs,
        ] {
            std::fs::create_dir_all(sub).map_err(|source| io_error("creating", sub, source))?;
        }
        let bridge = format!("pbx{tag}");
        // Private to this guard's bridge; the bridge has no host address
        // (isGateway false), so subnets never meet in the host's routes.
        let subnet = format!("10.{}.{}.0/24", 200 + guard_number % 50, pid % 256);
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

        let log = std::fs::File::create(&paths.log)
            .map_err(|source| io_error("creating", &paths.log, source))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|source| io_error("duplicating", &paths.log, source))?;
        let mut search_path = std::env::join_paths(options.shim_dirs.iter()).unwrap_or_default();
        if let Some(host_path) = std::env::var_os("PATH") {
            if !search_path.is_empty() {
                search_path.push(":");
            }
            search_path.push(host_path);
        }
        let daemon = Command::new("containerd")
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
            })?;
        *LIVE_GUARDS.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        // From here on the guard exists, so a failure below still cleans up.
        let mut harness = Containerd {
            daemon_pid: daemon.id(),
            daemon: Some(daemon),
            dir: Some(dir),
            grpc_socket: paths.grpc,
            tag,
            bridge,
            cgroup_parent,
            podbox_config: options.podbox_config.clone(),
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

    fn dir(&self) -> &Path {
        // Only Drop takes the dir out.
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    pub fn grpc_socket(&self) -> &Path {
        &self.grpc_socket
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

    /// Runs `ctr` against this containerd in `namespace`; any exit status.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Result<Output, ContainerdError> {
        self.ctr_command(namespace, args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ContainerdError::Spawn {
                program: "ctr".into(),
                source,
            })
    }

    /// Runs `ctr` and returns its stdout, failing on a non-zero exit.
    pub fn ctr_ok(&self, namespace: &str, args: &[&str]) -> Result<String, ContainerdError> {
        let output = self.ctr(namespace, args)?;
        if !output.status.success() {
            return Err(ContainerdError::Ctr {
                args: args.join(" "),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A `ctr` command line for this containerd, for callers that need the child
    /// (e.g. to kill a task while `ctr run` waits on it).
    pub fn ctr_command(&self, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.grpc_socket)
            .args(["--namespace", namespace])
            .args(args);
        command
    }

    /// The `ctr run` arguments up to and including the command: the container
    /// is removed at exit, keeps its FIFOs, runc state and cgroup under this
    /// guard, and gets a fresh unique id (returned first).
    pub fn ctr_run_args(
        &self,
        runtime: &str,
        image: &str,
        command: &[&str],
    ) -> (String, Vec<String>) {
        let container_id = self.unique_name("ctr");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--runtime".into(),
            runtime.into(),
        ];
        args.extend(["--fifo-dir".into(), self.fifo_dir().display().to_string()]);
        args.extend([
            "--cgroup".into(),
            format!("{}/{container_id}", self.cgroup_parent),
        ]);
        if runtime == RUNC_RUNTIME {
            args.extend(["--runc-root".into(), self.runc_root().display().to_string()]);
        }
        if let (PODBOX_RUNTIME, Some(config)) = (runtime, &self.podbox_config) {
            args.extend(["--runtime-config-path".into(), config.display().to_string()]);
        }
        args.extend([image.to_string(), container_id.clone()]);
        args.extend(command.iter().map(|arg| arg.to_string()));
        (container_id, args)
    }

    /// `ctr run --rm` of `command` in `image` under `runtime`, feeding `stdin`
    /// (or nothing: stdin at EOF), and waits for it.
    pub fn ctr_run(
        &self,
        runtime: &str,
        image: &str,
        command: &[&str],
        stdin: &[u8],
    ) -> Result<CtrRunOutput, ContainerdError> {
        use std::io::Write;
        let (container_id, args) = self.ctr_run_args(runtime, image, command);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut child = self
            .ctr_command(TEST_NAMESPACE, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ContainerdError::Spawn {
                program: "ctr".into(),
                source,
            })?;
        if let Some(mut pipe) = child.stdin.take() {
            // A task that exits without reading closes the pipe: not an error here.
            let _ = pipe.write_all(stdin);
        }
        let output = child
            .wait_with_output()
            .map_err(|source| ContainerdError::Spawn {
                program: "ctr".into(),
                source,
            })?;
        Ok(CtrRunOutput {
            container_id,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }

    /// `ctr run` of the busybox test image under runc.
    pub fn run_busybox_with_runc(
        &self,
        command: &[&str],
        stdin: &[u8],
    ) -> Result<CtrRunOutput, ContainerdError> {
        self.ctr_run(RUNC_RUNTIME, BUSYBOX_IMAGE, command, stdin)
    }

    /// What this guard has made so far, to check after drop that none of it is left.
    pub fn footprint(&self) -> Footprint {
        let netns = self
            .cri()
            .ok()
            .map(|mut cri| pod_netns_paths(&mut cri))
            .unwrap_or_default();
        Footprint {
            daemon_pid: self.daemon_pid,
            dir: self.dir().to_path_buf(),
            grpc_socket: self.grpc_socket.clone(),
            bridge: self.bridge.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            netns,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(Paths::new(self.dir()).log).unwrap_or_default()
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

    // --- teardown, in the order Drop runs it ---

    /// Stops and removes every CRI pod (which removes its containers, netns
    /// and CNI attachment); returns the netns paths the pods had.
    fn remove_pods(&self, problems: &mut Vec<String>) -> Vec<PathBuf> {
        let mut cri = match self.cri() {
            Ok(cri) => cri,
            Err(error) => {
                problems.push(format!("CRI client: {error}"));
                return Vec::new();
            }
        };
        let netns = pod_netns_paths(&mut cri);
        for pod in cri.list_pod_sandboxes().unwrap_or_default() {
            if let Err(error) = cri
                .stop_pod_sandbox(&pod.id)
                .and_then(|()| cri.remove_pod_sandbox(&pod.id))
            {
                problems.push(format!("removing pod {}: {error}", pod.id));
            }
        }
        netns
    }

    /// Kills and deletes every task and container left in any namespace.
    fn remove_tasks_and_containers(&self, problems: &mut Vec<String>) {
        let namespaces = self
            .ctr_ok(TEST_NAMESPACE, &["namespaces", "ls", "-q"])
            .unwrap_or_default();
        for namespace in namespaces.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let tasks = self
                .ctr_ok(namespace, &["tasks", "ls", "-q"])
                .unwrap_or_default();
            for task in tasks.lines().map(str::trim).filter(|t| !t.is_empty()) {
                // The task may have exited already; only the delete must succeed.
                let _ = self.ctr(
                    namespace,
                    &["tasks", "kill", "--all", "--signal", "SIGKILL", task],
                );
                if let Err(error) = self.ctr_ok(namespace, &["tasks", "delete", "--force", task]) {
                    problems.push(format!("deleting task {namespace}/{task}: {error}"));
                }
            }
            let containers = self
                .ctr_ok(namespace, &["containers", "ls", "-q"])
                .unwrap_or_default();
            for container in containers.lines().map(str::trim).filter(|c| !c.is_empty()) {
                if let Err(error) = self.ctr_ok(namespace, &["containers", "rm", container]) {
                    problems.push(format!(
                        "removing container {namespace}/{container}: {error}"
                    ));
                }
            }
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; reaps the daemon.
    fn stop_daemon(&mut self, problems: &mut Vec<String>) {
        let Some(mut daemon) = self.daemon.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match daemon.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    problems.push(format!(
                        "containerd ignored SIGTERM for {STOP_TIMEOUT:?}; killed"
                    ));
                    let _ = daemon.kill();
                    let _ = daemon.wait();
                    return;
                }
            }
        }
    }

    /// Kills what should have exited already: shims of this containerd
    /// (their command line names its socket) and processes in its cgroups.
    fn kill_stragglers(&self, problems: &mut Vec<String>) {
        let mut pids = processes_naming(&self.grpc_socket);
        for cgroup in cgroup_dirs(&self.cgroup_parent) {
            pids.extend(pids_in_cgroup_tree(&cgroup));
        }
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            problems.push(format!(
                "process {pid} ({}) outlived containerd; killed",
                comm.trim()
            ));
            // SAFETY: kill(2) with a pid read from our own shims' cgroups or command lines.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    fn remove_host_state(&self, netns: &[PathBuf], problems: &mut Vec<String>) {
        // Mounts first, deepest first: snapshots, rootfs, shm, netns.
        let mut mounts: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(self.dir()) || netns.contains(m))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            problems.push(format!("{} was still mounted; unmounted", mount.display()));
            unmount(&mount);
        }
        for path in netns.iter().filter(|p| p.exists()) {
            problems.push(format!("netns {} was left; removed", path.display()));
            let _ = std::fs::remove_file(path);
        }
        // The CNI bridge plugin creates the bridge but never deletes it.
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let deleted = Command::new("ip")
                .args(["link", "delete", &self.bridge])
                .status();
            if !deleted.is_ok_and(|s| s.success()) {
                problems.push(format!("could not delete bridge {}", self.bridge));
            }
        }
        // runc removes each container's cgroup, not the parent we gave it.
        for cgroup in cgroup_dirs(&self.cgroup_parent) {
            remove_cgroup_tree(&cgroup, problems);
        }
        let last_guard = {
            let mut live = LIVE_GUARDS.lock().unwrap_or_else(|e| e.into_inner());
            *live = live.saturating_sub(1);
            *live == 0
        };
        let preexisted = HOST_DIRS_PREEXISTED.get().copied().unwrap_or([true; 3]);
        for ((dir, subdirs), preexisted) in HOST_DIRS_MADE_REGARDLESS.iter().zip(preexisted) {
            if last_guard && !preexisted {
                // remove_dir fails on a non-empty directory, which is what we want.
                for sub in subdirs.iter().chain([&""]) {
                    let _ = std::fs::remove_dir(Path::new(dir).join(sub));
                }
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        let netns = self.remove_pods(&mut problems);
        self.remove_tasks_and_containers(&mut problems);
        self.stop_daemon(&mut problems);
        self.kill_stragglers(&mut problems);
        self.remove_host_state(&netns, &mut problems);
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(error) = dir.close() {
                problems.push(format!("removing {}: {error}", path.display()));
            }
        }
        if !problems.is_empty() {
            eprintln!(
                "containerd harness {} teardown:\n  {}",
                self.tag,
                problems.join("\n  ")
            );
        }
    }
}

impl Footprint {
    /// What of this footprint still exists, one line each; empty when all is gone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if Path::new(&format!("/proc/{}", self.daemon_pid)).exists() {
            left.push(format!("containerd process {}", self.daemon_pid));
        }
        for pid in processes_naming(&self.grpc_socket) {
            left.push(format!(
                "process {pid} naming {}",
                self.grpc_socket.display()
            ));
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        for mount in mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&self.dir) || self.netns.contains(m))
        {
            left.push(format!("mount {}", mount.display()));
        }
        for netns in self.netns.iter().filter(|p| p.exists()) {
            left.push(format!("netns {}", netns.display()));
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            left.push(format!("network interface {}", self.bridge));
        }
        for cgroup in cgroup_dirs(&self.cgroup_parent) {
            left.push(format!("cgroup {}", cgroup.display()));
        }
        left
    }
}

/// The layout of one guard's temp dir.
struct Paths {
    config: PathBuf,
    log: PathBuf,
    images: PathBuf,
    root: PathBuf,
    state: PathBuf,
    opt: PathBuf,
    grpc: PathBuf,
    ttrpc: PathBuf,
    cni_conf: PathBuf,
    cni_ipam: PathBuf,
    fifo: PathBuf,
    runc_root: PathBuf,
    pod_logs: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Self {
        Paths {
            config: dir.join("config.toml"),
            log: dir.join("containerd.log"),
            images: dir.join("images.tar"),
            root: dir.join("root"),
            state: dir.join("state"),
            opt: dir.join("opt"),
            grpc: dir.join("containerd.sock"),
            ttrpc: dir.join("containerd.sock.ttrpc"),
            cni_conf: dir.join("cni/net.d"),
            cni_ipam: dir.join("cni/ipam"),
            fifo: dir.join("fifo"),
            runc_root: dir.join("runc"),
            pod_logs: dir.join("pod-logs"),
        }
    }
}

fn containerd_config(paths: &Paths, podbox_config: Option<&Path>) -> String {
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    let podbox_options = match podbox_config {
        Some(path) => format!(
            "      [{cri}.containerd.runtimes.{PODBOX_HANDLER}.options]\n        ConfigPath = \"{}\"\n",
            path.display()
        ),
        None => String::new(),
    };
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
# Snapshotters that cannot work here would only log errors at startup.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{grpc}"
[ttrpc]
  address = "{ttrpc}"
[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[{cri}]
  sandbox_image = "{pause}"
  # Root here cannot lower oom_score_adj; CRI's -998 for sandboxes would make runc fail.
  restrict_oom_score_adj = true
  # Port 0: several guards at once must not fight over CRI's default 10010.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{runc_handler}"
    [{cri}.containerd.runtimes.{runc_handler}]
      runtime_type = "{runc_runtime}"
      [{cri}.containerd.runtimes.{runc_handler}.options]
        Root = "{runc_root}"
    [{cri}.containerd.runtimes.{podbox_handler}]
      runtime_type = "{podbox_runtime}"
{podbox_options}  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = paths.root.display(),
        state = paths.state.display(),
        grpc = paths.grpc.display(),
        ttrpc = paths.ttrpc.display(),
        opt = paths.opt.display(),
        pause = PAUSE_IMAGE,
        runc_handler = RUNC_HANDLER,
        runc_runtime = RUNC_RUNTIME,
        runc_root = paths.runc_root.display(),
        podbox_handler = PODBOX_HANDLER,
        podbox_runtime = PODBOX_RUNTIME,
        cni_bin = CNI_BIN_DIR,
        cni_conf = paths.cni_conf.display(),
    )
}

/// A bridge + host-local network private to one guard. IPAM state lives in
/// the guard's dir (not /var/lib/cni), so nothing of it outlives the guard.
fn cni_conflist(tag: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("podbox-test-{tag}"),
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "dataDir": ipam_dir,
            },
        }],
    })
    .to_string()
}

fn pod_netns_paths(cri: &mut CriClient) -> Vec<PathBuf> {
    let pods = cri.list_pod_sandboxes().unwrap_or_default();
    pods.iter()
        .filter_map(|pod| cri.pod_netns_path(&pod.id).ok().flatten())
        .filter(|p| p.starts_with(NETNS_DIR) || p.starts_with("/run/netns"))
        .collect()
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

fn unmount(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: umount2(2) with a valid NUL-terminated path. Detach, because a
    // stuck mount must not stop the rest of the teardown.
    unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
}

/// `<mount>/<parent>` for every cgroup hierarchy (v1 controllers, v2) where it exists.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter(|line| {
            line.split(" - ")
                .nth(1)
                .is_some_and(|fs| fs.starts_with("cgroup ") || fs.starts_with("cgroup2 "))
        })
        .filter_map(|line| line.split(' ').nth(4))
        .map(|mount| Path::new(mount).join(parent.trim_start_matches('/')))
        .filter(|dir| dir.is_dir())
        .collect()
}

fn pids_in_cgroup_tree(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect();
    for child in subdirectories(dir) {
        pids.extend(pids_in_cgroup_tree(&child));
    }
    pids
}

fn remove_cgroup_tree(dir: &Path, problems: &mut Vec<String>) {
    for child in subdirectories(dir) {
        remove_cgroup_tree(&child, problems);
    }
    // A cgroup goes with rmdir once its children and processes are gone.
    if let Err(error) = std::fs::remove_dir(dir) {
        problems.push(format!("removing cgroup {}: {error}", dir.display()));
    }
}

fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.is_symlink())
        .collect()
}

/// Processes whose command line mentions `needle` as one argument.
fn processes_naming(needle: &Path) -> Vec<u32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
        })
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == needle))
        })
        .collect()
}

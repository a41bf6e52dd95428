//! Shared harness for the agent's integration tests: a busybox rootfs, a
//! real podbox-agent on a unix socket, the generated ttrpc client, OCI spec
//! builders, and cleanup that runs even when a test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use podbox_protocol::agent::*;
use podbox_protocol::agent_ttrpc::AgentServiceClient;
use podbox_protocol::health_ttrpc::HealthClient;
use serde_json::{json, Value};

/// Returns false (after a loud message) when the tests cannot run here.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("\n!!!!! SKIPPING {test}: needs root (namespaces, mounts, cgroups) !!!!!\n");
    false
}

/// A started agent for `test`, or None (test skipped) when not root.
pub fn agent_for(test: &str) -> Option<Agent> {
    require_root(test).then(|| Agent::start(test))
}

/// Like `agent_for`, with the pod already created.
pub fn pod_for(test: &str, shared_pid: bool) -> Option<Agent> {
    let a = agent_for(test)?;
    a.create_sandbox(shared_pid);
    Some(a)
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// Debian's busybox-static, which scripts/deps.sh (run by `make test`)
/// installs; the tests install nothing themselves.
fn busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!(
        "busybox is missing (neither /bin/busybox nor /usr/bin/busybox): \
         run scripts/deps.sh (`make test` runs it first), which installs busybox-static"
    );
}

/// Builds a rootfs with busybox and its applet links under `dir`.
pub fn make_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let busybox = busybox();
    std::fs::copy(&busybox, bin.join("busybox")).unwrap();
    // Ask the original for its applets: exec-ing the fresh copy fails with
    // ETXTBSY when another test thread forked while the copy was open for
    // writing (the child holds the fd until it execs).
    let out = Command::new(&busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Where the agent's cgroups for `rel` live on this host (memory
/// controller on v1, the unified tree on v2).
pub fn cgroup_dir(rel: &str) -> PathBuf {
    let base = Path::new("/sys/fs/cgroup");
    let v2 = std::fs::read_to_string(base.join("cgroup.controllers"))
        .is_ok_and(|c| c.contains("memory"));
    if v2 {
        base.join(rel)
    } else {
        base.join("memory").join(rel)
    }
}

pub struct Agent {
    pub child: Child,
    pub client: AgentServiceClient,
    pub health: HealthClient,
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub cgroup_parent: String,
}

impl Agent {
    /// Starts podbox-agent on a unix socket with its own cgroup parent.
    pub fn start(name: &str) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("podbox-agent-test")
            .tempdir()
            .unwrap();
        let rootfs = dir.path().join("rootfs");
        make_rootfs(&rootfs);
        let sock = dir.path().join("agent.sock");
        let cgroup_parent = format!(
            "podbox-test-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            name
        );
        // The agent holds a descriptor without O_CLOEXEC, as one it opened
        // and has not marked yet (openpty): no container may inherit it.
        let stray = std::fs::File::open("/dev/null").expect("open /dev/null");
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&stray),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .expect("clear FD_CLOEXEC");
        let child = Command::new(env!("CARGO_BIN_EXE_podbox-agent"))
            .args(["--listen", &format!("unix://{}", sock.display())])
            .args([
                "--no-init",
                "--cgroup-parent",
                &cgroup_parent,
                "--log-level",
                "info",
            ])
            .spawn()
            .expect("start podbox-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = format!("unix://{}", sock.display());
        let client = loop {
            if let Ok(c) = ttrpc::Client::connect(&addr) {
                break c;
            }
            assert!(Instant::now() < deadline, "agent did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Agent {
            child,
            client: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
            dir,
            rootfs,
            cgroup_parent,
        }
    }

    pub fn create_sandbox(&self, shared_pid: bool) {
        let req = CreateSandboxRequest {
            sandbox_id: "pod1".into(),
            hostname: "podhost".into(),
            shared_pid_ns: shared_pid,
            ..Default::default()
        };
        self.client
            .create_sandbox(ctx(), &req)
            .expect("CreateSandbox");
    }

    pub fn create(&self, id: &str, spec: &Value) -> ttrpc::Result<Empty> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            rootfs: self.rootfs.display().to_string(),
            ..Default::default()
        };
        self.client.create_container(ctx(), &req)
    }

    /// Creates and starts a container.
    pub fn run(&self, id: &str, spec: &Value) {
        self.create(id, spec)
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}"));
        let req = StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client
            .start_container(ctx(), &req)
            .expect("StartContainer");
    }

    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str]) {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: serde_json::to_vec(&process(args, false)).unwrap(),
            ..Default::default()
        };
        self.client.exec_process(ctx(), &req).expect("ExecProcess");
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> i32 {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client
            .wait_process(ctx(), &req)
            .expect("WaitProcess")
            .status
    }

    fn read_all(&self, id: &str, exec_id: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let req = ReadStreamRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            };
            let r = if stderr {
                self.client.read_stderr(ctx(), &req)
            } else {
                self.client.read_stdout(ctx(), &req)
            };
            let data = r.expect("read stream").data;
            if data.is_empty() {
                return String::from_utf8_lossy(&out).into_owned();
            }
            out.extend(data);
        }
    }

    /// Reads stdout until EOF.
    pub fn stdout(&self, id: &str, exec_id: &str) -> String {
        self.read_all(id, exec_id, false)
    }

    pub fn stderr(&self, id: &str, exec_id: &str) -> String {
        self.read_all(id, exec_id, true)
    }

    pub fn signal(&self, id: &str, exec_id: &str, sig: i32) {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal: sig as u32,
            ..Default::default()
        };
        self.client
            .signal_process(ctx(), &req)
            .expect("SignalProcess");
    }

    pub fn pids(&self, id: &str) -> Vec<i32> {
        let req = ListProcessesRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client
            .list_processes(ctx(), &req)
            .expect("ListProcesses")
            .pids
    }

    /// Mount points the host sees under the test's temp dir.
    pub fn host_mounts_under_dir(&self) -> Vec<String> {
        podbox_mountfd::mountinfo::read(None)
            .unwrap()
            .into_iter()
            .filter(|m| m.mount_point.starts_with(self.dir.path()))
            .map(|m| m.mount_point.display().to_string())
            .collect()
    }

    /// Waits for the agent process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Agent {
    /// Cleanup even after a failed assertion: kill the agent and whatever
    /// it left in its cgroups, then remove those cgroups.
    fn drop(&mut self) {
        // The pod's pause process is the agent's child outside the pod's
        // cgroups: kill the agent's children first, while they are still
        // findable by their parent pid.
        for pid in children_of(self.child.id() as i32) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let base = Path::new("/sys/fs/cgroup");
        let mut dirs = Vec::new();
        for ctl in ["", "memory", "cpu", "cpuacct", "pids", "freezer"] {
            let d = base.join(ctl).join(&self.cgroup_parent);
            if d.is_dir() && (ctl.is_empty() || base.join(ctl).join("cgroup.procs").exists()) {
                collect_dirs(&d, &mut dirs);
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::write(d.join("freezer.state"), "THAWED");
            for _ in 0..100 {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                if procs.trim().is_empty() {
                    break;
                }
                for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    out.push(d.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

pub fn process(args: &[&str], terminal: bool) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE"
    ]);
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
        "args": args,
        "env": ["PATH=/bin:/sbin:/usr/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A runtime spec in the shape containerd generates, for `args`.
pub fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process(args, false),
        "root": {"path": "rootfs"},
        "hostname": "ignored",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "resources": {"pids": {"limit": 100}, "cpu": {"shares": 512}},
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Pids whose parent is `parent` (from /proc/<pid>/stat).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            ppid == Some(parent)
        })
        .collect()
}

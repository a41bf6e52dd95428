//! The teardown a dropped [`Containerd`] runs: pods, tasks and containers,
//! the daemon, stragglers, then what is left on the host (mounts, network
//! namespaces, the bridge, cgroups, host directories containerd made).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use podbox_shim::hostfs::mount_points;

use crate::podbox::SHIM_BINARY;

use super::guard::Containerd;
use super::host::{
    cgroup_dirs, pids_in_cgroup_tree, pod_netns_paths, processes_naming, subdirectories,
};
use super::host_dirs::{guard_gone_was_last, remove_host_dirs_made_regardless};
use super::names::TEST_NAMESPACE;

const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long containerd gets to shut its shims down once nothing is left:
/// containerd sends Shutdown after a task's delete without waiting (`ctr
/// run --rm` has returned by then), and a podbox shim first stops its VM.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        let netns = self.remove_pods(&mut problems);
        self.remove_tasks_and_containers(&mut problems);
        self.wait_for_shims();
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

// --- teardown, in the order Drop runs it ---
impl Containerd {
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
            self.remove_tasks(namespace, problems);
            self.remove_containers(namespace, problems);
        }
    }

    fn remove_tasks(&self, namespace: &str, problems: &mut Vec<String>) {
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
    }

    fn remove_containers(&self, namespace: &str, problems: &mut Vec<String>) {
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

    /// Waits, up to [`SHIM_EXIT_TIMEOUT`], for this containerd's shims (their
    /// command line names its socket) to exit; what is left then is a
    /// straggler ([`Self::kill_stragglers`]).
    fn wait_for_shims(&self) {
        let deadline = Instant::now() + SHIM_EXIT_TIMEOUT;
        while !processes_naming(&self.grpc_socket).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; reaps the daemon.
    pub(super) fn stop_daemon(&mut self, problems: &mut Vec<String>) {
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
        let mut podbox_pods = Vec::new();
        for pid in pids {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            problems.push(format!(
                "process {pid} ({}) outlived containerd; killed",
                comm.trim()
            ));
            podbox_pods.extend(podbox_shim_pod(pid));
            // SAFETY: kill(2) with a pid read from our own shims' cgroups or command lines.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        // What containerd does for a shim that died: `shim delete`, which
        // stops the pod's VMM and removes its state dir and share mounts.
        for (shim, namespace, id) in podbox_pods {
            problems.push(format!("ran the podbox shim's delete for pod {id}"));
            shim_delete(&shim, &namespace, &id, problems);
        }
    }

    fn remove_host_state(&self, netns: &[PathBuf], problems: &mut Vec<String>) {
        self.unmount_leftovers(netns, problems);
        for path in netns.iter().filter(|p| p.exists()) {
            problems.push(format!("netns {} was left; removed", path.display()));
            let _ = std::fs::remove_file(path);
        }
        self.delete_bridge(problems);
        // runc removes each container's cgroup, not the parent we gave it.
        for cgroup in cgroup_dirs(&self.cgroup_parent) {
            remove_cgroup_tree(&cgroup, problems);
        }
        let last_guard = guard_gone_was_last();
        remove_host_dirs_made_regardless(last_guard);
    }

    /// Mounts first, deepest first: snapshots, rootfs, shm, netns.
    fn unmount_leftovers(&self, netns: &[PathBuf], problems: &mut Vec<String>) {
        let mut mounts: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(self.dir()) || netns.contains(m))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in mounts {
            problems.push(format!("{} was still mounted; unmounted", mount.display()));
            unmount(&mount);
        }
    }

    /// The CNI bridge plugin creates the bridge but never deletes it.
    fn delete_bridge(&self, problems: &mut Vec<String>) {
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            let deleted = Command::new("ip")
                .args(["link", "delete", &self.bridge])
                .status();
            if !deleted.is_ok_and(|s| s.success()) {
                problems.push(format!("could not delete bridge {}", self.bridge));
            }
        }
    }
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

fn remove_cgroup_tree(dir: &Path, problems: &mut Vec<String>) {
    for child in subdirectories(dir) {
        remove_cgroup_tree(&child, problems);
    }
    // A cgroup goes with rmdir once its children and processes are gone.
    if let Err(error) = std::fs::remove_dir(dir) {
        problems.push(format!("removing cgroup {}: {error}", dir.display()));
    }
}

/// A podbox shim process's binary, namespace and pod id, from its arguments.
fn podbox_shim_pod(pid: u32) -> Option<(PathBuf, String, String)> {
    let args = crate::process_args(pid)?;
    if !args.first()?.ends_with(SHIM_BINARY) {
        return None;
    }
    let value = |flag: &str| {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    };
    Some((PathBuf::from(&args[0]), value("-namespace")?, value("-id")?))
}

fn shim_delete(shim: &Path, namespace: &str, id: &str, problems: &mut Vec<String>) {
    let Ok(bundle) = tempfile::tempdir() else {
        problems.push("a bundle dir for the shim's delete".into());
        return;
    };
    let ran = Command::new(shim)
        .args(["-namespace", namespace, "-id", id, "-bundle"])
        .arg(bundle.path())
        .arg("delete")
        .stdout(std::process::Stdio::null())
        .status();
    if !ran.as_ref().is_ok_and(|s| s.success()) {
        problems.push(format!(
            "the podbox shim's delete for pod {id} failed: {ran:?}"
        ));
    }
}

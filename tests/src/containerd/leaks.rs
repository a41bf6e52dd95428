//! Counting what a guard's containerd and its pods hold on the host, and
//! what one podbox pod held, to show that creating and deleting pods
//! leaks none of it (issue 13, part 5).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use podbox_shim::hostfs::mount_points;

use super::config::Paths;
use super::faults::{is_alive, pod_processes};
use super::guard::Containerd;
use super::host::{cgroup_dirs, processes_in_cgroup, processes_naming, subdirectories};
use crate::cri::CriClient;
use crate::podbox::pod_leftovers;

/// Counts of what this guard's containerd and pods hold, by name. Two
/// counts taken with the same pods running are equal; a difference after
/// pods came and went is a leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCounts(pub BTreeMap<&'static str, usize>);

impl HostCounts {
    /// `name: before -> after` for each count that differs from `before`.
    pub fn differences(&self, before: &HostCounts) -> Vec<String> {
        self.0
            .iter()
            .filter(|(name, n)| before.0.get(*name) != Some(n))
            .map(|(name, n)| format!("{name}: {} -> {n}", before.0.get(name).unwrap_or(&0)))
            .collect()
    }
}

impl Containerd {
    /// What this guard's containerd and its pods hold now.
    pub fn host_counts(&self) -> HostCounts {
        let paths = Paths::new(self.dir());
        let mut counts = BTreeMap::new();
        counts.insert(
            "containerd open fds",
            entries(Path::new(&format!("/proc/{}/fd", self.daemon_pid))),
        );
        counts.insert(
            "processes naming containerd's socket (shims)",
            processes_naming(&self.grpc_socket).len(),
        );
        counts.insert(
            "processes in the pods' host cgroups",
            processes_in_cgroup(&self.cgroup_parent).len(),
        );
        counts.insert(
            "cgroups under the guard's parent, every hierarchy",
            cgroup_dirs(&self.cgroup_parent)
                .iter()
                .map(|dir| cgroup_tree_size(dir))
                .sum(),
        );
        counts.insert(
            "mounts under containerd's dir (snapshots, shm)",
            mount_points()
                .iter()
                .filter(|m| m.starts_with(self.dir()))
                .count(),
        );
        counts.insert(
            "interfaces on the CNI bridge",
            entries(&Path::new("/sys/class/net").join(&self.bridge).join("brif")),
        );
        counts.insert("files under containerd's state", files_in(&paths.state));
        counts.insert(
            "files under the CRI plugin's root",
            files_in(&paths.root.join("io.containerd.grpc.v1.cri")),
        );
        counts.insert("CNI IPAM files", files_in(&paths.cni_ipam));
        counts.insert("FIFOs in ctr's fifo dir", files_in(&paths.fifo));
        HostCounts(counts)
    }

    /// containerd's resident memory, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        crate::podbox::proc_kib(self.daemon_pid, "status", "VmRSS")
    }
}

/// What one podbox pod had on the host while it ran, to check that all of
/// it is gone after RemovePodSandbox.
#[derive(Debug, Clone)]
pub struct PodTrace {
    pub namespace: String,
    pub id: String,
    pub netns: Option<PathBuf>,
    pub shim_socket: Option<PathBuf>,
    pub pids: Vec<u32>,
    /// The shim's resident memory while the pod ran, KiB.
    pub shim_rss_kib: Option<u64>,
}

impl PodTrace {
    /// Records running pod `id` of `namespace`: its netns, shim socket,
    /// shim, VMM and virtiofsd.
    pub fn of_running_pod(cri: &mut CriClient, namespace: &str, id: &str) -> PodTrace {
        let processes = pod_processes(namespace, id);
        PodTrace {
            namespace: namespace.to_string(),
            id: id.to_string(),
            netns: cri.pod_netns_path(id).ok().flatten(),
            shim_socket: super::faults::shim_socket(id),
            pids: [processes.shim, processes.vmm, processes.virtiofsd]
                .into_iter()
                .flatten()
                .collect(),
            shim_rss_kib: processes
                .shim
                .and_then(|pid| crate::podbox::proc_kib(pid, "status", "VmRSS")),
        }
    }

    /// What of the pod is still there: its state dir, mounts and processes
    /// ([`pod_leftovers`]), its netns, shim socket, and recorded processes.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = pod_leftovers(&self.namespace, &self.id);
        for path in [&self.netns, &self.shim_socket].into_iter().flatten() {
            if path.exists() {
                left.push(format!("{}", path.display()));
            }
        }
        for pid in self.pids.iter().filter(|pid| is_alive(**pid)) {
            left.push(format!("process {pid} ({})", super::faults::comm(*pid)));
        }
        left
    }
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Files (anything but directories) in `dir` and below.
fn files_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files_in(&e.path()),
            _ => 1,
        })
        .sum()
}

/// `dir` and the cgroups below it.
fn cgroup_tree_size(dir: &Path) -> usize {
    1 + subdirectories(dir)
        .iter()
        .map(|d| cgroup_tree_size(d))
        .sum::<usize>()
}

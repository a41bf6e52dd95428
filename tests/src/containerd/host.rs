//! Looking at the host for what a guard made there: pod network namespaces,
//! cgroups and the processes in them, processes naming the guard's socket.
//! Used by the teardown and by [`super::Footprint`].

use std::path::{Path, PathBuf};

use crate::cri::CriClient;

/// Where the CRI plugin of containerd 1.6 bind-mounts pod network namespaces.
const NETNS_DIR: &str = "/var/run/netns";

pub(super) fn pod_netns_paths(cri: &mut CriClient) -> Vec<PathBuf> {
    let pods = cri.list_pod_sandboxes().unwrap_or_default();
    pods.iter()
        .filter_map(|pod| cri.pod_netns_path(&pod.id).ok().flatten())
        .filter(|p| p.starts_with(NETNS_DIR) || p.starts_with("/run/netns"))
        .collect()
}

/// `<mount>/<parent>` for every cgroup hierarchy (v1 controllers, v2) where it exists.
pub(super) fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    podbox_mountfd::mountinfo::read(None)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point.join(parent.trim_start_matches('/')))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// The processes in host cgroup `path` and below it, in any hierarchy.
pub fn processes_in_cgroup(path: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = cgroup_dirs(path)
        .iter()
        .flat_map(|dir| pids_in_cgroup_tree(dir))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

pub(super) fn pids_in_cgroup_tree(dir: &Path) -> Vec<u32> {
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

pub(super) fn subdirectories(dir: &Path) -> Vec<PathBuf> {
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
pub(super) fn processes_naming(needle: &Path) -> Vec<u32> {
    crate::processes_with_arg(|arg| Path::new(arg) == needle)
}

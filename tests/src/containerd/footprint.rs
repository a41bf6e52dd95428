//! What a [`Containerd`] made on the host, kept to check after drop that
//! none of it is left.

use std::path::{Path, PathBuf};

use podbox_shim::hostfs::mount_points;

use super::guard::Containerd;
use super::host::{cgroup_dirs, pod_netns_paths, processes_naming};

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

    /// Stops this containerd and asserts that neither it nor the podbox
    /// pod `pod` of `namespace` left anything on the host.
    pub fn stop_and_assert_clean(self, namespace: &str, pod: &str) {
        let footprint = self.footprint();
        drop(self);
        assert_eq!(
            footprint.leftovers(),
            Vec::<String>::new(),
            "containerd left things behind"
        );
        assert_eq!(
            crate::podbox::pod_leftovers(namespace, pod),
            Vec::<String>::new()
        );
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

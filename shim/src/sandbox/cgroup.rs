//! The pod's host cgroup. podbox-vmm, and the virtiofsd it starts, run in
//! the cgroup that the sandbox spec names (`linux.cgroupsPath`). That puts
//! the pod's whole footprint on the host (guest RAM, device threads, the
//! share's server) where the kubelet's pod limits and accounting are, as
//! Kata's `sandbox_cgroup_only` does.
//!
//! Both layouts are handled: cgroup v2 (one hierarchy at /sys/fs/cgroup)
//! and v1 (on hybrid hosts like this one: the memory, cpu, cpuacct and pids
//! hierarchies, each its own). The VMM's child joins before it execs, so no
//! thread of the VMM and nothing it starts is ever outside the pod's group.
//! Only cgroupfs-style paths are taken. A systemd-driver path
//! (`slice:prefix:name`) is left to systemd: the VMM then stays in the
//! shim's cgroup, and the shim logs that. The directories the shim made
//! are removed when the pod goes.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
/// The v1 hierarchies that account and limit what a VM costs the host.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
/// How long a removal waits for the VMM's last processes to leave.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {0:?}: not an absolute path without `..` components")]
    BadPath(String),
    #[error("creating cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The pod's cgroup directories, one per hierarchy.
#[derive(Debug)]
pub struct PodCgroup {
    /// The pod's directory in each hierarchy.
    dirs: Vec<PathBuf>,
    /// What this shim created (parents before children): what it removes.
    created: Vec<PathBuf>,
    /// Each directory's `cgroup.procs`, open for the VMM's child to join.
    procs: Vec<File>,
}

impl PodCgroup {
    /// Makes the pod's cgroup in every hierarchy this host has. `None`
    /// where the spec names none, or names it the systemd way.
    pub fn create(cgroups_path: Option<&str>) -> Result<Option<Self>, CgroupError> {
        let Some(path) = cgroups_path.filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        if path.contains(':') {
            tracing::warn!(
                "linux.cgroupsPath {path:?} is a systemd-driver path: podbox-vmm stays in the shim's cgroup"
            );
            return Ok(None);
        }
        let relative = relative_path(path)?;
        let mut cgroup = PodCgroup {
            dirs: Vec::new(),
            created: Vec::new(),
            procs: Vec::new(),
        };
        for root in hierarchies() {
            // On error, what was made so far goes again.
            if let Err(e) = cgroup.add(&root, &relative) {
                cgroup.remove();
                return Err(e);
            }
        }
        Ok(Some(cgroup))
    }

    fn add(&mut self, root: &Path, relative: &Path) -> Result<(), CgroupError> {
        let mut dir = root.to_path_buf();
        for component in relative.components() {
            dir.push(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => self.created.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
        let procs_path = dir.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|source| CgroupError::Open {
                path: procs_path,
                source,
            })?;
        self.procs.push(procs);
        self.dirs.push(dir);
        Ok(())
    }

    /// The `cgroup.procs` descriptors a child writes "0" to, to join.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// The pod's directory in each hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the directories this shim made, deepest first, once their
    /// processes are gone (a VMM's last threads may still be exiting).
    /// Gives back what could not be removed.
    pub fn remove(&self) -> Vec<String> {
        self.created
            .iter()
            .rev()
            .filter_map(|dir| remove_dir_waiting(dir))
            .collect()
    }
}

/// What a shim that was killed left: the pod's own directory (the leaf of
/// `cgroups_path`) in each hierarchy, for `delete`. Its parents may be the
/// kubelet's and stay.
pub fn remove_leftover(cgroups_path: Option<&str>) -> Vec<String> {
    let Some(path) = cgroups_path.filter(|p| !p.is_empty() && !p.contains(':')) else {
        return Vec::new();
    };
    let Ok(relative) = relative_path(path) else {
        return Vec::new();
    };
    hierarchies()
        .iter()
        .filter_map(|root| remove_dir_waiting(&root.join(&relative)))
        .collect()
}

/// Removes an empty cgroup, waiting a little while its last processes
/// leave (EBUSY); gives back a problem; an absent one is none.
fn remove_dir_waiting(dir: &Path) -> Option<String> {
    let deadline = std::time::Instant::now() + REMOVE_WAIT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.raw_os_error() == Some(libc::EBUSY) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Some(format!("removing cgroup {}: {e}", dir.display())),
        }
    }
}

/// Joins the cgroups whose `cgroup.procs` are `fds`: for a child between
/// fork and exec, so it only makes async-signal-safe calls.
///
/// # Safety
/// The descriptors must be open for writing.
pub unsafe fn join(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `path` without its leading `/`, refused if it is not absolute or has a
/// `..` component (it is joined below each hierarchy's root; `.`s drop out).
fn relative_path(path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadPath(path.to_string());
    let path = Path::new(path);
    let mut relative = PathBuf::new();
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(bad());
    }
    for component in components {
        match component {
            Component::Normal(name) => relative.push(name),
            _ => return Err(bad()),
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(relative)
}

/// The hierarchies to make the pod's cgroup in: the unified one on a
/// cgroup v2 host, else the v1 controllers this host mounts.
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    V1_CONTROLLERS
        .iter()
        .map(|c| root.join(c))
        .filter(|dir| dir.join("cgroup.procs").exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_absolute_paths_are_taken() {
        assert_eq!(
            relative_path("/kubepods/pod1/abc").unwrap(),
            Path::new("kubepods/pod1/abc")
        );
        for bad in ["relative/x", "/a/../../etc", "/..", "/", ""] {
            assert!(
                matches!(relative_path(bad), Err(CgroupError::BadPath(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn no_path_or_a_systemd_one_makes_no_cgroup() {
        assert!(PodCgroup::create(None).unwrap().is_none());
        assert!(PodCgroup::create(Some("")).unwrap().is_none());
        assert!(PodCgroup::create(Some("kubepods.slice:cri-containerd:abc"))
            .unwrap()
            .is_none());
    }

    /// Root only (it writes under /sys/fs/cgroup): a process joins the
    /// pod's group in every hierarchy, and the shim's directories go.
    #[test]
    fn a_child_joins_every_hierarchy_and_the_directories_go() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root to make cgroups");
            return;
        }
        let name = format!("/podbox-cgroup-test-{}/pod", std::process::id());
        let cgroup = PodCgroup::create(Some(&name)).unwrap().expect("a cgroup");
        assert!(!cgroup.dirs().is_empty());
        let fds = cgroup.join_fds();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        // SAFETY: join only writes to descriptors the parent keeps open.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(move || join(&fds));
        }
        let mut child = command.spawn().expect("sleep");
        let memberships = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let joined = memberships.lines().filter(|l| l.ends_with(&name)).count();
        assert_eq!(joined, cgroup.dirs().len(), "{memberships}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(cgroup.remove(), Vec::<String>::new());
        for dir in cgroup.dirs() {
            assert!(!dir.exists(), "{} left", dir.display());
            assert!(
                !dir.parent().unwrap().exists(),
                "the parent this test made is left"
            );
        }
    }

    /// Root only: after a shim is gone, `delete` removes the pod's own
    /// directory and leaves its parent.
    #[test]
    fn a_killed_shims_pod_cgroup_is_removed_leaving_the_parent() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: needs root to make cgroups");
            return;
        }
        let parent = format!("/podbox-cgroup-leftover-{}", std::process::id());
        let name = format!("{parent}/pod");
        let cgroup = PodCgroup::create(Some(&name)).unwrap().expect("a cgroup");
        let dirs = cgroup.dirs().to_vec();
        // The shim dies here: its PodCgroup is never removed.
        drop(cgroup);
        assert_eq!(remove_leftover(Some(&name)), Vec::<String>::new());
        for dir in &dirs {
            assert!(!dir.exists(), "{} left", dir.display());
            let parent = dir.parent().unwrap();
            assert!(parent.exists(), "the parent went too");
            std::fs::remove_dir(parent).unwrap();
        }
        assert_eq!(
            remove_leftover(Some(&name)),
            Vec::<String>::new(),
            "absent is fine"
        );
    }
}

//! Finding a podbox pod's host processes and its shim's socket, for the
//! tests that break them (kill -9, SIGSTOP) under a running pod.

use std::path::{Path, PathBuf};

use crate::podbox::{pod_state_dir, vmm_pid, SHIM_BINARY};

/// The host processes of one podbox pod (None: not running).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodProcesses {
    /// The long-lived shim serving the pod (its `-socket` server).
    pub shim: Option<u32>,
    pub vmm: Option<u32>,
    pub virtiofsd: Option<u32>,
}

/// Pod `pod_id`'s shim, VMM and virtiofsd in containerd namespace `namespace`.
pub fn pod_processes(namespace: &str, pod_id: &str) -> PodProcesses {
    let shim = pod_processes_shim(pod_id);
    let vmm = vmm_pid(namespace, pod_id).filter(|pid| is_alive(*pid));
    let state = pod_state_dir(namespace, pod_id).display().to_string();
    let virtiofsd = crate::processes_with_arg(|a| a.contains(&state))
        .into_iter()
        .find(|pid| comm(*pid) == "virtiofsd");
    PodProcesses {
        shim,
        vmm,
        virtiofsd,
    }
}

/// The long-lived shim of pod `pod_id`: the shim process with `-socket`
/// (not a `start` or `delete` run) whose `-id` is the pod's.
fn pod_processes_shim(pod_id: &str) -> Option<u32> {
    crate::processes_with_arg(|a| a == pod_id)
        .into_iter()
        .find(|pid| {
            crate::process_args(*pid).is_some_and(|args| {
                args.first().is_some_and(|a| a.ends_with(SHIM_BINARY))
                    && args.iter().any(|a| a == "-socket")
            })
        })
}

/// A process's `comm` (its executable's name, truncated to 15 bytes).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// The state letter of `/proc/<pid>/stat` (R, S, T for stopped, Z...).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2); the callers pass pids of this test's own pods.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// The unix socket pod `pod_id`'s shim serves containerd on (its
/// `-socket` argument, `unix:///run/containerd/s/<hash>`); None when no
/// shim serves the pod.
pub fn shim_socket(pod_id: &str) -> Option<PathBuf> {
    let shim = pod_processes_shim(pod_id)?;
    let args = crate::process_args(shim)?;
    let at = args.iter().position(|a| a == "-socket")?;
    let address = args.get(at + 1)?;
    Some(Path::new(address.trim_start_matches("unix://")).to_path_buf())
}

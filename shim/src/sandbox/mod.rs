//! A pod's VM as the shim sees it, from boot to its end: [`VmLauncher`]
//! boots one and hands back a [`Sandbox`] (its agent, its VMM process, its
//! state directory, and a cell the VMM's exit lands in); [`Sandbox::stop`]
//! and [`Sandbox::kill`] end it. podbox-vmm behind it is [`vmm`]; the
//! directory and share layout is [`state_dir`]; the pod's host cgroup,
//! which the VMM runs in, is [`cgroup`].

pub mod cgroup;
mod error;
pub mod state_dir;
pub mod vmm;

pub use error::{BootError, VmmError};

use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use podbox_agent_client::ctx;
use podbox_protocol::agent::DestroySandboxRequest;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::network::PodNetwork;
use crate::settings::VmSettings;
use state_dir::StateDir;

/// How long a destroyed VM gets to exit before SIGTERM, and SIGTERM before SIGKILL.
const VM_STOP_GRACE: Duration = Duration::from_secs(15);
const VM_TERM_GRACE: Duration = Duration::from_secs(5);
/// How long a SIGKILLed VMM may take to be reaped.
const VM_KILL_WAIT: Duration = Duration::from_secs(10);
/// DestroySandbox resets the guest; it answers at once or not at all.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(30);

/// Boots pod VMs: podbox-vmm ([`vmm::VmmLauncher`]), or a fake in tests.
#[async_trait]
pub trait VmLauncher: Send + Sync {
    /// Boots the VM of pod `pod_id` in the pod's network namespace, with
    /// the tap of `network` (if it has one) as its NIC, and waits until its
    /// agent answers. On error nothing of the VM is left (process, sockets,
    /// state); `network` is the caller's to tear down.
    async fn boot(
        &self,
        pod_id: &str,
        settings: VmSettings,
        network: Arc<PodNetwork>,
    ) -> Result<Arc<Sandbox>, BootError>;
}

/// A running VM of the pod.
pub struct Sandbox {
    pub agent: Arc<dyn Agent>,
    /// podbox-vmm's pid (containerd's "task pid" for every process of the
    /// pod); 0 when there is no process to signal (a fake VM).
    pub vmm_pid: u32,
    pub state: StateDir,
    /// The pod's netns and the wiring of its interface to the VM's NIC.
    pub network: Arc<PodNetwork>,
    /// Set before the shim itself ends the VM, so that its exit is not
    /// taken for a failure.
    stopping: AtomicBool,
    /// The VMM's exit, set once by whoever reaps it.
    gone: watch::Receiver<Option<ExitStatus>>,
}

impl Sandbox {
    pub fn new(
        agent: Arc<dyn Agent>,
        vmm_pid: u32,
        state: StateDir,
        gone: watch::Receiver<Option<ExitStatus>>,
        network: Arc<PodNetwork>,
    ) -> Self {
        Sandbox {
            agent,
            vmm_pid,
            state,
            network,
            stopping: AtomicBool::new(false),
            gone,
        }
    }

    /// The VMM's exit status once it has exited (its reaper may also have
    /// gone away without a status: then the VM counts as gone too).
    pub fn exit(&self) -> Option<ExitStatus> {
        *self.gone.borrow()
    }

    /// How the VMM ended, in words for the shim's log (see [`describe_exit`]).
    pub fn exit_description(&self) -> String {
        describe_exit(self.exit())
    }

    pub fn is_gone(&self) -> bool {
        self.gone.borrow().is_some() || self.gone.has_changed().is_err()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits until the VMM has exited.
    pub async fn gone(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|s| s.is_some()).await;
    }

    async fn gone_within(&self, limit: Duration) -> bool {
        gone_within(&self.gone, limit).await
    }

    /// SIGKILLs the VMM and waits (bounded) for it to be reaped; the
    /// state directory stays (callers remove it).
    pub async fn kill(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        kill_vmm(self.vmm_pid, &self.gone).await;
    }

    /// Ends the VM the orderly way (DestroySandbox resets the guest, the
    /// VMM exits 0 and stops virtiofsd), with SIGTERM and then SIGKILL
    /// behind it, and removes the pod's state directory and what the shim
    /// added to the pod's netns.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if !self.is_gone() {
            let agent = self.agent.clone();
            let destroyed = tokio::task::spawn_blocking(move || {
                agent.destroy_sandbox(ctx(DESTROY_TIMEOUT), &DestroySandboxRequest::default())
            })
            .await;
            if let Ok(Err(e)) = destroyed {
                tracing::warn!("DestroySandbox: {e}");
            }
            if !self.gone_within(VM_STOP_GRACE).await {
                tracing::warn!(
                    "podbox-vmm still running {VM_STOP_GRACE:?} after DestroySandbox; SIGTERM"
                );
                signal(self.vmm_pid, nix::sys::signal::Signal::SIGTERM);
                if !self.gone_within(VM_TERM_GRACE).await {
                    self.kill().await;
                }
            }
        }
        for problem in self.state.remove() {
            tracing::warn!("cleaning up the pod state: {problem}");
        }
        self.tear_down_network().await;
    }

    /// Leaves the pod's netns as CNI made it (idempotent).
    pub async fn tear_down_network(&self) {
        let network = self.network.clone();
        let _ = tokio::task::spawn_blocking(move || network.tear_down()).await;
    }
}

async fn gone_within(gone: &watch::Receiver<Option<ExitStatus>>, limit: Duration) -> bool {
    let mut gone = gone.clone();
    let exited = tokio::time::timeout(limit, gone.wait_for(|s| s.is_some())).await;
    exited.is_ok()
}

fn signal(vmm_pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(vmm_pid) {
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }
}

/// SIGKILLs the VMM `vmm_pid` and waits (bounded) for its reaper to see it go.
async fn kill_vmm(vmm_pid: u32, gone: &watch::Receiver<Option<ExitStatus>>) {
    signal(vmm_pid, nix::sys::signal::Signal::SIGKILL);
    if !gone_within(gone, VM_KILL_WAIT).await {
        tracing::warn!(
            pid = vmm_pid,
            "podbox-vmm not reaped {VM_KILL_WAIT:?} after SIGKILL"
        );
    }
}

/// A VMM exit status in words: its code, or the signal that killed it,
/// with what SIGSYS means here (podbox-vmm's seccomp filter).
pub fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    let Some(status) = status else {
        return "still running".into();
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(libc::SIGSYS)) => "killed by SIGSYS: a syscall outside podbox-vmm's seccomp \
             filter (the host's kernel log has its audit record, type 1326, naming it)"
            .into(),
        (None, Some(signal)) => format!(
            "killed by signal {signal} ({})",
            nix::sys::signal::Signal::try_from(signal).map_or("unknown", |s| s.as_str())
        ),
        (None, None) => format!("{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn vmm_exits_are_described_in_words() {
        assert_eq!(describe_exit(None), "still running");
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(6 << 8))),
            "exit status 6"
        );
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(libc::SIGKILL))),
            "killed by signal 9 (SIGKILL)"
        );
        let sigsys = describe_exit(Some(ExitStatus::from_raw(libc::SIGSYS)));
        assert!(
            sigsys.contains("SIGSYS") && sigsys.contains("seccomp"),
            "{sigsys}"
        );
    }
}

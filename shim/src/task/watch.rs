//! What runs beside the Task calls: the VM's exit, the agent's OOM events,
//! and each started process's exit.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use containerd_shim::protos::ttrpc::{self, Code};
use podbox_agent_client::ctx;
use podbox_protocol::agent::{GetOOMEventRequest, WaitProcessRequest};
use tokio::sync::watch;

use super::events::forward_oom_events;
use super::pod::{set_exit_once, Exit, VM_LOST_EXIT_STATUS};
use super::{log_problems, now, Inner};
use crate::io::{ProcessIo, Target};
use crate::sandbox::vmm::tail;
use crate::sandbox::Sandbox;

/// How long output copies may take to drain after a process exits.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Calls that block until something happens: asked again when they time out.
const LONG_POLL: Duration = Duration::from_secs(24 * 3600);
/// How long a waiter whose WaitProcess broke waits for the VM to be gone
/// (then the VM watcher records the exit), and how long it then leaves the
/// watcher to do so before recording one itself.
const VM_GONE_GRACE: Duration = Duration::from_secs(5);
const VM_WATCHER_HEADSTART: Duration = Duration::from_millis(500);
/// Lines of the VMM log and console logged when a VM dies.
const TAIL_LINES: usize = 20;

impl Inner {
    /// Waits for the VM's end: unless the shim ended it, every task of the
    /// pod gets TaskExit with [`VM_LOST_EXIT_STATUS`], and the pod's mounts,
    /// state directory and network wiring go.
    pub(super) fn watch_vm(self: &Arc<Self>, vm: &Arc<Sandbox>) {
        let (inner, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move {
            vm.gone().await;
            // Read first: a stop that begins now tears down itself.
            let lost = !vm.is_stopping();
            inner.vm_exited(&vm);
            if lost {
                // The tap went with the VMM; the CNI interface's qdisc must
                // go too, or the pod's traffic is redirected to nothing.
                vm.tear_down_network().await;
            }
        });
    }

    fn vm_exited(&self, vm: &Sandbox) {
        let exit = vm.exit_description();
        if vm.is_stopping() {
            tracing::info!("podbox-vmm exited ({exit}) as asked");
            return;
        }
        tracing::error!(
            "podbox-vmm exited unexpectedly ({exit}); every task of the pod is lost\n--- podbox-vmm ---\n{}\n--- guest console ---\n{}",
            tail(&vm.state.vmm_log(), TAIL_LINES),
            tail(&vm.state.console_log(), TAIL_LINES)
        );
        let shares: Vec<_> = {
            let pod = self.pod();
            let at = now();
            for container in pod.containers.values() {
                let processes = std::iter::once(&container.init).chain(container.execs.values());
                for process in processes {
                    let exit = Exit {
                        status: VM_LOST_EXIT_STATUS,
                        at: at.clone(),
                    };
                    if set_exit_once(&process.exit, exit.clone()) {
                        self.events.publish_exit(
                            &container.id,
                            &process.exec_id,
                            vm.vmm_pid,
                            &exit,
                        );
                    }
                }
            }
            pod.containers
                .values()
                .map(|c| (c.id.clone(), c.share.clone()))
                .collect()
        };
        for (id, share) in shares {
            log_problems(&id, share.remove());
        }
        log_problems("the pod state", vm.state.remove());
    }

    /// Forwards the agent's OOM events until the VM goes.
    pub(super) fn watch_oom(self: &Arc<Self>, vm: &Sandbox) {
        let agent = vm.agent.clone();
        let inner = self.clone();
        std::thread::spawn(move || {
            let next = || loop {
                match agent.get_oom_event(ctx(LONG_POLL), &GetOOMEventRequest::default()) {
                    Ok(event) => return Some(event.container_id),
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::DEADLINE_EXCEEDED => {}
                    Err(e) => {
                        tracing::debug!("OOM watch ended: {e}");
                        return None;
                    }
                }
            };
            let is_ours = |id: &str| inner.pod().containers.contains_key(id);
            forward_oom_events(next, is_ours, |event| inner.events.publish_droppable(event));
        });
    }

    /// Waits for a started process in the agent, then for its output to
    /// drain, then records the exit and publishes TaskExit.
    pub(super) fn spawn_waiter(
        self: &Arc<Self>,
        target: Target,
        vm: Arc<Sandbox>,
        exit_cell: Arc<watch::Sender<Option<Exit>>>,
        io: Arc<StdMutex<Option<ProcessIo>>>,
    ) {
        let inner = self.clone();
        let pid = vm.vmm_pid;
        std::thread::spawn(move || {
            let request = WaitProcessRequest {
                container_id: target.container_id.clone(),
                exec_id: target.exec_id.clone(),
                ..Default::default()
            };
            let waited = loop {
                match target.agent.wait_process(ctx(LONG_POLL), &request) {
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::DEADLINE_EXCEEDED => {
                        continue
                    }
                    other => break other,
                }
            };
            let status = match waited {
                Ok(response) => u32::try_from(response.status).unwrap_or(VM_LOST_EXIT_STATUS),
                Err(e) => {
                    tracing::warn!(container = %target.container_id, exec = %target.exec_id, "WaitProcess failed: {e}");
                    // A dying VM breaks the agent's connection a moment
                    // before its VMM is reaped. The VM watcher records the
                    // exits then, after logging why the VM ended (the
                    // guest's panic, say); an exit recorded here first
                    // would send containerd deleting the pod, and the
                    // VM's end would pass for a stop the shim asked for.
                    // Only a VM still there after the grace is left to this.
                    let waited = std::time::Instant::now();
                    while !vm.is_gone() && waited.elapsed() < VM_GONE_GRACE {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if vm.is_gone() {
                        std::thread::sleep(VM_WATCHER_HEADSTART);
                    }
                    VM_LOST_EXIT_STATUS
                }
            };
            if let Some(mut io) = io.lock().unwrap_or_else(|e| e.into_inner()).take() {
                io.finish(DRAIN_LIMIT);
            }
            let exit = Exit { status, at: now() };
            if set_exit_once(&exit_cell, exit.clone()) {
                inner
                    .events
                    .publish_exit(&target.container_id, &target.exec_id, pid, &exit);
            }
        });
    }
}

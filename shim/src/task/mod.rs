//! containerd's Task API for one pod, over the pod's VM and agent.
//!
//! The first container (a CRI sandbox, or a `ctr run` container) boots the
//! VM in Create; later containers of the pod go into the same VM. The pod's
//! state sits behind one short-held lock ([`pod::PodState`]): a boot, an
//! agent call or an output drain never runs under it, so State, Kill,
//! Wait, Pids and Stats of one container answer while another container is
//! being created or started. Creates take turns among themselves (the
//! `lifecycle` lock), since the first one's boot is what the others need.
//!
//! Agent calls are blocking ttrpc behind the [`Agent`](crate::agent::Agent)
//! trait: they run on tokio's blocking pool (or on dedicated threads for
//! calls that block as long as a process lives).

mod lifecycle;
pub mod pod;
mod process;
mod watch;

pub mod events;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{self, context::Context, Code};
use containerd_shim::{ExitSignal, Task, TtrpcContext, TtrpcResult};
use podbox_agent_client::ctx;

use crate::sandbox::vmm::VmmLauncher;
use crate::sandbox::{Sandbox, VmLauncher};
use crate::settings::config::Config;
pub use events::{EventMessage, EventSenders, OOM_EVENT_QUEUE};
use pod::PodState;

pub struct PodService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    config: Config,
    launcher: Arc<dyn VmLauncher>,
    pod: StdMutex<PodState>,
    /// Held by Create (and by the Delete that ends the VM) for its whole
    /// run: Creates take turns, nothing else waits on it.
    lifecycle: tokio::sync::Mutex<()>,
    events: EventSenders,
    exit: Arc<ExitSignal>,
}

impl PodService {
    /// The pod's Task service, booting VMs with podbox-vmm.
    pub fn new(
        namespace: &str,
        config: Config,
        events: EventSenders,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let launcher = Arc::new(VmmLauncher {
            namespace: namespace.to_string(),
            config: config.clone(),
        });
        Self::with_launcher(namespace, config, launcher, events, exit)
    }

    /// The same over another way to boot VMs (tests).
    pub fn with_launcher(
        namespace: &str,
        config: Config,
        launcher: Arc<dyn VmLauncher>,
        events: EventSenders,
        exit: Arc<ExitSignal>,
    ) -> Self {
        PodService {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                config,
                launcher,
                pod: StdMutex::new(PodState::default()),
                lifecycle: tokio::sync::Mutex::new(()),
                events,
                exit,
            }),
        }
    }

    /// containerd asks after every task delete; the shim serves the whole
    /// pod, so it goes only with the pod's last container (and not while a
    /// Create is under way).
    pub fn shutdown_if_empty(&self) {
        let inner = self.inner.clone();
        let Ok(_turn) = inner.lifecycle.try_lock() else {
            // Asked again once the Create is done: if it failed, nothing
            // else would ask, and the shim would outlive its pod.
            tokio::spawn(async move {
                let _turn = inner.lifecycle.lock().await;
                inner.exit_if_empty();
            });
            return;
        };
        inner.exit_if_empty();
    }

    /// Tears down whatever is left (on shim exit): the VM and every mount.
    pub async fn cleanup(&self) {
        let (containers, vm) = {
            let mut pod = self.inner.pod();
            let containers: Vec<_> = pod.containers.drain().map(|(_, c)| c).collect();
            (containers, pod.vm.take())
        };
        for container in &containers {
            log_problems(&container.id, container.share.remove());
        }
        if let Some(vm) = vm {
            vm.stop().await;
        }
    }
}

impl Inner {
    fn exit_if_empty(&self) {
        if self.pod().containers.is_empty() {
            tracing::info!("last container deleted; shim exiting");
            self.exit.signal();
        }
    }

    /// The pod's state, for a moment: never held across an await.
    fn pod(&self) -> MutexGuard<'_, PodState> {
        self.pod.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pod's VM, for a call on container `container_id`.
    fn vm_for(&self, container_id: &str) -> TtrpcResult<Arc<Sandbox>> {
        let pod = self.pod();
        if !pod.containers.contains_key(container_id) {
            return Err(not_found(container_id, ""));
        }
        let vm = pod
            .vm
            .clone()
            .ok_or_else(|| status(Code::UNAVAILABLE, "the pod has no VM"))?;
        if vm.is_gone() {
            return Err(status(Code::UNAVAILABLE, "the pod's VM is gone"));
        }
        Ok(vm)
    }
}

/// Process `exec_id` (empty: the init) of container `id`, or NOT_FOUND
/// naming what is missing.
fn find_process<'a>(pod: &'a PodState, id: &str, exec_id: &str) -> TtrpcResult<&'a pod::Process> {
    pod.containers
        .get(id)
        .ok_or_else(|| not_found(id, ""))?
        .process(exec_id)
        .ok_or_else(|| not_found(id, exec_id))
}

fn find_process_mut<'a>(
    pod: &'a mut PodState,
    id: &str,
    exec_id: &str,
) -> TtrpcResult<&'a mut pod::Process> {
    pod.containers
        .get_mut(id)
        .ok_or_else(|| not_found(id, ""))?
        .process_mut(exec_id)
        .ok_or_else(|| not_found(id, exec_id))
}

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn not_found(id: &str, exec_id: &str) -> ttrpc::Error {
    if exec_id.is_empty() {
        status(
            Code::NOT_FOUND,
            format!("container {id} not found in this pod"),
        )
    } else {
        status(
            Code::NOT_FOUND,
            format!("exec {exec_id} of container {id} not found"),
        )
    }
}

/// An agent error as containerd should see it: the agent's own status
/// (NOT_FOUND, INVALID_ARGUMENT, ...) passes through; a call the agent did
/// not answer within its `timeout` is DEADLINE_EXCEEDED, saying so (a hung
/// or stopped guest: containerd and its client get a clear error, not a
/// call that never returns); a broken connection is UNAVAILABLE.
fn agent_error(what: &str, timeout: Duration, error: ttrpc::Error) -> ttrpc::Error {
    match error {
        ttrpc::Error::RpcStatus(mut s) => {
            s.message = format!("{what}: {}", s.message);
            ttrpc::Error::RpcStatus(s)
        }
        other if is_timeout(&other) => status(
            Code::DEADLINE_EXCEEDED,
            format!(
                "{what}: the pod's agent did not answer within {timeout:?} \
                 (the guest is hung or overloaded)"
            ),
        ),
        other => status(
            Code::UNAVAILABLE,
            format!("{what}: the pod's agent is unreachable: {other}"),
        ),
    }
}

/// A ttrpc sync client's own deadline passing: ttrpc 0.10 reports it only
/// as text, "Receive packet from Receiver timeout: timed out waiting on
/// channel" (a closed connection is "... error: ..." or Error::Socket,
/// LocalClosed); the unit test `a_call_past_its_deadline_is_deadline_exceeded`
/// pins it against a real client.
fn is_timeout(error: &ttrpc::Error) -> bool {
    matches!(error, ttrpc::Error::Others(text) if text.contains("timeout") && text.contains("timed out"))
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn log_problems(what: &str, problems: Vec<String>) {
    for problem in problems {
        tracing::warn!("cleaning up {what}: {problem}");
    }
}

/// Runs agent call `what` off the async threads with a deadline of
/// `timeout` (the context `call` gets), its error as containerd should see
/// it ([`agent_error`]). Every shim -> agent call of a Task request goes
/// through here, so none waits on a hung guest for longer than its deadline.
async fn agent_call<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    call: impl FnOnce(Context) -> ttrpc::Result<T> + Send + 'static,
) -> TtrpcResult<T> {
    blocking(move || call(ctx(timeout)))
        .await?
        .map_err(|e| agent_error(what, timeout, e))
}

/// Runs a blocking agent call off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> TtrpcResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| status(Code::INTERNAL, format!("agent call panicked: {e}")))
}

#[async_trait]
impl Task for PodService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        self.inner.create(req).await
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        self.inner.start(req).await
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> TtrpcResult<containerd_shim::api::DeleteResponse> {
        self.inner.delete(req).await
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.inner.exec(req)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        self.inner.state(req)
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        self.inner.wait(req).await
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.inner.kill(req).await
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        self.inner.pids(req).await
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.inner.close_io(req).await
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.inner.resize_pty(req).await
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.inner.update(req).await
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        self.inner.stats(req).await
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.inner.set_paused(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.inner.set_paused(&req.id, false).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let pod = self.inner.pod();
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pod.vm.as_ref().map(|vm| vm.vmm_pid).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        self.shutdown_if_empty();
        Ok(Empty::new())
    }
}

//! containerd's Task API for one pod, backed by the pod's VM and agent.
//!
//! The first container (a CRI sandbox, or a `ctr run` container) boots the
//! VM in Create; later containers of the pod go into the same VM. Agent
//! calls are blocking ttrpc: they run on tokio's blocking pool (or on
//! dedicated threads for calls that block as long as a process lives).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::event::Event;
use containerd_shim::protos::api::{ProcessInfo, Status};
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::{DeleteResponse, ExitSignal, Task, TtrpcContext, TtrpcResult};
use podbox_agent_client::{ctx, AgentClient, ReadyListener, VmProgress};
use podbox_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest,
    ExecProcessRequest as AgentExec, GetOOMEventRequest, IPAddress, Interface,
    ListProcessesRequest, PauseContainerRequest, RemoveContainerRequest, ResumeContainerRequest,
    SignalProcessRequest, StartContainerRequest, StatsContainerRequest, Storage,
    TtyWinResizeRequest, UpdateContainerRequest, UpdateInterfaceRequest, WaitProcessRequest,
};
use tokio::sync::{mpsc, watch, Mutex};

use crate::annotations::{PodRole, VmSettings};
use crate::config::Config;
use crate::io::{close_stdin, ProcessIo, StdioPaths, Target};
use crate::pod::{
    set_exit_once, Container, Exit, Phase, PodState, Process, Vm, VM_LOST_EXIT_STATUS,
};
use crate::rootfs::{ContainerShare, RootfsError};
use crate::vm::{
    self, StateDir, VmLaunch, AGENT_OVERALL_LIMIT, AGENT_STALL_LIMIT, GUEST_SHARE, SHARE_TAG,
};

/// Agent calls that should answer at once.
/// OOM events waiting for containerd. They are the events the guest can
/// make as many of as it likes, so they have a queue of their own that
/// drops what does not fit; lifecycle events (create, start, exit, delete:
/// at most a few per process containerd asked for) are never dropped.
pub const OOM_EVENT_QUEUE: usize = 64;

/// Where the shim's events go: see [`OOM_EVENT_QUEUE`].
pub struct EventSenders {
    pub lifecycle: mpsc::UnboundedSender<EventMessage>,
    pub oom: mpsc::Sender<EventMessage>,
}
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// CreateContainer mounts and forks in the guest, whose kernel is slow on PVM.
const CREATE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long output copies may take to drain after a process exits.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long a destroyed VM gets to exit before SIGKILL.
const VM_STOP_GRACE: Duration = Duration::from_secs(15);
const EXEC_SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
const METRICS_TYPE: &str = "io.containerd.cgroups.v1.Metrics";

/// An event for containerd, in publishing order.
pub type EventMessage = Box<dyn Event + Send + Sync>;

pub struct PodService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    config: Config,
    pod: Mutex<PodState>,
    events: EventSenders,
    exit: Arc<ExitSignal>,
}

impl PodService {
    pub fn new(
        namespace: &str,
        config: Config,
        events: EventSenders,
        exit: Arc<ExitSignal>,
    ) -> Self {
        PodService {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                config,
                pod: Mutex::new(PodState::default()),
                events,
                exit,
            }),
        }
    }

    /// Tears down whatever is left (on shim exit): the VM and every mount.
    pub async fn cleanup(&self) {
        let mut pod = self.inner.pod.lock().await;
        let containers: Vec<Container> = pod.containers.drain().map(|(_, c)| c).collect();
        for container in &containers {
            log_problems(&container.id, container.share.remove());
        }
        if let Some(vm) = pod.vm.take() {
            stop_vm(&vm).await;
        }
    }
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
/// (NOT_FOUND, INVALID_ARGUMENT, ...) passes through; a broken connection is UNAVAILABLE.
fn agent_error(what: &str, error: ttrpc::Error) -> ttrpc::Error {
    match error {
        ttrpc::Error::RpcStatus(mut s) => {
            s.message = format!("{what}: {}", s.message);
            ttrpc::Error::RpcStatus(s)
        }
        other => status(
            Code::UNAVAILABLE,
            format!("{what}: the pod's agent is unreachable: {other}"),
        ),
    }
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn log_problems(what: &str, problems: Vec<String>) {
    for problem in problems {
        tracing::warn!("cleaning up {what}: {problem}");
    }
}

/// Runs a blocking agent call off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> TtrpcResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| status(Code::INTERNAL, format!("agent call panicked: {e}")))
}

impl Inner {
    fn publish(&self, event: EventMessage) {
        // The receiver lives as long as the server; a send fails only at shutdown.
        let _ = self.events.lifecycle.send(event);
    }

    /// An event the guest controls the rate of (OOM): dropped, and
    /// logged, when containerd is not keeping up.
    fn publish_droppable(&self, event: EventMessage) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.oom.try_send(event) {
            tracing::warn!("OOM event queue full; dropped {}", event.topic());
        }
    }

    fn publish_exit(&self, container_id: &str, exec_id: &str, pid: u32, exit: &Exit) {
        self.publish(Box::new(TaskExit {
            container_id: container_id.to_string(),
            id: if exec_id.is_empty() {
                container_id.to_string()
            } else {
                exec_id.to_string()
            },
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            ..Default::default()
        }));
    }

    /// Boots the pod's VM for `sandbox_id` and creates the agent's sandbox.
    async fn boot_vm(
        self: &Arc<Self>,
        sandbox_id: &str,
        settings: VmSettings,
        hostname: String,
    ) -> TtrpcResult<Arc<Vm>> {
        let state = StateDir::for_pod(&self.namespace, sandbox_id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        // A previous shim of this pod that was killed may have left it.
        log_problems(sandbox_id, state.remove());
        let launch = VmLaunch {
            vmm: vm::find_vmm().map_err(|e| status(Code::FAILED_PRECONDITION, e.to_string()))?,
            settings,
            virtiofsd: Some(self.config.virtiofsd.clone()).filter(|p| p.is_file()),
            fs_cache: self.config.fs_cache.clone(),
            log_max_bytes: self.config.log_max_bytes,
        };
        state.create().map_err(|e| {
            log_problems(sandbox_id, state.remove());
            status(Code::INTERNAL, e.to_string())
        })?;
        // Bound before the VMM starts, so the agent's ready call cannot
        // come too early to be seen.
        let mut ready = match ReadyListener::bind(&state.vsock_socket()) {
            Ok(ready) => ready,
            Err(e) => {
                log_problems(sandbox_id, state.remove());
                return Err(status(
                    Code::INTERNAL,
                    format!(
                        "binding the agent's ready socket in {}: {e}",
                        state.dir.display()
                    ),
                ));
            }
        };
        let mut child = match vm::spawn_vmm(&launch, &state) {
            Ok(child) => child,
            Err(e) => {
                log_problems(sandbox_id, state.remove());
                return Err(status(Code::INTERNAL, e.to_string()));
            }
        };
        let vmm_pid = child.id().unwrap_or_default();
        tracing::info!(
            pod = sandbox_id,
            vmm_pid,
            "started {} {:?}",
            launch.vmm.display(),
            vm::vmm_args(&launch, &state)
        );

        let gone = Arc::new(watch::channel(None).0);
        let mut gone_rx = gone.subscribe();
        // The supervisor owns the child: it is the one place that reaps it.
        let supervisor_gone = gone.clone();
        let vm_slot: Arc<StdMutex<Option<Arc<Vm>>>> = Arc::new(StdMutex::new(None));
        let vm_slot_for_supervisor = vm_slot.clone();
        let inner = self.clone();
        tokio::spawn(async move {
            let exit = child.wait().await;
            let exit_status = match exit {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("waiting for podbox-vmm: {e}");
                    std::os::unix::process::ExitStatusExt::from_raw(255 << 8)
                }
            };
            supervisor_gone.send_replace(Some(exit_status));
            let vm = vm_slot_for_supervisor
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(vm) = vm {
                inner.vm_exited(&vm, exit_status).await;
            }
        });

        let socket = state.vsock_socket();
        let mut connect = tokio::task::spawn_blocking(move || {
            let mut progress = VmProgress::new(vmm_pid, AGENT_STALL_LIMIT, AGENT_OVERALL_LIMIT);
            AgentClient::connect_when_ready(&socket, &mut ready, &mut progress)
        });
        let boot_failed = |reason: String| {
            let console = vm::tail(&state.console_log(), 20);
            let vmm_log = vm::tail(&state.vmm_log(), 20);
            status(Code::INTERNAL, format!("booting the pod VM: {reason}\n--- podbox-vmm ---\n{vmm_log}\n--- guest console ---\n{console}"))
        };
        let joined = tokio::select! {
            joined = &mut connect => Some(joined),
            _ = gone_rx.wait_for(|s| s.is_some()) => None,
        };
        let agent = match joined {
            Some(Ok(Ok(agent))) => Ok(agent),
            Some(Ok(Err(e))) => Err(boot_failed(e.to_string())),
            Some(Err(e)) => Err(boot_failed(format!("agent connect task: {e}"))),
            None => {
                // The connect task sees the VMM gone within a check; it
                // owns the ready socket, which must go before the state
                // dir does (a new boot of this pod would bind it again).
                let _ = connect.await;
                let exit = *gone_rx.borrow();
                Err(boot_failed(format!(
                    "podbox-vmm exited during boot ({exit:?})"
                )))
            }
        };
        let vm = Arc::new(Vm {
            agent: match agent {
                Ok(agent) => agent,
                Err(e) => {
                    kill_vmm(vmm_pid, &gone).await;
                    log_problems(sandbox_id, state.remove());
                    return Err(e);
                }
            },
            vmm_pid,
            state: state.clone(),
            stopping: AtomicBool::new(false),
            gone,
        });
        *vm_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.clone());
        tracing::info!(pod = sandbox_id, "agent answered");

        let agent = vm.agent.agent.clone();
        let request = CreateSandboxRequest {
            sandbox_id: sandbox_id.to_string(),
            hostname,
            storages: vec![Storage {
                driver: "virtiofs".into(),
                source: SHARE_TAG.into(),
                mount_point: GUEST_SHARE.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        if let Err(e) = blocking(move || agent.create_sandbox(ctx(CREATE_TIMEOUT), &request))
            .await?
            .map_err(|e| agent_error("CreateSandbox", e))
        {
            stop_vm(&vm).await;
            return Err(e);
        }
        // The guest has no NIC yet (no virtio-net): the pod's network is the
        // guest's loopback, which the containers share. It starts down.
        let agent = vm.agent.agent.clone();
        let lo = UpdateInterfaceRequest {
            interface: MessageField::some(Interface {
                name: "lo".into(),
                ip_addresses: vec![IPAddress {
                    family: "inet".into(),
                    address: "127.0.0.1".into(),
                    mask: "8".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        if let Err(e) = blocking(move || agent.update_interface(ctx(CALL_TIMEOUT), &lo))
            .await?
            .map_err(|e| agent_error("UpdateInterface lo", e))
        {
            stop_vm(&vm).await;
            return Err(e);
        }
        self.watch_oom(&vm);
        Ok(vm)
    }

    /// Forwards the agent's OOM events until the VM goes.
    fn watch_oom(self: &Arc<Self>, vm: &Arc<Vm>) {
        let agent = vm.agent.agent.clone();
        let inner = self.clone();
        std::thread::spawn(move || {
            let next = || loop {
                match agent.get_oom_event(
                    ctx(Duration::from_secs(24 * 3600)),
                    &GetOOMEventRequest::default(),
                ) {
                    Ok(event) => return Some(event.container_id),
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::DEADLINE_EXCEEDED => {}
                    Err(e) => {
                        tracing::debug!("OOM watch ended: {e}");
                        return None;
                    }
                }
            };
            let is_ours = |id: &str| inner.pod.blocking_lock().containers.contains_key(id);
            forward_oom_events(next, is_ours, |event| inner.publish_droppable(event));
        });
    }

    /// The VMM exited. Unless the shim ended it, every task of the pod gets
    /// TaskExit with [`VM_LOST_EXIT_STATUS`], and the pod's mounts and
    /// state directory go.
    async fn vm_exited(&self, vm: &Arc<Vm>, exit: std::process::ExitStatus) {
        if vm.is_stopping() {
            tracing::info!("podbox-vmm exited ({exit}) as asked");
            return;
        }
        tracing::error!(
            "podbox-vmm exited unexpectedly ({exit}); every task of the pod is lost\n--- podbox-vmm ---\n{}\n--- guest console ---\n{}",
            vm::tail(&vm.state.vmm_log(), 20),
            vm::tail(&vm.state.console_log(), 20)
        );
        let pod = self.pod.lock().await;
        let at = now();
        for container in pod.containers.values() {
            let processes = std::iter::once(&container.init).chain(container.execs.values());
            for process in processes {
                let exit = Exit {
                    status: VM_LOST_EXIT_STATUS,
                    at: at.clone(),
                };
                if set_exit_once(&process.exit, exit.clone()) {
                    self.publish_exit(&container.id, &process.exec_id, vm.vmm_pid, &exit);
                }
            }
            log_problems(&container.id, container.share.remove());
        }
        log_problems("the pod state", vm.state.remove());
    }

    /// Waits for a started process in the agent, then for its output to
    /// drain, then records the exit and publishes TaskExit.
    fn spawn_waiter(
        self: &Arc<Self>,
        target: Target,
        pid: u32,
        exit_cell: Arc<watch::Sender<Option<Exit>>>,
        io: Arc<StdMutex<Option<ProcessIo>>>,
    ) {
        let inner = self.clone();
        std::thread::spawn(move || {
            let request = WaitProcessRequest {
                container_id: target.container_id.clone(),
                exec_id: target.exec_id.clone(),
                ..Default::default()
            };
            let waited = loop {
                match target
                    .agent
                    .wait_process(ctx(Duration::from_secs(24 * 3600)), &request)
                {
                    Err(ttrpc::Error::RpcStatus(s)) if s.code() == Code::DEADLINE_EXCEEDED => {
                        continue
                    }
                    other => break other,
                }
            };
            let status = match waited {
                Ok(response) => u32::try_from(response.status).unwrap_or(VM_LOST_EXIT_STATUS),
                Err(e) => {
                    // The VM supervisor records the exit when the VM is gone.
                    tracing::warn!(container = %target.container_id, exec = %target.exec_id, "WaitProcess failed: {e}");
                    VM_LOST_EXIT_STATUS
                }
            };
            if let Some(mut io) = io.lock().unwrap_or_else(|e| e.into_inner()).take() {
                io.finish(DRAIN_LIMIT);
            }
            let exit = Exit { status, at: now() };
            if set_exit_once(&exit_cell, exit.clone()) {
                inner.publish_exit(&target.container_id, &target.exec_id, pid, &exit);
            }
        });
    }
}

/// SIGKILLs the VMM and waits for the supervisor to see it go.
async fn kill_vmm(pid: u32, gone: &watch::Sender<Option<std::process::ExitStatus>>) {
    if pid == 0 {
        return;
    }
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mut rx = gone.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.is_some())).await;
}

/// Ends the VM the orderly way (DestroySandbox resets the guest, the VMM
/// exits 0 and stops virtiofsd), with SIGTERM and then SIGKILL behind it,
/// and removes the pod's state directory.
async fn stop_vm(vm: &Arc<Vm>) {
    vm.mark_stopping();
    if !vm.is_gone() {
        let agent = vm.agent.agent.clone();
        let destroyed = blocking(move || {
            agent.destroy_sandbox(
                ctx(Duration::from_secs(30)),
                &DestroySandboxRequest::default(),
            )
        })
        .await;
        if let Ok(Err(e)) = destroyed {
            tracing::warn!("DestroySandbox: {e}");
        }
        let mut rx = vm.gone.subscribe();
        if tokio::time::timeout(VM_STOP_GRACE, rx.wait_for(|s| s.is_some()))
            .await
            .is_err()
        {
            tracing::warn!(
                "podbox-vmm still running {VM_STOP_GRACE:?} after DestroySandbox; SIGTERM"
            );
            if let Ok(pid) = i32::try_from(vm.vmm_pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.is_some()))
                .await
                .is_err()
            {
                kill_vmm(vm.vmm_pid, &vm.gone).await;
            }
        }
    }
    log_problems("the pod state", vm.state.remove());
}

/// Publishes TaskOOM for each container id `next` yields (the agent's
/// OOM events) until it yields None. The agent is in the guest: an event
/// naming a container that is not this pod's is dropped, not passed on.
fn forward_oom_events(
    mut next: impl FnMut() -> Option<String>,
    is_ours: impl Fn(&str) -> bool,
    publish: impl Fn(EventMessage),
) {
    let mut ignored = 0u64;
    while let Some(container_id) = next() {
        if !is_ours(&container_id) {
            // Logged once, so a flood cannot flood the log either.
            if ignored == 0 {
                tracing::warn!(container = ?container_id, "OOM event for a container not in this pod ignored");
            }
            ignored += 1;
            continue;
        }
        tracing::warn!(container = %container_id, "OOM kill in the guest");
        publish(Box::new(TaskOOM {
            container_id,
            ..Default::default()
        }));
    }
    if ignored > 0 {
        tracing::warn!("{ignored} OOM events for containers not in this pod ignored");
    }
}

/// The annotations and hostname of a bundle's spec.
fn bundle_facts(bundle: &Path) -> TtrpcResult<(std::collections::HashMap<String, String>, String)> {
    #[derive(serde::Deserialize)]
    struct Facts {
        #[serde(default)]
        annotations: std::collections::HashMap<String, String>,
        #[serde(default)]
        hostname: String,
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        status(
            Code::INVALID_ARGUMENT,
            format!("reading {}: {e}", path.display()),
        )
    })?;
    let facts: Facts = serde_json::from_str(&text).map_err(|e| {
        status(
            Code::INVALID_ARGUMENT,
            format!("parsing {}: {e}", path.display()),
        )
    })?;
    Ok((facts.annotations, facts.hostname))
}

fn state_status(phase: Phase) -> Status {
    match phase {
        Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Paused => Status::PAUSED,
        Phase::Stopped => Status::STOPPED,
    }
}

#[async_trait]
impl Task for PodService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let inner = &self.inner;
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "podbox cannot restore checkpoints",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let (annotations, hostname) = bundle_facts(&bundle)?;
        let role = PodRole::from_annotations(&annotations)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let mut pod = inner.pod.lock().await;
        if pod.containers.contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let owns_vm = pod.vm.is_none();
        if owns_vm {
            if let PodRole::Container { sandbox_id } = &role {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("pod {sandbox_id} has no VM in this shim"),
                ));
            }
            let settings = VmSettings::resolve(&inner.config, &annotations)
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
            vm::check_fits_host(&settings)
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
            let hostname = if hostname.is_empty() {
                req.id.clone()
            } else {
                hostname
            };
            pod.vm = Some(inner.boot_vm(&req.id, settings, hostname).await?);
        }
        let vm = pod
            .vm
            .clone()
            .ok_or_else(|| status(Code::INTERNAL, "the pod VM vanished"))?;
        if vm.is_gone() {
            return Err(status(Code::UNAVAILABLE, "the pod's VM is gone"));
        }

        let share = ContainerShare::new(&vm.state, &req.id);
        let prepared = async {
            let spec = share.prepare(&req.rootfs, &bundle).await.map_err(|e| {
                let code = match e {
                    RootfsError::Spec { .. } => Code::INVALID_ARGUMENT,
                    _ => Code::INTERNAL,
                };
                status(code, e.to_string())
            })?;
            let spec_json =
                serde_json::to_vec(&spec).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            let agent = vm.agent.agent.clone();
            let request = CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec_json: spec_json,
                rootfs: share.guest_rootfs().display().to_string(),
                ..Default::default()
            };
            blocking(move || agent.create_container(ctx(CREATE_TIMEOUT), &request))
                .await?
                .map_err(|e| agent_error("CreateContainer", e))?;
            Ok::<(), ttrpc::Error>(())
        }
        .await;
        if let Err(e) = prepared {
            log_problems(&req.id, share.remove());
            if owns_vm {
                if let Some(vm) = pod.vm.take() {
                    stop_vm(&vm).await;
                }
            }
            return Err(e);
        }

        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new("", stdio.clone(), Vec::new());
        let target = pod
            .target(&inner.namespace, &req.id, "")
            .ok_or_else(|| status(Code::INTERNAL, "no VM"))?;
        match ProcessIo::start(&target, &stdio) {
            Ok(io) => *init.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io),
            Err(e) => {
                let agent = vm.agent.agent.clone();
                let request = RemoveContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                };
                let _ = blocking(move || agent.remove_container(ctx(CALL_TIMEOUT), &request)).await;
                log_problems(&req.id, share.remove());
                if owns_vm {
                    if let Some(vm) = pod.vm.take() {
                        stop_vm(&vm).await;
                    }
                }
                return Err(status(Code::INVALID_ARGUMENT, e.to_string()));
            }
        }
        pod.containers.insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                bundle: bundle.clone(),
                share,
                owns_vm,
                paused: false,
                init,
                execs: Default::default(),
            },
        );
        tracing::info!(container = %req.id, ?role, "created");
        inner.publish(Box::new(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: String::new(),
            pid: vm.vmm_pid,
            ..Default::default()
        }));
        Ok(CreateTaskResponse {
            pid: vm.vmm_pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let inner = &self.inner;
        let mut pod = inner.pod.lock().await;
        let vm = pod
            .vm
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod has no VM"))?;
        let target = pod
            .target(&inner.namespace, &req.id, &req.exec_id)
            .ok_or_else(|| status(Code::INTERNAL, "no VM"))?;
        let container = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id, ""))?;
        let process = container
            .process_mut(&req.exec_id)
            .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
        if process.started {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{} {} already started", req.id, req.exec_id),
            ));
        }
        let agent = vm.agent.agent.clone();
        if req.exec_id.is_empty() {
            let request = StartContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            blocking(move || agent.start_container(ctx(CREATE_TIMEOUT), &request))
                .await?
                .map_err(|e| agent_error("StartContainer", e))?;
        } else {
            let request = AgentExec {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                process_json: process.process_json.clone(),
                ..Default::default()
            };
            blocking(move || agent.exec_process(ctx(CREATE_TIMEOUT), &request))
                .await?
                .map_err(|e| agent_error("ExecProcess", e))?;
            let io = ProcessIo::start(&target, &process.stdio)
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()));
            match io {
                Ok(io) => {
                    if process.stdin_close_pending && !io.request_stdin_close() {
                        let target = target.clone();
                        blocking(move || close_stdin(&target)).await?;
                    }
                    *process.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
                }
                Err(e) => {
                    let kill = SignalProcessRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        signal: 9,
                        ..Default::default()
                    };
                    let agent = vm.agent.agent.clone();
                    let _ = blocking(move || agent.signal_process(ctx(CALL_TIMEOUT), &kill)).await;
                    return Err(e);
                }
            }
        }
        process.started = true;
        if req.exec_id.is_empty() {
            inner.publish(Box::new(TaskStart {
                container_id: req.id.clone(),
                pid: vm.vmm_pid,
                ..Default::default()
            }));
        } else {
            inner.publish(Box::new(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: vm.vmm_pid,
                ..Default::default()
            }));
        }
        inner.spawn_waiter(target, vm.vmm_pid, process.exit.clone(), process.io.clone());
        Ok(StartResponse {
            pid: vm.vmm_pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> TtrpcResult<containerd_shim::api::DeleteResponse> {
        let inner = &self.inner;
        let mut pod = inner.pod.lock().await;
        let vm = pod.vm.clone();
        let pid = vm.as_ref().map(|vm| vm.vmm_pid).unwrap_or_default();
        let container = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id, ""))?;
        if !req.exec_id.is_empty() {
            let process = container
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
            if process.started && process.exit().is_none() {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            let exit = process.exit().unwrap_or(Exit {
                status: 0,
                at: now(),
            });
            container.execs.remove(&req.exec_id);
            return Ok(DeleteResponse {
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(exit.at),
                ..Default::default()
            });
        }
        if container.init.started && container.init.exit().is_none() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is still running", req.id),
            ));
        }
        let Some(container) = pod.containers.remove(&req.id) else {
            return Err(not_found(&req.id, ""));
        };
        if let Some(vm) = vm.as_ref().filter(|vm| !vm.is_gone()) {
            let agent = vm.agent.agent.clone();
            let request = RemoveContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            if let Ok(Err(e)) =
                blocking(move || agent.remove_container(ctx(CALL_TIMEOUT), &request)).await
            {
                tracing::warn!(container = %req.id, "RemoveContainer: {e}");
            }
        }
        for process in std::iter::once(&container.init).chain(container.execs.values()) {
            if let Some(mut io) = process.io.lock().unwrap_or_else(|e| e.into_inner()).take() {
                io.finish(Duration::from_secs(2));
            }
        }
        log_problems(&req.id, container.share.remove());
        let exit = container.init.exit().unwrap_or(Exit {
            status: 0,
            at: now(),
        });
        if container.owns_vm {
            if let Some(vm) = pod.vm.take() {
                stop_vm(&vm).await;
            }
        }
        tracing::info!(container = %req.id, "deleted");
        inner.publish(Box::new(TaskDelete {
            container_id: req.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            id: req.id.clone(),
            ..Default::default()
        }));
        Ok(DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let inner = &self.inner;
        let mut pod = inner.pod.lock().await;
        let container = pod
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&req.id, ""))?;
        if req.exec_id.is_empty() || container.execs.contains_key(&req.exec_id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec id {:?} is empty or taken", req.exec_id),
            ));
        }
        if container.init.exit().is_some() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} has exited", req.id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        if !spec.type_url.is_empty() && !spec.type_url.ends_with(EXEC_SPEC_TYPE) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!(
                    "exec spec of type {:?}, expected {EXEC_SPEC_TYPE}",
                    spec.type_url
                ),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        container.execs.insert(
            req.exec_id.clone(),
            Process::new(&req.exec_id, stdio, spec.value.clone()),
        );
        inner.publish(Box::new(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let pod = self.inner.pod.lock().await;
        let container = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id, ""))?;
        let process = container
            .process(&req.exec_id)
            .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
        let exit = process.exit();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: pod.vm.as_ref().map(|vm| vm.vmm_pid).unwrap_or_default(),
            status: state_status(process.phase(container.paused)).into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| MessageField::some(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut exit = {
            let pod = self.inner.pod.lock().await;
            let container = pod
                .containers
                .get(&req.id)
                .ok_or_else(|| not_found(&req.id, ""))?;
            container
                .process(&req.exec_id)
                .ok_or_else(|| not_found(&req.id, &req.exec_id))?
                .exit
                .subscribe()
        };
        let exit = exit
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| {
                status(
                    Code::NOT_FOUND,
                    format!("{} {} was deleted while waiting", req.id, req.exec_id),
                )
            })?
            .clone()
            .unwrap_or(Exit {
                status: VM_LOST_EXIT_STATUS,
                at: now(),
            });
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let pod = self.inner.pod.lock().await;
        let container = pod
            .containers
            .get(&req.id)
            .ok_or_else(|| not_found(&req.id, ""))?;
        let process = container
            .process(&req.exec_id)
            .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
        if process.exit().is_some() {
            return Err(status(
                Code::NOT_FOUND,
                format!("process {} {} already finished", req.id, req.exec_id),
            ));
        }
        let vm = pod
            .vm
            .clone()
            .ok_or_else(|| status(Code::UNAVAILABLE, "the pod has no VM"))?;
        drop(pod);
        // `all` needs no more: the init of a container is PID 1 of its PID
        // namespace in the guest, and the kernel kills the rest with it.
        let agent = vm.agent.agent.clone();
        let request = SignalProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            ..Default::default()
        };
        blocking(move || agent.signal_process(ctx(CALL_TIMEOUT), &request))
            .await?
            .map_err(|e| agent_error("SignalProcess", e))?;
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let vm = self.vm_for(&req.id).await?;
        let agent = vm.agent.agent.clone();
        let request = ListProcessesRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let response = blocking(move || agent.list_processes(ctx(CALL_TIMEOUT), &request))
            .await?
            .map_err(|e| agent_error("ListProcesses", e))?;
        let processes = response
            .pids
            .iter()
            .filter_map(|pid| u32::try_from(*pid).ok())
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            let target = {
                let mut pod = self.inner.pod.lock().await;
                let target = pod.target(&self.inner.namespace, &req.id, &req.exec_id);
                let container = pod
                    .containers
                    .get_mut(&req.id)
                    .ok_or_else(|| not_found(&req.id, ""))?;
                let process = container
                    .process_mut(&req.exec_id)
                    .ok_or_else(|| not_found(&req.id, &req.exec_id))?;
                if !process.started && !req.exec_id.is_empty() {
                    // The exec does not exist in the agent yet: Start closes it.
                    process.stdin_close_pending = true;
                    return Ok(Empty::new());
                }
                let handled = process
                    .io
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|io| io.request_stdin_close());
                if handled {
                    return Ok(Empty::new());
                }
                target.ok_or_else(|| status(Code::UNAVAILABLE, "no VM"))?
            };
            blocking(move || close_stdin(&target)).await?;
        }
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let vm = self.vm_for(&req.id).await?;
        let agent = vm.agent.agent.clone();
        let request = TtyWinResizeRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            row: req.height,
            column: req.width,
            ..Default::default()
        };
        blocking(move || agent.tty_win_resize(ctx(CALL_TIMEOUT), &request))
            .await?
            .map_err(|e| agent_error("TtyWinResize", e))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let vm = self.vm_for(&req.id).await?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update without resources"))?;
        // containerd sends LinuxResources as JSON in the Any, which is what the agent takes.
        let agent = vm.agent.agent.clone();
        let request = UpdateContainerRequest {
            container_id: req.id.clone(),
            resources_json: resources.value.clone(),
            ..Default::default()
        };
        blocking(move || agent.update_container(ctx(CALL_TIMEOUT), &request))
            .await?
            .map_err(|e| agent_error("UpdateContainer", e))?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let vm = self.vm_for(&req.id).await?;
        let agent = vm.agent.agent.clone();
        let request = StatsContainerRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let s = blocking(move || agent.stats_container(ctx(CALL_TIMEOUT), &request))
            .await?
            .map_err(|e| agent_error("StatsContainer", e))?;
        let metrics = Metrics {
            memory: MessageField::some(MemoryStat {
                usage: MessageField::some(MemoryEntry {
                    usage: s.memory_usage,
                    max: s.memory_max_usage,
                    limit: s.memory_limit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: s.cpu_usage_ns,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pids: MessageField::some(PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = metrics
            .write_to_bytes()
            .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?;
        Ok(StatsResponse {
            stats: MessageField::some(Any {
                type_url: METRICS_TYPE.into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, true).await
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.set_paused(&req.id, false).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let pod = self.inner.pod.lock().await;
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pod.vm.as_ref().map(|vm| vm.vmm_pid).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after every task delete; the shim serves the whole
        // pod, so it goes only with the pod's last container.
        let pod = self.inner.pod.lock().await;
        if pod.containers.is_empty() {
            tracing::info!("last container deleted; shim exiting");
            self.inner.exit.signal();
        }
        Ok(Empty::new())
    }
}

impl PodService {
    async fn vm_for(&self, container_id: &str) -> TtrpcResult<Arc<Vm>> {
        let pod = self.inner.pod.lock().await;
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

    async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<Empty> {
        let vm = self.vm_for(id).await?;
        let agent = vm.agent.agent.clone();
        let container_id = id.to_string();
        blocking(move || {
            if paused {
                agent.pause_container(
                    ctx(CALL_TIMEOUT),
                    &PauseContainerRequest {
                        container_id,
                        ..Default::default()
                    },
                )
            } else {
                agent.resume_container(
                    ctx(CALL_TIMEOUT),
                    &ResumeContainerRequest {
                        container_id,
                        ..Default::default()
                    },
                )
            }
        })
        .await?
        .map_err(|e| {
            agent_error(
                if paused {
                    "PauseContainer"
                } else {
                    "ResumeContainer"
                },
                e,
            )
        })?;
        let mut pod = self.inner.pod.lock().await;
        if let Some(container) = pod.containers.get_mut(id) {
            container.paused = paused;
        }
        if paused {
            self.inner.publish(Box::new(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            }));
        } else {
            self.inner.publish(Box::new(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            }));
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_oom_events_for_foreign_ids_publishes_none() {
        // A fake agent: 100000 OOM events naming containers of no one,
        // ids that try to look like ours, then one real one.
        let mut events = (0..100_000)
            .map(|i| match i % 3 {
                0 => format!("foreign-{i}"),
                1 => "web/../other".to_string(),
                _ => "web ".to_string(),
            })
            .chain(["web".to_string()]);
        let published = StdMutex::new(Vec::new());
        forward_oom_events(
            || events.next(),
            |id| id == "web",
            |event| {
                let topic = event.topic();
                published.lock().expect("lock").push(topic);
            },
        );
        assert_eq!(
            published.into_inner().expect("lock"),
            vec!["/tasks/oom".to_string()]
        );
    }
}

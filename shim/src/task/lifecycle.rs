//! Create, Start and Delete: the calls that change what the pod is made
//! of, and the VM's boot for the pod's first container.

use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use crate::network::{NetnsSource, NetworkError, PodNetwork};
use containerd_shim::api::{
    CreateTaskRequest, CreateTaskResponse, DeleteRequest, StartRequest, StartResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecStarted, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::{DeleteResponse, TtrpcResult};
use podbox_agent_client::ctx;
use podbox_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest as AgentExec,
    RemoveContainerRequest, SignalProcessRequest, StartContainerRequest, Storage,
};

use super::pod::{Container, Exit, ExitCell, Process};
use super::{agent_call, blocking, find_process_mut, log_problems, not_found, now, status, Inner};
use crate::io::{close_stdin, ProcessIo, StdioPaths, Target};
use crate::rootfs::{ContainerShare, RootfsError};
use crate::sandbox::state_dir::{GUEST_SHARE, SHARE_TAG};
use crate::sandbox::Sandbox;
use crate::settings::annotations::PodRole;
use crate::settings::VmSettings;

/// Agent calls that should answer at once.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// CreateContainer mounts and forks in the guest, whose kernel is slow on PVM.
pub(super) const CREATE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a deleted container's output copies may take to drain.
const DELETE_DRAIN_LIMIT: Duration = Duration::from_secs(2);

impl Inner {
    pub(super) async fn create(
        self: &Arc<Self>,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "podbox cannot restore checkpoints",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = crate::spec::load(&bundle)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let role = PodRole::from_annotations(&crate::spec::annotations(&spec))
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let netns = NetnsSource::from_spec(&spec).map_err(|e| network_status(&req.id, e))?;
        let _turn = self.lifecycle.lock().await;
        let vm = {
            let pod = self.pod();
            if pod.containers.contains_key(&req.id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("container {} already exists", req.id),
                ));
            }
            pod.vm.clone()
        };
        let owns_vm = vm.is_none();
        let vm = match vm {
            Some(vm) => {
                vm.network
                    .check_same(&netns)
                    .map_err(|e| network_status(&req.id, e))?;
                vm
            }
            None => self.boot_for(&req.id, &role, &spec, netns).await?,
        };
        if vm.is_gone() {
            return Err(status(Code::UNAVAILABLE, "the pod's VM is gone"));
        }
        let created = self.create_in_vm(&vm, &req, &bundle, spec).await;
        let (share, init) = match created {
            Ok(created) => created,
            Err(e) => {
                if owns_vm {
                    self.pod().vm = None;
                    vm.stop().await;
                }
                return Err(e);
            }
        };
        let container = Container {
            id: req.id.clone(),
            bundle,
            share,
            owns_vm,
            paused: false,
            init,
            execs: Default::default(),
        };
        if let Err(container) = self.insert_created(&vm, container, &req) {
            // The VM died while the container was made: nothing will ever
            // record its exit, so it must not be left half there.
            let io = container.init.io.clone();
            blocking(move || finish_io(&io)).await?;
            log_problems(&container.id, container.share.remove());
            if owns_vm {
                self.pod().vm = None;
                vm.stop().await;
            }
            return Err(status(Code::UNAVAILABLE, "the pod's VM is gone"));
        }
        tracing::info!(container = %req.id, ?role, "created");
        Ok(CreateTaskResponse {
            pid: vm.vmm_pid,
            ..Default::default()
        })
    }

    /// Boots the VM for the pod's first container `id` (a sandbox or a
    /// standalone container: a CRI container comes to an existing VM), as
    /// the config and its annotations say, and makes it the pod's.
    async fn boot_for(
        self: &Arc<Self>,
        id: &str,
        role: &PodRole,
        spec: &oci_spec::runtime::Spec,
        netns: NetnsSource,
    ) -> TtrpcResult<Arc<Sandbox>> {
        if let PodRole::Container { sandbox_id } = role {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("pod {sandbox_id} has no VM in this shim"),
            ));
        }
        let mut settings = VmSettings::resolve(&self.config, spec)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let lowered = settings
            .fit_host()
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        if let Some(asked) = lowered {
            tracing::warn!(
                pod = %id,
                "{asked} vCPUs asked for, {} given: KVM recommends no more per VM on this host (KVM_CAP_NR_VCPUS)",
                settings.vcpus
            );
        }
        tracing::info!(
            pod = %id,
            vcpus = settings.vcpus,
            memory_mib = settings.memory_mib,
            "VM size"
        );
        let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
        let network = blocking(move || PodNetwork::set_up(&netns))
            .await?
            .map_err(|e| network_status(id, e))?;
        let vm = self
            .boot_sandbox(
                id,
                settings,
                hostname.unwrap_or(id.to_string()),
                Arc::new(network),
            )
            .await?;
        self.pod().vm = Some(vm.clone());
        Ok(vm)
    }

    /// Records a created container and publishes TaskCreate, in one hold of
    /// the pod lock, unless its VM is gone (or no longer the pod's): the VM
    /// watcher records exits under the same lock, so a container inserted
    /// here always gets one. Gives the container back otherwise.
    fn insert_created(
        &self,
        vm: &Arc<Sandbox>,
        container: Container,
        req: &CreateTaskRequest,
    ) -> Result<(), Box<Container>> {
        let mut pod = self.pod();
        let current = pod.vm.as_ref().is_some_and(|v| Arc::ptr_eq(v, vm));
        if vm.is_gone() || !current {
            return Err(Box::new(container));
        }
        pod.containers.insert(req.id.clone(), container);
        self.events.publish(Box::new(TaskCreate {
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
        Ok(())
    }

    /// The container's files into the share, the container in the agent,
    /// and its init's stdio; on error none of it is left.
    async fn create_in_vm(
        &self,
        vm: &Arc<Sandbox>,
        req: &CreateTaskRequest,
        bundle: &std::path::Path,
        spec: oci_spec::runtime::Spec,
    ) -> TtrpcResult<(ContainerShare, Process)> {
        let share = ContainerShare::new(&vm.state, &req.id);
        let prepared = async {
            let spec = share
                .prepare(&req.rootfs, bundle, spec)
                .await
                .map_err(|e| {
                    let code = match e {
                        RootfsError::Spec { .. } => Code::INVALID_ARGUMENT,
                        _ => Code::INTERNAL,
                    };
                    status(code, e.to_string())
                })?;
            let spec_json =
                serde_json::to_vec(&spec).map_err(|e| status(Code::INTERNAL, e.to_string()))?;
            let agent = vm.agent.clone();
            let request = CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec_json: spec_json,
                rootfs: share.guest_rootfs().display().to_string(),
                ..Default::default()
            };
            agent_call("CreateContainer", CREATE_TIMEOUT, move |ctx| {
                agent.create_container(ctx, &request)
            })
            .await
        }
        .await;
        if let Err(e) = prepared {
            log_problems(&req.id, share.remove());
            return Err(e);
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Process::new("", stdio.clone(), Vec::new());
        let target = self.target(vm, &req.id, "");
        let io = blocking(move || ProcessIo::start(&target, &stdio)).await?;
        match io {
            Ok(io) => *init.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io),
            Err(e) => {
                let agent = vm.agent.clone();
                let request = RemoveContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                };
                let _ = blocking(move || agent.remove_container(ctx(CALL_TIMEOUT), &request)).await;
                log_problems(&req.id, share.remove());
                return Err(status(Code::INVALID_ARGUMENT, e.to_string()));
            }
        }
        Ok((share, init))
    }

    pub(super) fn target(&self, vm: &Sandbox, container_id: &str, exec_id: &str) -> Target {
        Target {
            agent: vm.agent.clone(),
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            namespace: self.namespace.clone(),
        }
    }

    /// Boots the pod's VM for `sandbox_id`, watches it, and creates the
    /// agent's sandbox; on error the VM is gone again.
    async fn boot_sandbox(
        self: &Arc<Self>,
        sandbox_id: &str,
        settings: VmSettings,
        hostname: String,
        network: Arc<PodNetwork>,
    ) -> TtrpcResult<Arc<Sandbox>> {
        let booted = self
            .launcher
            .boot(sandbox_id, settings, network.clone())
            .await;
        let vm = match booted {
            Ok(vm) => vm,
            Err(e) => {
                blocking(move || network.tear_down()).await?;
                return Err(status(e.code(), e.to_string()));
            }
        };
        self.watch_vm(&vm);
        if let Err(e) = set_up_sandbox(&vm, sandbox_id, hostname).await {
            vm.stop().await;
            return Err(e);
        }
        self.watch_oom(&vm);
        Ok(vm)
    }

    pub(super) async fn start(self: &Arc<Self>, req: StartRequest) -> TtrpcResult<StartResponse> {
        let (vm, process_json, stdio) = {
            let mut pod = self.pod();
            let vm = pod
                .vm
                .clone()
                .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod has no VM"))?;
            let process = find_process_mut(&mut pod, &req.id, &req.exec_id)?;
            if process.started || process.starting {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("{} {} already started", req.id, req.exec_id),
                ));
            }
            process.starting = true;
            (vm, process.process_json.clone(), process.stdio.clone())
        };
        let target = self.target(&vm, &req.id, &req.exec_id);
        let started = match late_interface(&vm, &req.exec_id).await {
            Ok(()) => start_in_agent(&vm, &target, process_json, stdio).await,
            Err(e) => Err(e),
        };
        let (close_now, exit, io) = self.record_start(&req, vm.vmm_pid, started)?;
        if close_now {
            let target = target.clone();
            blocking(move || close_stdin(&target)).await?;
        }
        self.spawn_waiter(target, vm.clone(), exit, io);
        Ok(StartResponse {
            pid: vm.vmm_pid,
            ..Default::default()
        })
    }

    /// Records how a Start went; an exec's stdio copies join the process,
    /// and TaskStart / TaskExecStarted goes out under the same hold of the
    /// pod lock (so no TaskExit of the VM watcher can come first).
    /// Returns whether its stdin must be closed now (CloseIO came while it
    /// started), its exit cell and its stdio.
    #[allow(clippy::type_complexity)]
    fn record_start(
        &self,
        req: &StartRequest,
        vmm_pid: u32,
        started: TtrpcResult<Option<ProcessIo>>,
    ) -> TtrpcResult<(bool, Arc<ExitCell>, Arc<StdMutex<Option<ProcessIo>>>)> {
        let mut pod = self.pod();
        // Deleted while it started: nothing to record.
        let process = find_process_mut(&mut pod, &req.id, &req.exec_id)?;
        process.starting = false;
        let mut close_now = false;
        if let Some(io) = started? {
            close_now = process.stdin_close_pending && !io.request_stdin_close();
            *process.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
        }
        process.started = true;
        let recorded = (close_now, process.exit.clone(), process.io.clone());
        if req.exec_id.is_empty() {
            self.events.publish(Box::new(TaskStart {
                container_id: req.id.clone(),
                pid: vmm_pid,
                ..Default::default()
            }));
        } else {
            self.events.publish(Box::new(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: vmm_pid,
                ..Default::default()
            }));
        }
        Ok(recorded)
    }

    pub(super) async fn delete(&self, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        // A container's Delete waits for a Create under way: it may be of
        // this container (containerd deletes what a timed-out Create left),
        // or into the VM this Delete would end.
        let _turn = if req.exec_id.is_empty() {
            Some(self.lifecycle.lock().await)
        } else {
            None
        };
        let (container, vm) = {
            let mut pod = self.pod();
            let pid = pod.vm.as_ref().map(|vm| vm.vmm_pid).unwrap_or_default();
            let container = pod
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&req.id, ""))?;
            if !req.exec_id.is_empty() {
                return delete_exec(container, &req.exec_id, pid);
            }
            if container.init.is_running() {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is still running", req.id),
                ));
            }
            let container = pod
                .containers
                .remove(&req.id)
                .ok_or_else(|| not_found(&req.id, ""))?;
            let vm = if container.owns_vm {
                pod.vm.take()
            } else {
                pod.vm.clone()
            };
            (container, vm)
        };
        let pid = vm.as_ref().map(|vm| vm.vmm_pid).unwrap_or_default();
        self.remove_container(&container, vm.as_deref()).await?;
        let exit = container.init.exit().unwrap_or(Exit {
            status: 0,
            at: now(),
        });
        if container.owns_vm {
            if let Some(vm) = vm {
                vm.stop().await;
            }
        }
        tracing::info!(container = %req.id, "deleted");
        self.events.publish(Box::new(TaskDelete {
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

    /// A deleted container out of the agent, its output drained, its files
    /// out of the share.
    async fn remove_container(
        &self,
        container: &Container,
        vm: Option<&Sandbox>,
    ) -> TtrpcResult<()> {
        if let Some(vm) = vm.filter(|vm| !vm.is_gone()) {
            let agent = vm.agent.clone();
            let request = RemoveContainerRequest {
                container_id: container.id.clone(),
                ..Default::default()
            };
            if let Ok(Err(e)) =
                blocking(move || agent.remove_container(ctx(CALL_TIMEOUT), &request)).await
            {
                tracing::warn!(container = %container.id, "RemoveContainer: {e}");
            }
        }
        let ios: Vec<_> = std::iter::once(&container.init)
            .chain(container.execs.values())
            .map(|process| process.io.clone())
            .collect();
        blocking(move || ios.iter().for_each(finish_io)).await?;
        log_problems(&container.id, container.share.remove());
        Ok(())
    }
}

/// Stops a process's stdio copies, waiting at most [`DELETE_DRAIN_LIMIT`].
fn finish_io(io: &Arc<StdMutex<Option<ProcessIo>>>) {
    if let Some(mut io) = io.lock().unwrap_or_else(|e| e.into_inner()).take() {
        io.finish(DELETE_DRAIN_LIMIT);
    }
}

/// A container's first Start: `ctr run --cni` has run CNI by now, in a
/// netns the VM got no NIC for. Refused rather than a silently offline pod.
async fn late_interface(vm: &Sandbox, exec_id: &str) -> TtrpcResult<()> {
    if !exec_id.is_empty() {
        return Ok(());
    }
    let network = vm.network.clone();
    blocking(move || network.check_no_late_interface())
        .await?
        .map_err(|e| status(e.code(), e.to_string()))
}

/// The agent's sandbox: the share mounted, the hostname set, and the pod's
/// NIC if it has one (the agent brings the guest's loopback up itself).
async fn set_up_sandbox(vm: &Sandbox, sandbox_id: &str, hostname: String) -> TtrpcResult<()> {
    let agent = vm.agent.clone();
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
    agent_call("CreateSandbox", CREATE_TIMEOUT, move |ctx| {
        agent.create_sandbox(ctx, &request)
    })
    .await?;
    set_up_nic(vm).await
}

/// The guest's NIC takes the pod's identity: the CNI interface's MAC, MTU,
/// addresses, then its routes (on-link ones first).
async fn set_up_nic(vm: &Sandbox) -> TtrpcResult<()> {
    let Some(nic) = vm.network.nic() else {
        return Ok(());
    };
    let (interface, routes) = (nic.cni.update_interface(), nic.cni.update_routes());
    let what = format!(
        "UpdateInterface eth0 (the pod's {} {})",
        nic.cni.name, nic.cni.mac
    );
    let agent = vm.agent.clone();
    agent_call(&what, CALL_TIMEOUT, move |ctx| {
        agent.update_interface(ctx, &interface)
    })
    .await?;
    let agent = vm.agent.clone();
    agent_call(
        "UpdateRoutes (the pod's routes)",
        CALL_TIMEOUT,
        move |ctx| agent.update_routes(ctx, &routes),
    )
    .await?;
    Ok(())
}

/// A network error as containerd sees it, naming the container.
fn network_status(
    container_id: &str,
    error: NetworkError,
) -> containerd_shim::protos::ttrpc::Error {
    status(error.code(), format!("container {container_id}: {error}"))
}

/// Starts a container's init (`process_json` empty) or an exec in the
/// agent; an exec gets its stdio copies, which are returned.
async fn start_in_agent(
    vm: &Sandbox,
    target: &Target,
    process_json: Vec<u8>,
    stdio: StdioPaths,
) -> TtrpcResult<Option<ProcessIo>> {
    let agent = vm.agent.clone();
    let (container_id, exec_id) = (target.container_id.clone(), target.exec_id.clone());
    if exec_id.is_empty() {
        let request = StartContainerRequest {
            container_id,
            ..Default::default()
        };
        agent_call("StartContainer", CREATE_TIMEOUT, move |ctx| {
            agent.start_container(ctx, &request)
        })
        .await?;
        return Ok(None);
    }
    let request = AgentExec {
        container_id: container_id.clone(),
        exec_id: exec_id.clone(),
        process_json,
        ..Default::default()
    };
    agent_call("ExecProcess", CREATE_TIMEOUT, move |ctx| {
        agent.exec_process(ctx, &request)
    })
    .await?;
    let io_target = target.clone();
    match blocking(move || ProcessIo::start(&io_target, &stdio)).await? {
        Ok(io) => Ok(Some(io)),
        Err(e) => {
            let kill = SignalProcessRequest {
                container_id,
                exec_id,
                signal: 9,
                ..Default::default()
            };
            let agent = vm.agent.clone();
            let _ = blocking(move || agent.signal_process(ctx(CALL_TIMEOUT), &kill)).await;
            Err(status(Code::INVALID_ARGUMENT, e.to_string()))
        }
    }
}

/// Delete of an exec: only its record goes (the agent forgets it at exit).
fn delete_exec(container: &mut Container, exec_id: &str, pid: u32) -> TtrpcResult<DeleteResponse> {
    let process = container
        .execs
        .get(exec_id)
        .ok_or_else(|| not_found(&container.id, exec_id))?;
    if process.is_running() {
        return Err(status(
            Code::FAILED_PRECONDITION,
            format!("exec {exec_id} is still running"),
        ));
    }
    let exit = process.exit().unwrap_or(Exit {
        status: 0,
        at: now(),
    });
    container.execs.remove(exec_id);
    Ok(DeleteResponse {
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(exit.at),
        ..Default::default()
    })
}

//! The Task calls on processes that exist: exec, state, wait, kill, and
//! the calls passed on to the agent as they are.

use containerd_shim::api::{
    CloseIORequest, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest,
    WaitResponse,
};
use containerd_shim::protos::api::{ProcessInfo, Status};
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{TaskExecAdded, TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use podbox_protocol::agent::{
    ListProcessesRequest, PauseContainerRequest, ResumeContainerRequest, SignalProcessRequest,
    StatsContainerRequest, TtyWinResizeRequest, UpdateContainerRequest,
};

use super::lifecycle::CALL_TIMEOUT;
use super::pod::{Exit, Phase, Process, VM_LOST_EXIT_STATUS};
use super::{agent_call, blocking, find_process, find_process_mut, not_found, now, status, Inner};
use crate::io::{close_stdin, StdioPaths};

const EXEC_SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// The guest runs cgroup v2, so its containers' stats go to containerd in
/// that format (containerd's CRI and `ctr task metrics` read v1 and v2).
const METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

fn state_status(phase: Phase) -> Status {
    match phase {
        Phase::Created => Status::CREATED,
        Phase::Running => Status::RUNNING,
        Phase::Paused => Status::PAUSED,
        Phase::Stopped => Status::STOPPED,
    }
}

impl Inner {
    pub(super) fn exec(&self, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let mut pod = self.pod();
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
        self.events.publish(Box::new(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(Empty::new())
    }

    pub(super) fn state(&self, req: StateRequest) -> TtrpcResult<StateResponse> {
        let pod = self.pod();
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

    pub(super) async fn wait(&self, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut exit = {
            find_process(&self.pod(), &req.id, &req.exec_id)?
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

    pub(super) async fn kill(&self, req: KillRequest) -> TtrpcResult<Empty> {
        let vm = {
            let pod = self.pod();
            let process = find_process(&pod, &req.id, &req.exec_id)?;
            if process.exit().is_some() {
                return Err(status(
                    Code::NOT_FOUND,
                    format!("process {} {} already finished", req.id, req.exec_id),
                ));
            }
            pod.vm
                .clone()
                .ok_or_else(|| status(Code::UNAVAILABLE, "the pod has no VM"))?
        };
        // `all` needs no more: the init of a container is PID 1 of its PID
        // namespace in the guest, and the kernel kills the rest with it.
        let agent = vm.agent.clone();
        let request = SignalProcessRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            ..Default::default()
        };
        agent_call("SignalProcess", CALL_TIMEOUT, move |ctx| {
            agent.signal_process(ctx, &request)
        })
        .await?;
        Ok(Empty::new())
    }

    pub(super) async fn pids(&self, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let agent = self.vm_for(&req.id)?.agent.clone();
        let request = ListProcessesRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let response = agent_call("ListProcesses", CALL_TIMEOUT, move |ctx| {
            agent.list_processes(ctx, &request)
        })
        .await?;
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

    pub(super) async fn close_io(&self, req: CloseIORequest) -> TtrpcResult<Empty> {
        if !req.stdin {
            return Ok(Empty::new());
        }
        let target = {
            let mut pod = self.pod();
            let vm = pod.vm.clone();
            let process = find_process_mut(&mut pod, &req.id, &req.exec_id)?;
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
            let vm = vm.ok_or_else(|| status(Code::UNAVAILABLE, "no VM"))?;
            self.target(&vm, &req.id, &req.exec_id)
        };
        blocking(move || close_stdin(&target)).await?;
        Ok(Empty::new())
    }

    pub(super) async fn resize_pty(&self, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let agent = self.vm_for(&req.id)?.agent.clone();
        let request = TtyWinResizeRequest {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            row: req.height,
            column: req.width,
            ..Default::default()
        };
        agent_call("TtyWinResize", CALL_TIMEOUT, move |ctx| {
            agent.tty_win_resize(ctx, &request)
        })
        .await?;
        Ok(Empty::new())
    }

    pub(super) async fn update(&self, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let agent = self.vm_for(&req.id)?.agent.clone();
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "update without resources"))?;
        // containerd sends LinuxResources as JSON in the Any, which is what the agent takes.
        let request = UpdateContainerRequest {
            container_id: req.id.clone(),
            resources_json: resources.value.clone(),
            ..Default::default()
        };
        agent_call("UpdateContainer", CALL_TIMEOUT, move |ctx| {
            agent.update_container(ctx, &request)
        })
        .await?;
        Ok(Empty::new())
    }

    pub(super) async fn stats(&self, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let agent = self.vm_for(&req.id)?.agent.clone();
        let request = StatsContainerRequest {
            container_id: req.id.clone(),
            ..Default::default()
        };
        let s = agent_call("StatsContainer", CALL_TIMEOUT, move |ctx| {
            agent.stats_container(ctx, &request)
        })
        .await?;
        let metrics = Metrics {
            memory: MessageField::some(MemoryStat {
                usage: s.memory_usage,
                max_usage: s.memory_max_usage,
                usage_limit: s.memory_limit,
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents {
                oom_kill: s.oom_kills,
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_ns / 1000,
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

    pub(super) async fn set_paused(&self, id: &str, paused: bool) -> TtrpcResult<Empty> {
        let agent = self.vm_for(id)?.agent.clone();
        let container_id = id.to_string();
        if paused {
            let request = PauseContainerRequest {
                container_id,
                ..Default::default()
            };
            let call = move |ctx| agent.pause_container(ctx, &request);
            agent_call("PauseContainer", CALL_TIMEOUT, call).await?;
        } else {
            let request = ResumeContainerRequest {
                container_id,
                ..Default::default()
            };
            let call = move |ctx| agent.resume_container(ctx, &request);
            agent_call("ResumeContainer", CALL_TIMEOUT, call).await?;
        }
        if let Some(container) = self.pod().containers.get_mut(id) {
            container.paused = paused;
        }
        if paused {
            self.events.publish(Box::new(TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            }));
        } else {
            self.events.publish(Box::new(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            }));
        }
        Ok(Empty::new())
    }
}

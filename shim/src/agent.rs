//! The shim's view of the pod's agent: one trait with a method per agent
//! call, as Kata's runtime-rs keeps its agent behind a trait. The real
//! implementation is the ttrpc client over the VM's vsock
//! ([`AgentServiceClient`]); the Task logic's unit tests put a fake agent
//! behind it. Calls block (ttrpc's sync client): callers run them off the
//! async threads.

use containerd_shim::protos::ttrpc::{self, context::Context};
use podbox_protocol::agent::*;
use podbox_protocol::agent_ttrpc::AgentServiceClient;

/// Declares [`Agent`] and implements it for the ttrpc client, from one list,
/// so the two cannot drift.
macro_rules! agent_calls {
    ($($call:ident($request:ty) -> $response:ty;)*) => {
        /// Every agent call the shim makes.
        pub trait Agent: Send + Sync {
            $(fn $call(&self, ctx: Context, request: &$request) -> ttrpc::Result<$response>;)*
        }

        impl Agent for AgentServiceClient {
            $(fn $call(&self, ctx: Context, request: &$request) -> ttrpc::Result<$response> {
                AgentServiceClient::$call(self, ctx, request)
            })*
        }
    };
}

agent_calls! {
    create_sandbox(CreateSandboxRequest) -> Empty;
    destroy_sandbox(DestroySandboxRequest) -> Empty;
    update_interface(UpdateInterfaceRequest) -> Interface;
    update_routes(UpdateRoutesRequest) -> Routes;
    create_container(CreateContainerRequest) -> Empty;
    start_container(StartContainerRequest) -> Empty;
    remove_container(RemoveContainerRequest) -> Empty;
    exec_process(ExecProcessRequest) -> Empty;
    signal_process(SignalProcessRequest) -> Empty;
    wait_process(WaitProcessRequest) -> WaitProcessResponse;
    update_container(UpdateContainerRequest) -> Empty;
    stats_container(StatsContainerRequest) -> StatsContainerResponse;
    pause_container(PauseContainerRequest) -> Empty;
    resume_container(ResumeContainerRequest) -> Empty;
    list_processes(ListProcessesRequest) -> ListProcessesResponse;
    write_stdin(WriteStreamRequest) -> WriteStreamResponse;
    close_stdin(CloseStdinRequest) -> Empty;
    read_stdout(ReadStreamRequest) -> ReadStreamResponse;
    read_stderr(ReadStreamRequest) -> ReadStreamResponse;
    tty_win_resize(TtyWinResizeRequest) -> Empty;
    get_oom_event(GetOOMEventRequest) -> OOMEvent;
}

//! The ttrpc server: maps each AgentService / Health call onto `Sandbox`
//! and turns `container::Error` into a ttrpc status with a clear message.

use std::sync::Arc;
use std::time::Duration;

use podbox_protocol::agent::*;
use podbox_protocol::agent_ttrpc::{create_agent_service, AgentService};
use podbox_protocol::health::{
    health_check_response::ServingStatus, CheckRequest, HealthCheckResponse, VersionCheckResponse,
};
use podbox_protocol::health_ttrpc::{create_health, Health};
use ttrpc::{Code, TtrpcContext};

use crate::config::AgentConfig;
use crate::container::Error;
use crate::network;
use crate::sandbox::Sandbox;

/// Blocking calls (WaitProcess, Read*, GetOOMEvent) each hold a server
/// thread, so allow plenty per connection.
const MAX_THREADS: usize = 64;
/// More tries of the ready call after a connect time-out.
const READY_CALL_RETRIES: usize = 5;

fn status(e: Error) -> ttrpc::Error {
    let code = match &e {
        Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        Error::NotFound(_) => Code::NOT_FOUND,
        Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
        Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        Error::Unsupported(_) => Code::UNIMPLEMENTED,
        _ => Code::INTERNAL,
    };
    log::warn!("request failed: {e}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

type Res<T> = ttrpc::Result<T>;

fn ok<T: Default>(r: Result<(), Error>) -> Res<T> {
    r.map(|_| T::default()).map_err(status)
}

pub struct Agent {
    sandbox: Arc<Sandbox>,
}

impl Agent {
    fn read_stream(&self, r: &ReadStreamRequest, stderr: bool) -> Res<ReadStreamResponse> {
        let p = self
            .sandbox
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        let max = if r.len == 0 {
            32 * 1024
        } else {
            r.len as usize
        };
        let stream = if stderr { &p.io.stderr } else { &p.io.stdout };
        Ok(ReadStreamResponse {
            data: stream.read(max),
            ..Default::default()
        })
    }
}

impl AgentService for Agent {
    fn create_sandbox(&self, _: &TtrpcContext, r: CreateSandboxRequest) -> Res<Empty> {
        ok(self
            .sandbox
            .create(&r.sandbox_id, &r.hostname, r.shared_pid_ns, &r.storages))
    }

    fn destroy_sandbox(&self, _: &TtrpcContext, _: DestroySandboxRequest) -> Res<Empty> {
        let result = self.sandbox.destroy();
        let init = self.sandbox.cfg.init;
        // Leave time for the reply to reach the shim before going away.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            if init {
                log::error!("{}", crate::init::power_off());
            }
            log::info!("sandbox destroyed; exiting");
            std::process::exit(0);
        });
        ok(result)
    }

    fn create_container(&self, _: &TtrpcContext, r: CreateContainerRequest) -> Res<Empty> {
        ok(self
            .sandbox
            .create_container(&r.container_id, &r.oci_spec_json, &r.rootfs))
    }

    fn start_container(&self, _: &TtrpcContext, r: StartContainerRequest) -> Res<Empty> {
        ok(self.sandbox.start_container(&r.container_id))
    }

    fn remove_container(&self, _: &TtrpcContext, r: RemoveContainerRequest) -> Res<Empty> {
        let t = Duration::from_secs(if r.timeout == 0 {
            10
        } else {
            u64::from(r.timeout)
        });
        ok(self.sandbox.remove_container(&r.container_id, t))
    }

    fn exec_process(&self, _: &TtrpcContext, r: ExecProcessRequest) -> Res<Empty> {
        ok(self
            .sandbox
            .exec(&r.container_id, &r.exec_id, &r.process_json))
    }

    fn signal_process(&self, _: &TtrpcContext, r: SignalProcessRequest) -> Res<Empty> {
        let sig = i32::try_from(r.signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| {
                status(Error::InvalidArgument(format!(
                    "{} is not a signal number",
                    r.signal
                )))
            })?;
        let p = self
            .sandbox
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        ok(p.signal(sig))
    }

    fn wait_process(&self, _: &TtrpcContext, r: WaitProcessRequest) -> Res<WaitProcessResponse> {
        let p = self
            .sandbox
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        if !p.started() {
            return Err(status(Error::FailedPrecondition(
                "process has not been started".into(),
            )));
        }
        Ok(WaitProcessResponse {
            status: p.exit.wait(),
            ..Default::default()
        })
    }

    fn update_container(&self, _: &TtrpcContext, r: UpdateContainerRequest) -> Res<Empty> {
        ok(self.sandbox.update(&r.container_id, &r.resources_json))
    }

    fn stats_container(
        &self,
        _: &TtrpcContext,
        r: StatsContainerRequest,
    ) -> Res<StatsContainerResponse> {
        let s = self.sandbox.stats(&r.container_id).map_err(status)?;
        Ok(StatsContainerResponse {
            memory_usage: s.memory_usage,
            memory_max_usage: s.memory_max_usage,
            memory_limit: s.memory_limit,
            oom_kills: s.oom_kills,
            cpu_usage_ns: s.cpu_usage_ns,
            pids_current: s.pids_current,
            pids_limit: s.pids_limit,
            ..Default::default()
        })
    }

    fn pause_container(&self, _: &TtrpcContext, r: PauseContainerRequest) -> Res<Empty> {
        ok(self.sandbox.set_paused(&r.container_id, true))
    }

    fn resume_container(&self, _: &TtrpcContext, r: ResumeContainerRequest) -> Res<Empty> {
        ok(self.sandbox.set_paused(&r.container_id, false))
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        r: ListProcessesRequest,
    ) -> Res<ListProcessesResponse> {
        let pids = self.sandbox.pids(&r.container_id).map_err(status)?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    fn write_stdin(&self, _: &TtrpcContext, r: WriteStreamRequest) -> Res<WriteStreamResponse> {
        let p = self
            .sandbox
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        let n = p.io.write_stdin(&r.data).map_err(status)?;
        Ok(WriteStreamResponse {
            len: n as u32,
            ..Default::default()
        })
    }

    fn close_stdin(&self, _: &TtrpcContext, r: CloseStdinRequest) -> Res<Empty> {
        let p = self
            .sandbox
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        ok(p.io.close_stdin())
    }

    fn read_stdout(&self, _: &TtrpcContext, r: ReadStreamRequest) -> Res<ReadStreamResponse> {
        self.read_stream(&r, false)
    }

    fn read_stderr(&self, _: &TtrpcContext, r: ReadStreamRequest) -> Res<ReadStreamResponse> {
        self.read_stream(&r, true)
    }

    fn tty_win_resize(&self, _: &TtrpcContext, r: TtyWinResizeRequest) -> Res<Empty> {
        let p = self
            .sandbox
            .process(&r.container_id, &r.exec_id)
            .map_err(status)?;
        let (rows, cols) = match (u16::try_from(r.row), u16::try_from(r.column)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => {
                return Err(status(Error::InvalidArgument(
                    "window size out of range".into(),
                )))
            }
        };
        ok(p.io.resize(rows, cols))
    }

    fn get_oom_event(&self, _: &TtrpcContext, _: GetOOMEventRequest) -> Res<OOMEvent> {
        Ok(OOMEvent {
            container_id: self.sandbox.next_oom(),
            ..Default::default()
        })
    }

    fn update_interface(&self, _: &TtrpcContext, r: UpdateInterfaceRequest) -> Res<Interface> {
        let config = network::parse_interface(&r).map_err(status)?;
        let configured = network::Nic::open()
            .and_then(|mut nic| nic.configure_interface(&config))
            .map_err(status)?;
        log::info!("interface configured: {configured:?}");
        Ok(network::to_interface(&configured))
    }

    fn update_routes(&self, _: &TtrpcContext, r: UpdateRoutesRequest) -> Res<Routes> {
        let routes = network::parse_routes(&r).map_err(status)?;
        let applied = network::Nic::open()
            .and_then(|mut nic| nic.apply_routes(&routes))
            .map_err(status)?;
        log::info!("{} routes applied", applied.len());
        Ok(network::to_routes(&applied))
    }

    fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: GuestDetailsRequest,
    ) -> Res<GuestDetailsResponse> {
        Ok(guest_details())
    }
}

/// Kernel, boot id, CPUs and memory of the machine the agent runs on.
pub fn guest_details() -> GuestDetailsResponse {
    let kernel_version = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpu_count = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(0);
    let mem_total_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    GuestDetailsResponse {
        kernel_version,
        boot_id,
        cpu_count,
        mem_total_bytes,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    }
}

struct HealthService;

impl Health for HealthService {
    fn check(&self, _: &TtrpcContext, _: CheckRequest) -> Res<HealthCheckResponse> {
        Ok(HealthCheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    fn version(&self, _: &TtrpcContext, _: CheckRequest) -> Res<VersionCheckResponse> {
        Ok(VersionCheckResponse {
            grpc_version: "ttrpc 0.8".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }
}

/// Tells the host the server listens on `listen`: one stream to host port
/// AGENT_READY_PORT (podbox-vmm forwards it to `<vsock socket>_1025`), so
/// that the host's first dial finds the agent instead of knocking all
/// through the boot. The shim waits for this call; a host that does not
/// listen for it (`AgentClient::connect` dials blindly) gets nothing from
/// it, and the VMM resets the stream, so a failure is only logged.
fn call_host_ready(listen: &str) {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::io::Write;
    let port = podbox_protocol::AGENT_READY_PORT;
    let call = || {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let host = VsockAddr::new(libc::VMADDR_CID_HOST, port);
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &host).map(|()| fd)
    };
    // vsock's connect gives up after 2 s; a guest on a loaded PVM host can
    // take longer than that for the round trip, so a time-out is retried.
    let mut result = call();
    for _ in 0..READY_CALL_RETRIES {
        match result {
            Err(nix::errno::Errno::ETIMEDOUT) => result = call(),
            _ => break,
        }
    }
    match result {
        Ok(fd) => {
            let line = format!(
                "podbox-agent {} listening on {listen}\n",
                env!("CARGO_PKG_VERSION")
            );
            let _ = std::fs::File::from(fd).write_all(line.as_bytes());
            log::info!("ready call to host port {port} made");
        }
        Err(e) => log::warn!(
            "ready call to host port {port}: {e} (a host that waits for the call will not dial)"
        ),
    }
}

/// Serves until the process exits (DestroySandbox).
pub fn serve(cfg: AgentConfig) -> Result<(), String> {
    if cfg.init {
        crate::init::setup();
    }
    crate::reaper::start();
    if let Some(path) = cfg.listen.strip_prefix("unix://") {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let listen = cfg.listen.clone();
    let sandbox = Sandbox::new(cfg);
    let mut services = create_agent_service(Arc::new(Agent { sandbox }));
    services.extend(create_health(Arc::new(HealthService)));
    let mut server = ttrpc::Server::new()
        .bind(&listen)
        .map_err(|e| format!("listen on {listen}: {e}"))?
        .register_service(services)
        .set_thread_count_default(4)
        .set_thread_count_min(2)
        .set_thread_count_max(MAX_THREADS);
    server
        .start()
        .map_err(|e| format!("start ttrpc server: {e}"))?;
    log::info!("listening on {listen}");
    if listen.starts_with("vsock://") {
        call_host_ready(&listen);
    }
    loop {
        std::thread::park();
    }
}

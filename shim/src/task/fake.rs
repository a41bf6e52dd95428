//! A fake agent and VM launcher for the Task logic's unit tests: calls are
//! recorded, processes "run" until signalled or given an exit, CreateContainer
//! can be held (a slow guest), and the VM can die under any call.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::ttrpc::{self, context::Context, Code};
use podbox_protocol::agent::*;
use tokio::sync::watch;

use crate::agent::Agent;
use crate::network::PodNetwork;
use crate::sandbox::state_dir::StateDir;
use crate::sandbox::{BootError, Sandbox, VmLauncher};
use crate::settings::VmSettings;

/// How often blocked fake calls look again.
const TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    calls: Vec<String>,
    /// Exit statuses by (container, exec).
    exits: HashMap<(String, String), i32>,
    oom: Vec<String>,
    /// Calls (by name) that fail with this status code.
    failing: HashMap<&'static str, Code>,
    /// Calls (by name) that wait while they are listed here.
    held: std::collections::HashSet<&'static str>,
    /// What UpdateInterface and UpdateRoutes were sent.
    interfaces: Vec<Interface>,
    routes: Vec<Routes>,
}

pub struct FakeAgent {
    state: Mutex<State>,
    changed: Condvar,
    dead: AtomicBool,
    gone: watch::Sender<Option<ExitStatus>>,
    /// The pod's tap, held as podbox-vmm would: closed when the VM ends.
    tap: Mutex<Option<std::os::fd::OwnedFd>>,
}

impl FakeAgent {
    pub fn new() -> Arc<FakeAgent> {
        Arc::new(FakeAgent {
            state: Mutex::default(),
            changed: Condvar::new(),
            dead: AtomicBool::new(false),
            gone: watch::channel(None).0,
            tap: Mutex::new(None),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let t = f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
        t
    }

    /// The interfaces and routes sent so far.
    pub fn network_calls(&self) -> (Vec<Interface>, Vec<Routes>) {
        self.with(|s| (s.interfaces.clone(), s.routes.clone()))
    }

    /// Whether the "VMM" holds the pod's tap.
    pub fn holds_tap(&self) -> bool {
        self.tap.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn close_tap(&self) {
        self.tap.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The calls so far, as `name id[/exec]`.
    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    /// Holds `call` (create_container, start_container, exec_process) in
    /// the agent until released: a slow guest.
    pub fn hold(&self, call: &'static str, hold: bool) {
        self.with(|s| {
            if hold {
                s.held.insert(call);
            } else {
                s.held.remove(call);
            }
        });
    }

    fn held_call(&self, ctx: &Context, name: &'static str, id: &str) -> ttrpc::Result<Empty> {
        self.record(name, id)?;
        self.block_while(ctx, |s| s.held.contains(name))?;
        self.outcome(name).map(|()| Empty::new())
    }

    pub fn fail(&self, call: &'static str, code: Code) {
        self.with(|s| s.failing.insert(call, code));
    }

    /// The process exits with `status` (as the guest would report it).
    pub fn exit(&self, container: &str, exec: &str, status: i32) {
        self.with(|s| s.exits.insert((container.into(), exec.into()), status));
    }

    pub fn oom(&self, container: &str) {
        self.with(|s| s.oom.push(container.into()));
    }

    /// The VM dies: the VMM exits with `status`, every call fails as a
    /// broken connection does.
    pub fn die(&self, status: i32) {
        self.dead.store(true, Ordering::SeqCst);
        self.close_tap();
        self.gone
            .send_replace(Some(ExitStatus::from_raw(status << 8)));
        self.changed.notify_all();
    }

    /// The agent's connection breaks while the VMM still runs (it exits
    /// later, with [`Self::die`]): every call fails as a broken connection does.
    pub fn break_connection(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }

    fn gone(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.gone.subscribe()
    }

    /// Records a call; fails it if the VM is dead or the test says so.
    fn call(&self, name: &'static str, id: &str) -> ttrpc::Result<()> {
        self.record(name, id)?;
        self.outcome(name)
    }

    fn record(&self, name: &'static str, id: &str) -> ttrpc::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(ttrpc::Error::LocalClosed);
        }
        self.with(|s| s.calls.push(format!("{name} {id}")));
        Ok(())
    }

    fn outcome(&self, name: &'static str) -> ttrpc::Result<()> {
        match self.with(|s| s.failing.get(name).copied()) {
            Some(code) => Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                code,
                format!("fake {name} fails"),
            ))),
            None => Ok(()),
        }
    }

    /// A new VM boots with this agent.
    fn revive(&self) {
        self.dead.store(false, Ordering::SeqCst);
        self.gone.send_replace(None);
    }

    /// Waits while `blocked` holds, up to the call's deadline.
    fn block_while(&self, ctx: &Context, blocked: impl Fn(&State) -> bool) -> ttrpc::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_nanos(ctx.timeout_nano as u64);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while blocked(&state) {
            if self.dead.load(Ordering::SeqCst) {
                return Err(ttrpc::Error::LocalClosed);
            }
            if std::time::Instant::now() > deadline {
                // What a real ttrpc sync client says when its deadline passes.
                return Err(ttrpc::Error::Others(
                    "Receive packet from Receiver timeout: timed out waiting on channel".into(),
                ));
            }
            state = self
                .changed
                .wait_timeout(state, TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

fn id(container: &str, exec: &str) -> String {
    if exec.is_empty() {
        container.to_string()
    } else {
        format!("{container}/{exec}")
    }
}

impl Agent for FakeAgent {
    fn create_sandbox(&self, _: Context, r: &CreateSandboxRequest) -> ttrpc::Result<Empty> {
        self.call("create_sandbox", &r.sandbox_id)
            .map(|()| Empty::new())
    }
    fn destroy_sandbox(&self, _: Context, _: &DestroySandboxRequest) -> ttrpc::Result<Empty> {
        self.call("destroy_sandbox", "")?;
        // The guest resets: the VMM exits 0.
        self.close_tap();
        self.gone.send_replace(Some(ExitStatus::from_raw(0)));
        self.dead.store(true, Ordering::SeqCst);
        Ok(Empty::new())
    }
    fn update_interface(&self, _: Context, r: &UpdateInterfaceRequest) -> ttrpc::Result<Interface> {
        self.call("update_interface", &r.interface.name)?;
        self.with(|s| s.interfaces.push((*r.interface).clone()));
        Ok(Interface::new())
    }
    fn update_routes(&self, _: Context, r: &UpdateRoutesRequest) -> ttrpc::Result<Routes> {
        self.call("update_routes", &r.routes.routes.len().to_string())?;
        self.with(|s| s.routes.push((*r.routes).clone()));
        Ok(Routes::new())
    }
    fn create_container(&self, ctx: Context, r: &CreateContainerRequest) -> ttrpc::Result<Empty> {
        self.held_call(&ctx, "create_container", &r.container_id)
    }
    fn start_container(&self, ctx: Context, r: &StartContainerRequest) -> ttrpc::Result<Empty> {
        self.held_call(&ctx, "start_container", &r.container_id)
    }
    fn remove_container(&self, _: Context, r: &RemoveContainerRequest) -> ttrpc::Result<Empty> {
        self.call("remove_container", &r.container_id)
            .map(|()| Empty::new())
    }
    fn exec_process(&self, _: Context, r: &ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.call("exec_process", &id(&r.container_id, &r.exec_id))
            .map(|()| Empty::new())
    }
    fn signal_process(&self, _: Context, r: &SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.call("signal_process", &id(&r.container_id, &r.exec_id))?;
        let key = (r.container_id.clone(), r.exec_id.clone());
        self.with(|s| s.exits.insert(key, 128 + r.signal as i32));
        Ok(Empty::new())
    }
    fn wait_process(
        &self,
        ctx: Context,
        r: &WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let key = (r.container_id.clone(), r.exec_id.clone());
        self.call("wait_process", &id(&r.container_id, &r.exec_id))?;
        self.block_while(&ctx, |s| !s.exits.contains_key(&key))?;
        Ok(WaitProcessResponse {
            status: self.with(|s| s.exits[&key]),
            ..Default::default()
        })
    }
    fn update_container(&self, _: Context, r: &UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.call("update_container", &r.container_id)
            .map(|()| Empty::new())
    }
    fn stats_container(
        &self,
        _: Context,
        r: &StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.call("stats_container", &r.container_id)?;
        Ok(StatsContainerResponse {
            memory_usage: 4096,
            pids_current: 1,
            ..Default::default()
        })
    }
    fn pause_container(&self, _: Context, r: &PauseContainerRequest) -> ttrpc::Result<Empty> {
        self.call("pause_container", &r.container_id)
            .map(|()| Empty::new())
    }
    fn resume_container(&self, _: Context, r: &ResumeContainerRequest) -> ttrpc::Result<Empty> {
        self.call("resume_container", &r.container_id)
            .map(|()| Empty::new())
    }
    fn list_processes(
        &self,
        _: Context,
        r: &ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        self.call("list_processes", &r.container_id)?;
        Ok(ListProcessesResponse {
            pids: vec![1, 7],
            ..Default::default()
        })
    }
    fn write_stdin(
        &self,
        _: Context,
        r: &WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        Ok(WriteStreamResponse {
            len: r.data.len() as u32,
            ..Default::default()
        })
    }
    fn close_stdin(&self, _: Context, r: &CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.call("close_stdin", &id(&r.container_id, &r.exec_id))
            .map(|()| Empty::new())
    }
    fn read_stdout(&self, _: Context, _: &ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        Ok(ReadStreamResponse::new()) // end of stream
    }
    fn read_stderr(&self, _: Context, _: &ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        Ok(ReadStreamResponse::new())
    }
    fn tty_win_resize(&self, _: Context, r: &TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        self.call("tty_win_resize", &r.container_id)
            .map(|()| Empty::new())
    }
    fn get_oom_event(&self, ctx: Context, _: &GetOOMEventRequest) -> ttrpc::Result<OOMEvent> {
        // Short polls, so the watch thread ends soon after the VM does.
        let ctx = Context {
            timeout_nano: ctx.timeout_nano.min(TICK.as_nanos() as i64 * 5),
            ..ctx
        };
        self.block_while(&ctx, |s| s.oom.is_empty())?;
        let container_id = self.with(|s| s.oom.remove(0));
        Ok(OOMEvent {
            container_id,
            ..Default::default()
        })
    }
}

/// Boots "VMs" that are a [`FakeAgent`] and a state directory under `root`
/// (created for real: the share's mounts are real).
pub struct FakeLauncher {
    pub root: PathBuf,
    pub agent: Arc<FakeAgent>,
    /// Boot fails with this, when set.
    pub fail: Mutex<Option<String>>,
}

impl FakeLauncher {
    pub fn new(root: &Path, agent: Arc<FakeAgent>) -> Arc<FakeLauncher> {
        Arc::new(FakeLauncher {
            root: root.to_path_buf(),
            agent,
            fail: Mutex::new(None),
        })
    }
}

#[async_trait]
impl VmLauncher for FakeLauncher {
    async fn boot(
        &self,
        pod_id: &str,
        _: VmSettings,
        network: Arc<PodNetwork>,
    ) -> Result<Arc<Sandbox>, BootError> {
        let state = StateDir::under(&self.root, "test", pod_id)?;
        if let Some(reason) = self.fail.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(BootError::NoAgent {
                reason,
                vmm_log: String::new(),
                console: String::new(),
            });
        }
        state.create()?;
        self.agent.revive();
        *self.agent.tap.lock().unwrap_or_else(|e| e.into_inner()) =
            network.take_tap().map(|(fd, _)| fd);
        let agent: Arc<dyn Agent> = self.agent.clone();
        Ok(Arc::new(Sandbox::new(
            agent,
            0,
            state,
            self.agent.gone(),
            network,
        )))
    }
}

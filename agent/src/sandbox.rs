//! Pod state: the pod's shared namespaces (held by a pause process), its
//! containers and their processes, and the OOM event queue.
//!
//! Network namespace: the pod uses the agent's own (in the guest that is
//! where the VM's NICs live and UpdateInterface configures them). IPC and
//! UTS are new per pod, PID optionally shared; each container gets its own
//! mount namespace and, unless the pod shares one, its own PID namespace.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{unshare, CloneFlags};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};

use crate::config::AgentConfig;
use crate::container::cgroup::{oom_kill_count, Cgroup, CgroupRoot, CgroupStats};
use crate::container::process::Process;
use crate::container::spawn::{self, Namespaces, PidNs};
use crate::container::{seccomp, validate_id, validate_process, Error, InitConfig, InitMode};
use crate::reaper::{lock, ExitCell};

/// How often OOM counters are re-read where the kernel cannot tell the
/// agent of a change (cgroup v1's memory.oom_control), and the longest an
/// event-driven wait lasts before a re-check anyway.
const OOM_POLL: Duration = Duration::from_millis(100);
const OOM_WAIT_MAX: Duration = Duration::from_secs(30);
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Container {
    pub id: String,
    pub cgroup: Cgroup,
    pub init: Arc<Process>,
    /// The spec's seccomp profile, compiled at create; exec'd processes get
    /// it too.
    seccomp: Option<seccomp::Program>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    oom_seen: AtomicU64,
}

struct Pod {
    id: String,
    pause: Arc<ExitCell>,
    pause_pid: i32,
    shared_pid: bool,
    cgroup_rel: String,
    /// Mounted from CreateSandbox's storages; unmounted at destroy.
    storages: Vec<PathBuf>,
}

struct OomQueue {
    events: Mutex<VecDeque<String>>,
    cv: Condvar,
    /// A byte here wakes the watcher: a container was added, or the
    /// sandbox is going away.
    wake: (OwnedFd, OwnedFd),
}

impl OomQueue {
    fn new() -> Self {
        let wake = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .expect("a pipe for the OOM watcher");
        OomQueue {
            events: Mutex::default(),
            cv: Condvar::new(),
            wake,
        }
    }

    fn wake_watcher(&self) {
        // A full pipe already wakes it: EAGAIN is fine.
        let _ = nix::unistd::write(&self.wake.1, &[1]);
    }
}

/// A container's memory.events (cgroup v2), opened and read through the
/// same descriptor, which arms it for POLLPRI; with its oom_kill count.
fn armed_oom_events(c: &Container) -> Option<(std::fs::File, u64)> {
    let mut file = std::fs::File::open(c.cgroup.oom_events_path()?).ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).ok()?;
    Some((file, oom_kill_count(&text)))
}

pub struct Sandbox {
    pub cfg: AgentConfig,
    cgroups: Option<CgroupRoot>,
    pod: Mutex<Option<Pod>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom: OomQueue,
    destroyed: AtomicBool,
}

impl Sandbox {
    pub fn new(cfg: AgentConfig) -> Arc<Sandbox> {
        let cgroups = match CgroupRoot::detect(&cfg.cgroup_root) {
            Ok(c) => {
                log::info!("cgroups: {c:?}");
                Some(c)
            }
            Err(e) => {
                log::warn!("{e}; containers cannot be created");
                None
            }
        };
        Arc::new(Sandbox {
            cfg,
            cgroups,
            pod: Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            oom: OomQueue::new(),
            destroyed: AtomicBool::new(false),
        })
    }

    fn cgroup_root(&self) -> Result<&CgroupRoot, Error> {
        self.cgroups
            .as_ref()
            .ok_or_else(|| Error::Unsupported("no usable cgroup hierarchy in this guest".into()))
    }

    pub fn create(
        self: &Arc<Self>,
        id: &str,
        hostname: &str,
        shared_pid: bool,
        storages: &[podbox_protocol::agent::Storage],
    ) -> Result<(), Error> {
        // Checked up front so that a bad storage leaves nothing behind.
        check_sandbox_request(id, hostname, storages)?;
        let mut pod = lock(&self.pod);
        if pod.is_some() {
            return Err(Error::AlreadyExists("sandbox".into()));
        }
        let root = self.cgroup_root()?;
        let cgroup_rel = format!("{}/{id}", self.cfg.cgroup_parent);
        let cg = root.create(&cgroup_rel)?;
        let mounted = match crate::storage::mount_all(storages) {
            Ok(m) => m,
            Err(e) => {
                let _ = cg.destroy();
                return Err(e);
            }
        };
        let hostname = if hostname.is_empty() {
            id.to_string()
        } else {
            hostname.to_string()
        };
        match spawn_pause(&hostname, shared_pid) {
            Ok((pause_pid, pause)) => {
                *pod = Some(Pod {
                    id: id.to_string(),
                    pause,
                    pause_pid,
                    shared_pid,
                    cgroup_rel,
                    storages: mounted,
                });
            }
            Err(e) => {
                crate::storage::unmount_all(&mounted);
                let _ = cg.destroy();
                return Err(e);
            }
        }
        drop(pod);
        let me = self.clone();
        std::thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || me.watch_oom())
            .map_err(|e| Error::io("spawn OOM watcher", e))?;
        log::info!("sandbox {id} created (hostname {hostname}, shared pid ns: {shared_pid})");
        Ok(())
    }

    /// Watches each container's OOM-kill counter. On cgroup v2 the kernel
    /// marks memory.events for poll(2) (POLLPRI) when it changes after the
    /// descriptor's last read, so the watcher reads each file through the
    /// descriptor it then polls, and sleeps until one changes: an idle
    /// pod's guest kernel is not woken ten times a second (each wakeup is
    /// emulated work on PVM hosts), and a kill after that read is never
    /// missed. memory.events also changes on every `high`/`max` event, so
    /// after a change the watcher waits 100 ms before it looks again. On
    /// v1 (no such notification) it re-reads every 100 ms, far below how
    /// fast a shim reacts anyway.
    fn watch_oom(&self) {
        while !self.destroyed.load(Ordering::SeqCst) {
            let ctrs: Vec<Arc<Container>> = lock(&self.containers).values().cloned().collect();
            let mut files = Vec::new();
            for c in &ctrs {
                match armed_oom_events(c) {
                    Some((file, kills)) => {
                        self.note_oom_kills(c, kills);
                        files.push(file);
                    }
                    None => self.note_oom_kills(c, c.cgroup.oom_kills()),
                }
            }
            let timeout = if files.len() == ctrs.len() {
                OOM_WAIT_MAX
            } else {
                OOM_POLL
            };
            let mut fds: Vec<PollFd> = files
                .iter()
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLPRI))
                .collect();
            fds.push(PollFd::new(self.oom.wake.0.as_fd(), PollFlags::POLLIN));
            let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
            let _ = poll(&mut fds, timeout);
            let changed = fds[..files.len()]
                .iter()
                .any(|f| f.revents().is_some_and(|r| !r.is_empty()));
            let mut drain = [0u8; 64];
            while matches!(nix::unistd::read(self.oom.wake.0.as_raw_fd(), &mut drain), Ok(n) if n > 0)
            {
            }
            if changed {
                std::thread::sleep(OOM_POLL);
            }
        }
    }

    fn note_oom_kills(&self, c: &Container, n: u64) {
        let seen = c.oom_seen.swap(n, Ordering::SeqCst);
        if n > seen {
            log::info!("container {} was OOM-killed ({n} kills)", c.id);
            lock(&self.oom.events).push_back(c.id.clone());
            self.oom.cv.notify_all();
        }
    }

    /// Blocks until a container gets OOM-killed; returns its id.
    pub fn next_oom(&self) -> String {
        let g = lock(&self.oom.events);
        let mut g = self
            .oom
            .cv
            .wait_while(g, |q| q.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        g.pop_front().unwrap_or_default()
    }

    fn pod_info(&self) -> Result<(i32, bool, String), Error> {
        let pod = lock(&self.pod);
        let p = pod
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("CreateSandbox has not been called".into()))?;
        if let Some(status) = p.pause.get() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} lost its pause process (pid {}, exit status {status})",
                p.id, p.pause_pid
            )));
        }
        Ok((p.pause_pid, p.shared_pid, p.cgroup_rel.clone()))
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, Error> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id:?}")))
    }

    /// Creates a container whose init waits for StartContainer. On failure
    /// nothing is left: the helper process is killed (its mount namespace
    /// dies with it) and the cgroup removed.
    pub fn create_container(&self, id: &str, spec_json: &[u8], rootfs: &str) -> Result<(), Error> {
        validate_id("container id", id)?;
        let (pause_pid, shared_pid, pod_cg) = self.pod_info()?;
        // Compiled here, before anything is set up, so a bad profile is an
        // INVALID_ARGUMENT with nothing to clean up.
        let CheckedSpec {
            spec,
            process,
            seccomp,
        } = check_container_spec(spec_json)?;
        let rootfs = if rootfs.is_empty() {
            spec.root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_default()
        } else {
            PathBuf::from(rootfs)
        };
        if !rootfs.is_absolute() || !rootfs.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "rootfs {rootfs:?} is not an absolute path to a directory"
            )));
        }
        // Reserve the id while the (slow) setup runs.
        if lock(&self.containers).contains_key(id) {
            return Err(Error::AlreadyExists(format!("container {id:?}")));
        }
        let cg = self.cgroup_root()?.create(&format!("{pod_cg}/{id}"))?;
        let result = (|| {
            if let Some(res) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
                cg.apply(res)?;
            }
            let ns = Namespaces {
                ipc: Some(format!("/proc/{pause_pid}/ns/ipc").into()),
                uts: Some(format!("/proc/{pause_pid}/ns/uts").into()),
                pid: if shared_pid {
                    PidNs::Join(format!("/proc/{pause_pid}/ns/pid").into())
                } else {
                    PidNs::New
                },
            };
            let terminal = process.terminal().unwrap_or(false);
            let cfg = InitConfig {
                mode: InitMode::Create {
                    rootfs: rootfs.clone(),
                    spec: Box::new(spec.clone()),
                },
                process,
                seccomp: seccomp.clone(),
            };
            spawn::spawn(&ns, &cg, terminal, &cfg)
        })();
        let init = match result {
            Ok(p) => Arc::new(p),
            Err(e) => {
                if let Err(ce) = cg.kill_all(KILL_TIMEOUT).and_then(|_| cg.destroy()) {
                    log::error!("cleanup after failed create of {id}: {ce}");
                }
                return Err(e);
            }
        };
        let c = Arc::new(Container {
            id: id.to_string(),
            oom_seen: AtomicU64::new(cg.oom_kills()),
            cgroup: cg,
            init,
            seccomp,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        });
        let mut ctrs = lock(&self.containers);
        if ctrs.contains_key(id) {
            drop(ctrs);
            let _ = remove(&c, KILL_TIMEOUT);
            return Err(Error::AlreadyExists(format!("container {id:?}")));
        }
        ctrs.insert(id.to_string(), c);
        drop(ctrs);
        self.oom.wake_watcher();
        log::info!("container {id} created");
        Ok(())
    }

    pub fn start_container(&self, id: &str) -> Result<(), Error> {
        let c = self.container(id)?;
        c.init.start()?;
        log::info!("container {id} started (pid {})", c.init.pid);
        Ok(())
    }

    pub fn remove_container(&self, id: &str, timeout: Duration) -> Result<(), Error> {
        let c = self.container(id)?;
        remove(&c, timeout)?;
        lock(&self.containers).remove(id);
        log::info!("container {id} removed");
        Ok(())
    }

    /// Finds a process; an empty exec id means the container's init.
    pub fn process(&self, cid: &str, exec_id: &str) -> Result<Arc<Process>, Error> {
        let c = self.container(cid)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let p = lock(&c.execs).get(exec_id).cloned();
        p.ok_or_else(|| Error::NotFound(format!("process {exec_id:?} in container {cid:?}")))
    }

    pub fn exec(&self, cid: &str, exec_id: &str, process_json: &[u8]) -> Result<(), Error> {
        validate_id("exec id", exec_id)?;
        let c = self.container(cid)?;
        let process = check_exec_process(process_json)?;
        if !c.init.started() || c.init.exit.get().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "container {cid:?} is not running"
            )));
        }
        if lock(&c.execs).contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!("process {exec_id:?}")));
        }
        let target = c.init.pid;
        let ns = Namespaces {
            ipc: Some(format!("/proc/{target}/ns/ipc").into()),
            uts: Some(format!("/proc/{target}/ns/uts").into()),
            pid: PidNs::Join(format!("/proc/{target}/ns/pid").into()),
        };
        let terminal = process.terminal().unwrap_or(false);
        let cfg = InitConfig {
            mode: InitMode::Exec { target_pid: target },
            process,
            seccomp: c.seccomp.clone(),
        };
        let p = Arc::new(spawn::spawn(&ns, &c.cgroup, terminal, &cfg)?);
        if let Err(e) = p.start() {
            p.kill_and_wait(KILL_TIMEOUT);
            return Err(e);
        }
        lock(&c.execs).insert(exec_id.to_string(), p);
        Ok(())
    }

    pub fn update(&self, cid: &str, resources_json: &[u8]) -> Result<(), Error> {
        let c = self.container(cid)?;
        c.cgroup.apply(&parse_resources(resources_json)?)
    }

    pub fn stats(&self, cid: &str) -> Result<CgroupStats, Error> {
        Ok(self.container(cid)?.cgroup.stats())
    }

    pub fn set_paused(&self, cid: &str, paused: bool) -> Result<(), Error> {
        let c = self.container(cid)?;
        c.cgroup.freeze(paused)?;
        c.paused.store(paused, Ordering::SeqCst);
        Ok(())
    }

    pub fn pids(&self, cid: &str) -> Result<Vec<i32>, Error> {
        Ok(self.container(cid)?.cgroup.pids())
    }

    /// Kills every container and the pause process and removes the pod's
    /// cgroups. The caller then exits or powers off.
    pub fn destroy(&self) -> Result<(), Error> {
        let ctrs: Vec<(String, Arc<Container>)> = lock(&self.containers).drain().collect();
        let mut errors = Vec::new();
        for (id, c) in ctrs {
            if let Err(e) = remove(&c, KILL_TIMEOUT) {
                errors.push(format!("{id}: {e}"));
            }
        }
        self.destroyed.store(true, Ordering::SeqCst);
        self.oom.wake_watcher();
        if let Some(pod) = lock(&self.pod).take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pod.pause_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if pod.pause.wait_timeout(KILL_TIMEOUT).is_none() {
                errors.push("pause process did not exit".into());
            }
            if let Ok(root) = self.cgroup_root() {
                if let Err(e) = root.open(&pod.cgroup_rel).destroy() {
                    errors.push(e.to_string());
                }
                // The parent group may be shared with other pods: remove it
                // only if it became empty.
                let _ = root.open(&self.cfg.cgroup_parent).destroy_if_empty();
            }
            errors.extend(crate::storage::unmount_all(&pod.storages));
            log::info!("sandbox {} destroyed", pod.id);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Cleanup(errors.join("; ")))
        }
    }
}

/// Kills all of a container's processes, waits for its init to be reaped
/// and removes its cgroup.
/// The checks of a CreateSandbox request that need no kernel: the id, the
/// hostname and every storage (public, as the next ones, for the fuzz
/// targets in `fuzz/`).
pub fn check_sandbox_request(
    id: &str,
    hostname: &str,
    storages: &[podbox_protocol::agent::Storage],
) -> Result<Vec<crate::storage::Checked>, Error> {
    validate_id("sandbox id", id)?;
    if hostname.len() > 64 || hostname.contains('\0') {
        return Err(Error::InvalidArgument(format!("bad hostname {hostname:?}")));
    }
    storages.iter().map(crate::storage::check).collect()
}

/// A CreateContainer request's OCI spec, checked and its seccomp profile
/// compiled before anything is set up.
pub struct CheckedSpec {
    pub spec: Spec,
    pub process: OciProcess,
    pub seccomp: Option<seccomp::Program>,
}

/// Parses and checks CreateContainer's `oci_spec_json`: a runtime spec
/// with a process stage 2 can run, and a seccomp profile that compiles.
pub fn check_container_spec(spec_json: &[u8]) -> Result<CheckedSpec, Error> {
    let spec: Spec = serde_json::from_slice(spec_json).map_err(|e| {
        Error::InvalidArgument(format!("OCI spec is not valid JSON of a runtime spec: {e}"))
    })?;
    let process = spec
        .process()
        .clone()
        .ok_or_else(|| Error::InvalidArgument("OCI spec has no process".into()))?;
    validate_process(&process)?;
    let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => Some(seccomp::compile(profile)?),
        None => None,
    };
    Ok(CheckedSpec {
        spec,
        process,
        seccomp,
    })
}

/// Parses and checks ExecProcess's `process_json`.
pub fn check_exec_process(process_json: &[u8]) -> Result<OciProcess, Error> {
    let process: OciProcess = serde_json::from_slice(process_json).map_err(|e| {
        Error::InvalidArgument(format!("process is not valid JSON of an OCI process: {e}"))
    })?;
    validate_process(&process)?;
    Ok(process)
}

/// Parses UpdateContainer's `resources_json`.
pub fn parse_resources(resources_json: &[u8]) -> Result<LinuxResources, Error> {
    serde_json::from_slice(resources_json).map_err(|e| {
        Error::InvalidArgument(format!(
            "resources are not valid JSON of OCI LinuxResources: {e}"
        ))
    })
}

fn remove(c: &Container, timeout: Duration) -> Result<(), Error> {
    c.cgroup.kill_all(timeout)?;
    if !c.init.kill_and_wait(timeout) {
        return Err(Error::Cleanup(format!("init of {} was not reaped", c.id)));
    }
    c.cgroup.destroy()
}

/// Starts the pause process in new IPC and UTS namespaces (and a new PID
/// namespace when the pod shares one) with the pod's hostname.
fn spawn_pause(hostname: &str, shared_pid: bool) -> Result<(i32, Arc<ExitCell>), Error> {
    let hostname = hostname.to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Per-thread namespaces: only this short-lived thread and the
            // child it forks see them.
            let mut flags = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
            if shared_pid {
                flags |= CloneFlags::CLONE_NEWPID;
            }
            unshare(flags).map_err(|e| Error::sys("unshare pod namespaces", e))?;
            nix::unistd::sethostname(&hostname)
                .map_err(|e| Error::sys(format!("sethostname {hostname:?}"), e))?;
            fork_pause()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Setup("pause thread panicked".into())))
    })
}

/// Forks the pause process. It does not exec: a fork needs no second
/// start-up of the agent binary, which is guest-kernel work (emulated, so
/// slow, on PVM hosts) for a process that only holds namespaces.
/// The forked child runs only async-signal-safe calls (it is a fork of a
/// multi-threaded process): stdio to /dev/null, the agent's other fds
/// closed (it must not hold container pipes or sockets open), then reap
/// children for ever (it is PID 1 of the pod's PID namespace when shared).
fn fork_pause() -> Result<(i32, Arc<ExitCell>), Error> {
    let mut reg = crate::reaper::registry();
    // SAFETY: the child only makes async-signal-safe calls and never returns.
    match unsafe { libc::fork() } {
        -1 => Err(Error::sys("fork pause process", nix::errno::Errno::last())),
        // SAFETY: in the child; see above.
        0 => unsafe { pause_child() },
        pid => Ok((pid, crate::reaper::register(&mut reg, pid))),
    }
}

/// # Safety
/// Only in the child of `fork_pause`.
unsafe fn pause_child() -> ! {
    libc::setsid();
    let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
    if null >= 0 {
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
    }
    if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
        for fd in 3..4096 {
            libc::close(fd);
        }
    }
    loop {
        // No children (ECHILD): an orphan may still be reparented to us
        // later in a shared PID namespace, so look again every second.
        if libc::waitpid(-1, std::ptr::null_mut(), 0) < 0 {
            libc::sleep(1);
        }
    }
}

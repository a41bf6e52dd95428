//! Starting and supervising `virtiofsd`, the vhost-user backend that
//! serves a host directory to a guest's virtio-fs device.
//!
//! One [`Virtiofsd`] per shared directory, started before the VM and
//! stopped with it. It is a library piece on purpose: `podbox-vmm
//! --shared-dir` uses it, and a shim that starts a VMM per pod can use it
//! too (start it, hand the socket to `podbox-vmm --fs-socket`).
//!
//! Nothing here waits without a bound: the socket must appear within a
//! timeout, an early exit is reported with virtiofsd's last log lines, and
//! [`Virtiofsd::stop`] escalates from SIGTERM to SIGKILL.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use podbox_vmm_config::VirtiofsdSpec;

/// How long virtiofsd may take to create its socket.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERM-ed virtiofsd gets before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How many of virtiofsd's last log lines an error quotes.
const TAIL_LINES: usize = 20;

pub use podbox_vmm_config::{CachePolicy, SandboxMode};

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtiofsdConfig {
    /// The virtiofsd executable.
    pub binary: PathBuf,
    /// The vhost-user socket virtiofsd listens on (it serves one frontend).
    pub socket: PathBuf,
    /// The host directory the guest sees.
    pub shared_dir: PathBuf,
    pub cache: CachePolicy,
    pub sandbox: SandboxMode,
}

impl VirtiofsdConfig {
    /// What to start for the contract's `spec`: its binary or the one
    /// [`find_virtiofsd`] finds, its socket or one in the temp directory.
    pub fn resolve(spec: &VirtiofsdSpec) -> Result<Self, VirtiofsdError> {
        let binary = match &spec.binary {
            Some(binary) => binary.clone(),
            None => find_virtiofsd().ok_or(VirtiofsdError::NotFound)?,
        };
        let socket = spec.socket.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("podbox-virtiofsd-{}.sock", std::process::id()))
        });
        Ok(VirtiofsdConfig {
            binary,
            socket,
            shared_dir: spec.shared_dir.clone(),
            cache: spec.cache,
            sandbox: spec.sandbox,
        })
    }
}

/// Capabilities virtiofsd (as root) drops from its default set: the guest
/// must not create device nodes (a block device node for a host disk) or
/// set file capabilities (a privileged binary for host users) in the
/// shared directory.
const DROPPED_CAPS: &str = "--modcaps=-mknod:-setfcap";

impl VirtiofsdConfig {
    /// virtiofsd's command line (virtiofsd 1.x syntax).
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--socket-path".into(),
            self.socket.clone().into(),
            "--shared-dir".into(),
            self.shared_dir.clone().into(),
        ];
        args.extend(
            [
                "--cache",
                self.cache.as_arg(),
                "--sandbox",
                self.sandbox.as_arg(),
                // Its default today; explicit so a changed default cannot
                // quietly turn the syscall filter off or to logging only.
                "--seccomp",
                "kill",
                DROPPED_CAPS,
            ]
            .map(Into::into),
        );
        args
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("--shared-dir: no virtiofsd on PATH, in /usr/libexec or in ~/.cargo/bin (cargo install virtiofsd; or --virtiofsd PATH)")]
    NotFound,
    #[error("shared directory {}: {reason}", path.display())]
    SharedDir { path: PathBuf, reason: String },
    #[error("starting {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("virtiofsd exited ({status}) before creating {}; its last output:\n{tail}", socket.display())]
    ExitedEarly {
        socket: PathBuf,
        status: ExitStatus,
        tail: String,
    },
    #[error("virtiofsd did not create {} within {timeout:?}; stopped. Its last output:\n{tail}", socket.display())]
    SocketTimeout {
        socket: PathBuf,
        timeout: Duration,
        tail: String,
    },
    #[error("starting a virtiofsd supervisor thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where the child's exit status lands once the waiter thread reaps it.
#[derive(Default)]
struct ExitSlot {
    status: Mutex<Option<ExitStatus>>,
    set: Condvar,
}

impl ExitSlot {
    fn get(&self) -> Option<ExitStatus> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for the exit status.
    fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .set
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// The last lines virtiofsd wrote to stderr (also forwarded to our log).
#[derive(Default, Clone)]
struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }

    fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_empty() {
            "(nothing)".into()
        } else {
            t.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
        }
    }
}

/// Called once if virtiofsd exits while it is still wanted (not through
/// [`Virtiofsd::stop`]), with a one-line description.
pub type OnUnexpectedExit = Box<dyn FnOnce(String) + Send>;

/// A running virtiofsd. Dropping it stops it.
pub struct Virtiofsd {
    pid: libc::pid_t,
    /// Signals go through a pidfd: it names this process only, even after
    /// it is reaped, so podbox-vmm's seccomp filter can allow signals to
    /// it without allowing kill(2) (a pid another process could reuse).
    pidfd: Option<std::os::fd::OwnedFd>,
    socket: PathBuf,
    exit: Arc<ExitSlot>,
    stopping: Arc<AtomicBool>,
    tail: Tail,
    stopped: bool,
}

impl Virtiofsd {
    /// Starts virtiofsd and waits (at most `timeout`) for its socket. A
    /// stale socket at the path (from a killed run) is removed first.
    ///
    /// virtiofsd gets SIGKILL when the thread that called this ends
    /// (PR_SET_PDEATHSIG follows the creating thread, not the process), so
    /// that it cannot outlive a VMM that dies without running destructors
    /// (a panic, see [`crate::fatal`]; SIGKILL). Call it from a thread that
    /// lives as long as the VM: podbox-vmm's main thread does.
    pub fn start(config: &VirtiofsdConfig, timeout: Duration) -> Result<Self, VirtiofsdError> {
        let dir = &config.shared_dir;
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(VirtiofsdError::SharedDir {
                    path: dir.clone(),
                    reason: "not a directory".into(),
                })
            }
            Err(e) => {
                return Err(VirtiofsdError::SharedDir {
                    path: dir.clone(),
                    reason: e.to_string(),
                })
            }
        }
        let _ = std::fs::remove_file(&config.socket);
        let _ = std::fs::remove_file(pid_file(&config.socket));
        let mut cmd = Command::new(&config.binary);
        cmd.args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // The VMM blocks SIGTERM/SIGINT/SIGHUP in all its threads (one
                // thread takes them with sigwait) and a blocked mask survives
                // exec: unblock everything so that stop()'s SIGTERM works.
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                die_with_parent(parent)
            });
        }
        tracing::info!("starting {cmd:?}");
        let mut child = cmd.spawn().map_err(|source| VirtiofsdError::Spawn {
            binary: config.binary.clone(),
            source,
        })?;
        let pid = child.id() as libc::pid_t;
        let pidfd = pidfd_open(pid)
            .inspect_err(|e| tracing::warn!("pidfd_open({pid}): {e}; stop() cannot signal it"))
            .ok();
        let tail = Tail::default();
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            std::thread::Builder::new()
                .name("virtiofsd-log".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        tracing::info!("virtiofsd: {line}");
                        tail.push(line);
                    }
                })
                .map_err(VirtiofsdError::Thread)?;
        }
        let exit = Arc::new(ExitSlot::default());
        // The waiter owns the Child: until it has reaped it, the pid cannot
        // be reused, so signalling `pid` from stop() is safe.
        let waiter_exit = exit.clone();
        std::thread::Builder::new()
            .name("virtiofsd-wait".into())
            .spawn(move || {
                let status = child.wait();
                let mut slot = waiter_exit.status.lock().unwrap_or_else(|e| e.into_inner());
                *slot = Some(status.unwrap_or_else(|e| {
                    tracing::warn!("waiting for virtiofsd: {e}");
                    std::os::unix::process::ExitStatusExt::from_raw(-1)
                }));
                waiter_exit.set.notify_all();
            })
            .map_err(VirtiofsdError::Thread)?;
        let mut me = Self {
            pid,
            pidfd,
            socket: config.socket.clone(),
            exit,
            stopping: Arc::new(AtomicBool::new(false)),
            tail,
            stopped: false,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = me.exit.get() {
                me.stopped = true;
                // Give the log thread a moment to take its last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Err(VirtiofsdError::ExitedEarly {
                    socket: me.socket.clone(),
                    status,
                    tail: me.tail.text(),
                });
            }
            if me.socket.exists() {
                tracing::info!("virtiofsd (pid {pid}) ready after {:?}", start.elapsed());
                return Ok(me);
            }
            if start.elapsed() > timeout {
                me.stop();
                return Err(VirtiofsdError::SocketTimeout {
                    socket: me.socket.clone(),
                    timeout,
                    tail: me.tail.text(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The descriptor signals to it go through (podbox-vmm's seccomp
    /// filter allows `pidfd_send_signal` on it only).
    pub fn pidfd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.pidfd.as_ref().map(|fd| fd.as_raw_fd())
    }

    fn signal(&self, signal: libc::c_int) {
        use std::os::fd::AsRawFd;
        let Some(pidfd) = &self.pidfd else { return };
        // SAFETY: pidfd_send_signal on our own pidfd, no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            tracing::warn!(
                "signalling virtiofsd (pid {}): {}",
                self.pid,
                std::io::Error::last_os_error()
            );
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its exit status, if it has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit.get()
    }

    /// Calls `on_exit` (on a thread of its own) if virtiofsd dies before
    /// [`stop`](Self::stop): a VMM ends the VM then, since the guest's file
    /// system is gone.
    pub fn on_unexpected_exit(&self, on_exit: OnUnexpectedExit) -> Result<(), VirtiofsdError> {
        let (exit, stopping, tail, pid) = (
            self.exit.clone(),
            self.stopping.clone(),
            self.tail.clone(),
            self.pid,
        );
        std::thread::Builder::new()
            .name("virtiofsd-watch".into())
            .spawn(move || {
                let status = loop {
                    if let Some(s) = exit.wait(Duration::from_secs(3600)) {
                        break s;
                    }
                };
                if !stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                    on_exit(format!(
                        "virtiofsd (pid {pid}) exited unexpectedly ({status}); last output: {}",
                        tail.text()
                    ));
                }
            })
            .map(|_| ())
            .map_err(VirtiofsdError::Thread)
    }

    /// Stops virtiofsd (SIGTERM, then SIGKILL after a grace period) and
    /// removes its socket. Idempotent.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if !self.stopped {
            self.stopped = true;
            if self.exit.get().is_none() {
                self.signal(libc::SIGTERM);
                if self.exit.wait(STOP_GRACE).is_none() {
                    tracing::warn!(
                        "virtiofsd (pid {}) ignored SIGTERM for {STOP_GRACE:?}; killing it",
                        self.pid
                    );
                    self.signal(libc::SIGKILL);
                    self.exit.wait(STOP_GRACE);
                }
            }
            tracing::info!(
                "virtiofsd (pid {}) stopped: {:?}",
                self.pid,
                self.exit.get()
            );
        }
        // virtiofsd also leaves `<socket>.pid` (its single-instance lock).
        for path in [self.socket.clone(), pid_file(&self.socket)] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", path.display());
                }
            }
        }
    }
}

/// In the forked child before exec: SIGKILL when the parent goes, and
/// give up at once if it has gone already (between fork and prctl, when
/// the signal would never come). SIGKILL rather than SIGTERM: a parent
/// that is gone cannot stop it gently anyway, and the socket and pid file
/// it leaves are removed by the next start. With `--sandbox namespace`
/// virtiofsd's own sandboxed child follows it (virtiofsd sets its own
/// PR_SET_PDEATHSIG there).
fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid() take no pointers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// A pidfd for our child `pid` (not yet reaped: the waiter thread owns it).
fn pidfd_open(pid: libc::pid_t) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us; pidfds are close-on-exec.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The pid file virtiofsd writes beside its socket.
pub fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".pid");
    name.into()
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds a virtiofsd executable: `$PATH`, then `/usr/libexec` (where
/// distribution packages put it), then `~/.cargo/bin` (where `cargo
/// install virtiofsd` puts it; Debian 12 has no package).
pub fn find_virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin"));
    std::env::split_paths(&path)
        .chain(std::iter::once(PathBuf::from("/usr/libexec")))
        .chain(home_bin)
        .chain(std::iter::once(PathBuf::from("/root/.cargo/bin")))
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(binary: &str, dir: &Path) -> VirtiofsdConfig {
        VirtiofsdConfig {
            binary: binary.into(),
            socket: dir.join("fs.sock"),
            shared_dir: dir.to_owned(),
            cache: CachePolicy::Never,
            sandbox: SandboxMode::None,
        }
    }

    #[test]
    fn virtiofsd_missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Virtiofsd::start(
            &config("/nonexistent/virtiofsd", dir.path()),
            DEFAULT_START_TIMEOUT,
        )
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .starts_with("starting /nonexistent/virtiofsd"),
            "{err}"
        );
    }

    #[test]
    fn virtiofsd_early_exit_is_reported_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-virtiofsd");
        std::fs::write(&script, "#!/bin/sh\necho 'fake: bad option' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let start = Instant::now();
        let err = Virtiofsd::start(
            &config(script.to_str().unwrap(), dir.path()),
            DEFAULT_START_TIMEOUT,
        )
        .err()
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "must not wait for the timeout"
        );
        let text = err.to_string();
        assert!(
            text.contains("exited") && text.contains("fake: bad option"),
            "{text}"
        );
    }

    #[test]
    fn virtiofsd_that_never_listens_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("silent-virtiofsd");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = Virtiofsd::start(
            &config(script.to_str().unwrap(), dir.path()),
            Duration::from_millis(300),
        )
        .err()
        .unwrap();
        assert!(matches!(err, VirtiofsdError::SocketTimeout { .. }), "{err}");
    }

    #[test]
    fn virtiofsd_command_line_drops_caps_and_kills_on_seccomp() {
        let dir = Path::new("/srv/share");
        let mut c = config("/usr/bin/virtiofsd", dir);
        c.cache = CachePolicy::Auto;
        c.sandbox = SandboxMode::Namespace;
        let args: Vec<String> = c
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--socket-path",
                "/srv/share/fs.sock",
                "--shared-dir",
                "/srv/share",
                "--cache",
                "auto",
                "--sandbox",
                "namespace",
                "--seccomp",
                "kill",
                "--modcaps=-mknod:-setfcap",
            ]
        );
    }

    #[test]
    fn virtiofsd_dies_with_the_thread_that_started_it() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-virtiofsd");
        // "Creates" its socket ($2 is --socket-path's value), then hangs.
        std::fs::write(&script, "#!/bin/sh\n: > \"$2\"\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let c = config(script.to_str().unwrap(), dir.path());
        // The starting thread ends while the handle lives on, unstopped: as
        // when a VMM dies without running destructors, only the death
        // signal can end the child.
        let daemon = std::thread::spawn(move || Virtiofsd::start(&c, DEFAULT_START_TIMEOUT))
            .join()
            .unwrap()
            .unwrap();
        let status = daemon.exit.wait(Duration::from_secs(5));
        let signal = status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
        assert_eq!(signal, Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn virtiofsd_shared_dir_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config("/bin/true", dir.path());
        c.shared_dir = dir.path().join("missing");
        assert!(matches!(
            Virtiofsd::start(&c, DEFAULT_START_TIMEOUT),
            Err(VirtiofsdError::SharedDir { .. })
        ));
    }
}

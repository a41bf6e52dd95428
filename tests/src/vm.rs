//! Running `podbox-vmm` (or a peer VMM) with a deadline and collecting
//! what it printed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use podbox_agent_client::{AgentClient, ClientError, ReadyListener, VmProgress};
use podbox_vmm_config::{SerialOutput, VmConfig, DEFAULT_SERIAL_MAX_BYTES};

/// How long one guest boot may take here. A boot costs about a minute of
/// emulated kernel work on a fast PVM host and 2-3x that on a slow one;
/// VM tests run one guest per two host cores ([`VmSlot`]), so this is
/// several times the slowest boot measured on this kind of machine.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(600);
/// How long a VM may make no progress (see `VmProgress`) before a wait for
/// its agent fails: a guest that went idle without answering is stuck.
pub const VM_STALL_LIMIT: Duration = Duration::from_secs(120);
/// Host cores per guest: test guests have 2 vCPUs, and a guest boot on PVM
/// keeps its vCPUs busy with emulated kernel work.
const CORES_PER_GUEST: usize = 2;

/// One of the host's slots for a running test guest, held until dropped.
/// More guests than the host has cores for only makes each boot slower
/// (on 2 cores, two guests at once took 2-3x as long each) and pushes
/// every wait towards its limit, so VM tests in all test processes take
/// turns: `max(1, cores / 2)` slots (`PODBOX_TEST_VM_SLOTS` overrides),
/// each an flock on a file under the temp directory.
pub struct VmSlot {
    _lock: File,
}

impl VmSlot {
    /// Waits for a free slot.
    pub fn acquire() -> VmSlot {
        let slots = std::env::var("PODBOX_TEST_VM_SLOTS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get()) / CORES_PER_GUEST
            })
            .max(1);
        let dir = std::env::temp_dir().join("podbox-test-vm-slots");
        std::fs::create_dir_all(&dir).expect("creating the VM slot directory");
        let waiting = Instant::now();
        let mut said = false;
        loop {
            for i in 0..slots {
                let path = dir.join(format!("slot-{i}.lock"));
                let file = File::create(&path).expect("opening a VM slot lock");
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    if said {
                        eprintln!("got a VM slot after {:?}", waiting.elapsed());
                    }
                    return VmSlot { _lock: file };
                }
            }
            if !said {
                eprintln!(
                    "waiting for one of {slots} VM slot(s) (another test's guest is running)"
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[derive(Debug)]
pub struct VmRun {
    pub status: ExitStatus,
    /// The guest's serial console.
    pub serial: String,
    /// The VMM's own log and exit reason.
    pub stderr: String,
    pub wall: Duration,
}

impl VmRun {
    /// The serial console and the VMM log, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- vmm stderr ---\n{}",
            self.serial, self.stderr
        )
    }
}

/// Runs `podbox-vmm` with the serial console captured to a file in `dir`,
/// once a [`VmSlot`] is free. The VMM is killed if it outlives `deadline`
/// (counted from its start), and the test fails.
pub fn run_vmm(vmm: &Path, dir: &Path, config: VmConfig, deadline: Duration) -> VmRun {
    spawn_vmm(vmm, dir, config).wait(deadline)
}

/// A `podbox-vmm` running in the background (for tests that talk to the
/// guest while it runs). Dropping it kills the VMM.
pub struct RunningVm {
    child: std::process::Child,
    serial_path: std::path::PathBuf,
    stderr_path: std::path::PathBuf,
    start: Instant,
    _slot: VmSlot,
}

/// Starts `podbox-vmm` like [`run_vmm`] without waiting for it. The
/// config's serial output is replaced by a file in `dir`.
pub fn spawn_vmm(vmm: &Path, dir: &Path, config: VmConfig) -> RunningVm {
    let slot = VmSlot::acquire();
    let serial_path = dir.join("serial.log");
    let stderr_path = dir.join("vmm.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("creating stderr file");
    let start = Instant::now();
    let config = VmConfig {
        serial: SerialOutput::File {
            path: serial_path.clone(),
            max_bytes: DEFAULT_SERIAL_MAX_BYTES,
        },
        ..config
    };
    let child = Command::new(vmm)
        .args(config.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", vmm.display()));
    RunningVm {
        child,
        serial_path,
        stderr_path,
        start,
        _slot: slot,
    }
}

impl RunningVm {
    /// When the VMM was started.
    pub fn started(&self) -> Instant {
        self.start
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Watches this VM's progress, for waits on its guest.
    pub fn progress(&self) -> VmProgress {
        VmProgress::new(self.pid(), VM_STALL_LIMIT, BOOT_DEADLINE)
    }

    /// Connects to the agent behind `socket` once it made its ready call on
    /// `ready` (bound before this VM started), while the VM makes progress.
    /// Prints when the ready call came and when the agent answered.
    pub fn agent(
        &self,
        socket: &Path,
        ready: &mut ReadyListener,
    ) -> Result<AgentClient, ClientError> {
        let agent = AgentClient::connect_when_ready(socket, ready, &mut self.progress())?;
        if let Some(called) = ready.called_at() {
            eprintln!(
                "agent: ready call {:.1} s after VMM start, answered {:.1} s after that",
                called.duration_since(self.start).as_secs_f64(),
                called.elapsed().as_secs_f64()
            );
        }
        Ok(agent)
    }

    /// The console and VMM log so far, for assertion messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- serial ---\n{}\n--- vmm stderr ---\n{}",
            std::fs::read_to_string(&self.serial_path).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// Waits for the VMM to exit; kills it and panics if it is still
    /// running `deadline` from now (a test may already have spent minutes
    /// talking to the guest on a loaded host).
    pub fn wait(mut self, deadline: Duration) -> VmRun {
        let waiting = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the VMM") {
                break status;
            }
            if waiting.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "VMM still running after {deadline:?}; killed.\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        VmRun {
            status,
            serial: std::fs::read_to_string(&self.serial_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
            wall: self.start.elapsed(),
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! Running `podbox-vmm` (or a peer VMM) with a deadline and collecting
//! what it printed.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one guest boot may take here. A boot costs about a minute of
/// emulated kernel work on PVM hosts, more when tests run side by side.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(600);

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

/// Runs `podbox-vmm` with the serial console captured to a file in `dir`.
/// The VMM is killed if it outlives `deadline`, and the test fails.
pub fn run_vmm(vmm: &Path, dir: &Path, args: &[&str], deadline: Duration) -> VmRun {
    spawn_vmm(vmm, dir, args).wait(deadline)
}

/// A `podbox-vmm` running in the background (for tests that talk to the
/// guest while it runs). Dropping it kills the VMM.
pub struct RunningVm {
    child: std::process::Child,
    serial_path: std::path::PathBuf,
    stderr_path: std::path::PathBuf,
    start: Instant,
}

/// Starts `podbox-vmm` like [`run_vmm`] without waiting for it.
pub fn spawn_vmm(vmm: &Path, dir: &Path, args: &[&str]) -> RunningVm {
    let serial_path = dir.join("serial.log");
    let stderr_path = dir.join("vmm.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("creating stderr file");
    let start = Instant::now();
    let child = Command::new(vmm)
        .args(args)
        .arg("--serial")
        .arg(&serial_path)
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

//! Benchmarks: side-by-side measurements printed as tables (never asserted).

pub mod agent_boot;
pub mod boot;
pub mod density;
pub mod fs;
pub mod net;
pub mod pods;
pub mod vsock;

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A VMM under measurement: the guest console on `stdout`, its own log
/// collected by `log`, and a watchdog that SIGKILLs it after the deadline.
pub struct Watched {
    pub child: Child,
    pub stdout: ChildStdout,
    pub log: JoinHandle<String>,
    pub watchdog: JoinHandle<()>,
}

/// Starts `cmd` with piped stdout/stderr and a deadline.
pub fn spawn_watched(cmd: &mut Command, deadline: Duration) -> Result<Watched, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    let watchdog = std::thread::spawn(move || {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: signal 0 only checks whether the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    Ok(Watched {
        child,
        stdout,
        log,
        watchdog,
    })
}

/// The proportional set size of process `pid` (KiB).
pub fn pss_kib(pid: u32) -> Option<u64> {
    crate::podbox::proc_kib(pid, "smaps_rollup", "Pss")
}

/// Median of the samples (upper median for an even count).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// QEMU's `microvm` machine booting `kernel` and `initrd` the way
/// podbox-vmm boots them: no firmware or ACPI, the kernel through its PVH
/// note, the serial console on stdout, `reboot -f` ends QEMU. On PVM hosts
/// it gets the command-line additions podbox-vmm applies itself and CX16
/// hidden (`pvm_cmdline` is empty elsewhere), plus `noxsave`: QEMU cannot
/// perform the guest kernel's XSAVE/XRSTOR as podbox-vmm's emulation
/// fallback does, so there the guest switches tasks with FXSAVE (enough for
/// the benchmarks' single-process guests). `machine_options` extend
/// `-M microvm`; callers add their devices.
pub fn qemu_microvm(
    kernel: &Path,
    initrd: &Path,
    pvm_cmdline: &[&str],
    vcpus: u32,
    memory_mib: u32,
    machine_options: &str,
) -> Command {
    let no_xsave = if pvm_cmdline.is_empty() {
        ""
    } else {
        "noxsave"
    };
    let append = format!(
        "console=ttyS0 reboot=k panic=1 quiet {} {no_xsave}",
        pvm_cmdline.join(" ")
    );
    // PVM rejects the ARCH_CAPABILITIES MSR QEMU sets for `-cpu host`.
    let cpu = if pvm_cmdline.is_empty() {
        "host"
    } else {
        "host,-cx16,-arch-capabilities"
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        &format!("microvm,acpi=off,x-option-roms=off,rtc=off{machine_options}"),
        "-enable-kvm",
        "-cpu",
        cpu,
    ]);
    cmd.args(["-smp", &vcpus.to_string(), "-m", &format!("{memory_mib}M")]);
    cmd.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append.trim());
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ]);
    cmd
}

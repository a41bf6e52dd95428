//! Boot to agent-ready, before and after the boot diet: podbox-vmm boots
//! the pod guest (guest kernel + agent image, 2 vCPUs, 256 MiB, vsock) until
//! the agent's ready call, for two builds side by side in one run:
//! "before" (`guest-kernel/build.sh --variant baseline`, `guest-image/build.sh
//! --baseline`: the kernel config, and the agent's source and build, of before
//! issue 11) and
//! "after" (today's). Runs alternate so drift on a shared host hits both.
//!
//! Measured: VMM start to the agent's ready call, and from KVM's statistics
//! (podbox-vmm logs them when it exits, right after the ready call) the
//! instructions KVM's emulator ran (`insn_emulation`, all vCPUs: on PVM
//! hosts the guest kernel's work) and the vCPU exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use podbox_agent_client::ReadyListener;
use podbox_vmm_config::{SerialOutput, VmConfig, VsockConfig, DEFAULT_SERIAL_MAX_BYTES};

const VCPUS: u8 = 2;
const MEMORY_MIB: u32 = 256;
const DEADLINE: Duration = Duration::from_secs(600);

/// A guest kernel and agent image to boot.
#[derive(Debug, Clone)]
pub struct GuestBuild {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AgentBootSample {
    pub to_ready: Duration,
    pub emulated: Option<u64>,
    pub exits: Option<u64>,
}

/// Sums `name=N` over the VMM's `kvm stats vcpuK:` log lines.
pub fn stat_total(log: &str, name: &str) -> Option<u64> {
    let key = format!(" {name}=");
    let values: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("kvm stats vcpu"))
        .filter_map(|l| {
            l.split(&key)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// One boot of `build` until the agent's ready call; the VMM is then
/// stopped with SIGTERM (its exit path logs KVM's statistics).
pub fn boot_to_ready(
    vmm: &Path,
    build: &GuestBuild,
    work: &Path,
) -> Result<AgentBootSample, String> {
    let dir = tempfile::tempdir_in(work).map_err(|e| e.to_string())?;
    let socket = dir.path().join("vsock.sock");
    let mut ready = ReadyListener::bind(&socket).map_err(|e| format!("ready socket: {e}"))?;
    let config = VmConfig {
        initrd: Some(build.initrd.clone()),
        vcpus: VCPUS,
        memory_mib: MEMORY_MIB,
        serial: SerialOutput::File {
            path: dir.path().join("console.log"),
            max_bytes: DEFAULT_SERIAL_MAX_BYTES,
        },
        vsock: Some(VsockConfig { cid: 3, socket }),
        ..VmConfig::new(&build.kernel)
    };
    let log_path = dir.path().join("vmm.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .args(config.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
    let to_ready = loop {
        if ready.called() {
            break Some(start.elapsed());
        }
        if start.elapsed() > DEADLINE || child.try_wait().ok().flatten().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let to_ready = to_ready.ok_or_else(|| {
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
        format!("no ready call from the agent\n--- console ---\n{console}\n--- vmm ---\n{log}")
    })?;
    Ok(AgentBootSample {
        to_ready,
        emulated: stat_total(&log, "insn_emulation"),
        exits: stat_total(&log, "exits"),
    })
}

/// A table row: its name, what it reads of a sample, how it shows a value.
type Row<'a> = (
    &'a str,
    &'a dyn Fn(&AgentBootSample) -> Option<f64>,
    &'a dyn Fn(f64) -> String,
);

pub struct AgentBootBench {
    pub before: GuestBuild,
    pub after: GuestBuild,
    pub before_runs: Vec<AgentBootSample>,
    pub after_runs: Vec<AgentBootSample>,
}

impl AgentBootBench {
    pub fn run(
        vmm: &Path,
        runs: usize,
        before: GuestBuild,
        after: GuestBuild,
        work: &Path,
    ) -> Result<Self, String> {
        let mut bench = AgentBootBench {
            before,
            after,
            before_runs: vec![],
            after_runs: vec![],
        };
        for i in 0..runs {
            eprintln!("agent-boot bench: run {}/{runs}: before", i + 1);
            let s = boot_to_ready(vmm, &bench.before, work)?;
            bench.before_runs.push(s);
            eprintln!("agent-boot bench: run {}/{runs}: after", i + 1);
            let s = boot_to_ready(vmm, &bench.after, work)?;
            bench.after_runs.push(s);
        }
        Ok(bench)
    }

    pub fn table(&self) -> String {
        let med = |v: &[AgentBootSample], f: &dyn Fn(&AgentBootSample) -> Option<f64>| {
            let mut xs: Vec<f64> = v.iter().filter_map(f).collect();
            (!xs.is_empty()).then(|| super::median(&mut xs))
        };
        let rows: [Row; 3] = [
            (
                "VMM start to the agent's ready call",
                &|s| Some(super::secs(s.to_ready)),
                &|v| format!("{v:.1} s"),
            ),
            (
                "instructions KVM emulated (`insn_emulation`, all vCPUs)",
                &|s| s.emulated.map(|n| n as f64),
                &|v| format!("{:.1} M", v / 1e6),
            ),
            (
                "vCPU exits (`exits`, all vCPUs)",
                &|s| s.exits.map(|n| n as f64),
                &|v| format!("{:.0}", v),
            ),
        ];
        let mut t = format!(
            "Pod guest: {VCPUS} vCPUs, {MEMORY_MIB} MiB, vsock; podbox-vmm from boot to the agent's ready call; median of {} run(s) each, alternating.\n\n\
             | measure | before | after | after / before |\n|---|---|---|---|\n",
            self.after_runs.len()
        );
        for (name, get, show) in rows {
            let (b, a) = (med(&self.before_runs, get), med(&self.after_runs, get));
            let cell = |v: Option<f64>| v.map(show).unwrap_or_else(|| "n/a".into());
            let ratio = match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "n/a".into(),
            };
            t.push_str(&format!(
                "| {name} | {} | {} | {ratio} |\n",
                cell(b),
                cell(a)
            ));
        }
        t.push_str(&format!(
            "\nBefore: `{}` with `{}`; after: `{}` with `{}`.\n",
            self.before.kernel.display(),
            self.before.initrd.display(),
            self.after.kernel.display(),
            self.after.initrd.display()
        ));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_stats_lines_are_summed_over_vcpus() {
        let log = "x INFO kvm stats vcpu0: exits=10 io_exits=2 insn_emulation=700\n\
                   x INFO kvm stats vcpu1: exits=5 insn_emulation=300\n\
                   x INFO --net tap0: exits=999\n";
        assert_eq!(stat_total(log, "insn_emulation"), Some(1000));
        assert_eq!(
            stat_total(log, "exits"),
            Some(15),
            "io_exits is another stat"
        );
        assert_eq!(stat_total(log, "pf_taken"), None);
    }
}

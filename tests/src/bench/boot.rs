//! Boot benchmark: podbox-vmm beside QEMU's `microvm` machine, same guest
//! kernel source, same initramfs, same host, same run.
//!
//! Measured per VMM: start to first KVM_RUN (podbox-vmm logs it), start to
//! the init marker on the serial console, the VMM's peak resident memory
//! (guest RAM the guest touched included) beside the guest RAM size.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use podbox_vmm_config::VmConfig;

use crate::guest::{busybox, guest_kernel, KernelVariant};
use crate::initramfs::Initramfs;

pub const MARKER: &str = "PODBOX-BENCH-INIT";
const VCPUS: u8 = 2;
const MEMORY_MIB: u32 = 256;
const DEADLINE: Duration = Duration::from_secs(600);

/// One boot of one VMM.
#[derive(Debug, Clone)]
pub struct BootSample {
    pub first_kvm_run: Option<Duration>,
    pub to_marker: Duration,
    pub total: Duration,
    pub max_rss_kib: u64,
}

/// A busybox initramfs whose init prints the marker and reboots.
pub fn marker_initramfs(path: &Path) -> std::io::Result<()> {
    let mut fs = Initramfs::new();
    fs.dir("bin").dir("proc");
    fs.copy("bin/busybox", 0o755, &busybox())?;
    for applet in ["sh", "echo", "reboot"] {
        fs.symlink(&format!("bin/{applet}"), "busybox");
    }
    fs.file(
        "init",
        0o755,
        format!("#!/bin/sh\necho {MARKER}\nreboot -f\n").as_bytes(),
    );
    fs.write_to(path)
}

/// Runs `cmd` with the guest console on its stdout; times the marker line.
fn run_timed(mut cmd: Command) -> Result<(BootSample, String), String> {
    let start = Instant::now();
    let super::Watched {
        child,
        stdout,
        log: err_reader,
        watchdog,
    } = super::spawn_watched(&mut cmd, DEADLINE)?;
    let pid = child.id() as libc::pid_t;
    let mut to_marker = None;
    let mut console = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if to_marker.is_none() && line.contains(MARKER) {
            to_marker = Some(start.elapsed());
        }
        console.push_str(&line);
        console.push('\n');
    }
    // wait4 for the child's peak RSS.
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child with valid out-pointers.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let total = start.elapsed();
    let _ = watchdog.join();
    let log = err_reader.join().unwrap_or_default();
    let to_marker = to_marker
        .ok_or_else(|| format!("no init marker\n--- console ---\n{console}\n--- log ---\n{log}"))?;
    let first_kvm_run = log
        .lines()
        .find_map(|l| l.split("first KVM_RUN at ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|ms| ms.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1e3));
    Ok((
        BootSample {
            first_kvm_run,
            to_marker,
            total,
            max_rss_kib: usage.ru_maxrss as u64,
        },
        log,
    ))
}

pub fn boot_podbox(vmm: &Path, kernel: &Path, initrd: &Path) -> Result<BootSample, String> {
    let config = VmConfig {
        initrd: Some(initrd.to_path_buf()),
        vcpus: VCPUS,
        memory_mib: MEMORY_MIB,
        ..VmConfig::new(kernel)
    };
    let mut cmd = Command::new(vmm);
    cmd.args(config.to_args());
    run_timed(cmd).map(|(s, _)| s)
}

/// QEMU's `microvm` machine on the same kernel command line podbox-vmm
/// builds (see `super::qemu_microvm`).
pub fn boot_qemu(kernel: &Path, initrd: &Path, pvm_cmdline: &[&str]) -> Result<BootSample, String> {
    run_timed(super::qemu_microvm(
        kernel,
        initrd,
        pvm_cmdline,
        VCPUS.into(),
        MEMORY_MIB,
        "",
    ))
    .map(|(s, _)| s)
}

pub struct BootBench {
    pub podbox: Vec<BootSample>,
    pub qemu: Vec<BootSample>,
    pub podbox_kernel: PathBuf,
    pub qemu_kernel: PathBuf,
}

fn fmt_ms(d: Option<f64>) -> String {
    d.map(|s| format!("{:.1} ms", s * 1e3))
        .unwrap_or_else(|| "n/a".into())
}

impl BootBench {
    pub fn run(vmm: &Path, runs: usize, work: &Path) -> Result<Self, String> {
        let initrd = work.join("bench-initramfs.cpio");
        marker_initramfs(&initrd).map_err(|e| e.to_string())?;
        let podbox_kernel = guest_kernel(KernelVariant::Podbox);
        let qemu_kernel = guest_kernel(KernelVariant::Qemu);
        let pvm = podbox_vmm::pvm::GuestProfile::new(podbox_vmm::pvm::HostKind::detect());
        let mut bench = BootBench {
            podbox: vec![],
            qemu: vec![],
            podbox_kernel,
            qemu_kernel,
        };
        // Alternate the two so drift on a shared host hits both alike.
        for i in 0..runs {
            eprintln!("boot bench: run {}/{runs}: podbox-vmm", i + 1);
            bench
                .podbox
                .push(boot_podbox(vmm, &bench.podbox_kernel, &initrd)?);
            eprintln!("boot bench: run {}/{runs}: qemu microvm", i + 1);
            bench.qemu.push(boot_qemu(
                &bench.qemu_kernel,
                &initrd,
                pvm.cmdline_additions(),
            )?);
        }
        Ok(bench)
    }

    /// A markdown table with medians and podbox/QEMU ratios.
    pub fn table(&self) -> String {
        let med = |v: &[BootSample], f: &dyn Fn(&BootSample) -> Option<f64>| {
            let mut xs: Vec<f64> = v.iter().filter_map(f).collect();
            if xs.is_empty() {
                None
            } else {
                Some(super::median(&mut xs))
            }
        };
        let first = |s: &BootSample| s.first_kvm_run.map(super::secs);
        let marker = |s: &BootSample| Some(super::secs(s.to_marker));
        let total = |s: &BootSample| Some(super::secs(s.total));
        let rss = |s: &BootSample| Some(s.max_rss_kib as f64 / 1024.0);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "n/a".into(),
        };
        let secs = |d: Option<f64>| {
            d.map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "n/a".into())
        };
        let mib = |d: Option<f64>| {
            d.map(|m| format!("{m:.0} MiB"))
                .unwrap_or_else(|| "n/a".into())
        };
        let (p, q) = (&self.podbox, &self.qemu);
        let mut t = String::new();
        t.push_str(&format!(
            "Guest: {VCPUS} vCPUs, {MEMORY_MIB} MiB, busybox initramfs whose init prints a marker and runs `reboot -f`; median of {} run(s) each.\n\n",
            p.len()
        ));
        t.push_str("| measure | podbox-vmm | QEMU microvm | podbox / QEMU |\n|---|---|---|---|\n");
        t.push_str(&format!(
            "| VMM start to first KVM_RUN | {} | n/a (not logged) | n/a |\n",
            fmt_ms(med(p, &first))
        ));
        t.push_str(&format!(
            "| VMM start to init marker | {} | {} | {} |\n",
            secs(med(p, &marker)),
            secs(med(q, &marker)),
            ratio(med(p, &marker), med(q, &marker))
        ));
        t.push_str(&format!(
            "| VMM start to exit after `reboot -f` | {} | {} | {} |\n",
            secs(med(p, &total)),
            secs(med(q, &total)),
            ratio(med(p, &total), med(q, &total))
        ));
        t.push_str(&format!(
            "| VMM peak RSS (guest RAM: {MEMORY_MIB} MiB) | {} | {} | {} |\n",
            mib(med(p, &rss)),
            mib(med(q, &rss)),
            ratio(med(p, &rss), med(q, &rss))
        ));
        t.push_str(&format!(
            "\nKernels: podbox-vmm boots `{}`; QEMU boots the `--variant qemu` build `{}` (same source and config plus patches/qemu/, which take out the int3 self-test and the fwait that podbox-vmm's emulation fallback performs on PVM hosts; QEMU has no such fallback).\n",
            self.podbox_kernel.display(),
            self.qemu_kernel.display()
        ));
        t
    }
}

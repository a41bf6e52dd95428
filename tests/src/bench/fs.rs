//! virtio-fs read throughput: podbox-vmm beside QEMU's `microvm` machine,
//! both with a vhost-user-fs device served by the same virtiofsd (same
//! flags), same busybox initramfs, same host, same run.
//!
//! The guest's init mounts the share by tag and reads one large host file
//! with `dd` several times, printing a marker line before and after each
//! pass. The host times the markers on the serial console (the guest's own
//! clock runs slow on PVM hosts, so its dd rate is shown only for
//! reference). virtiofsd runs with `--cache never`, so every pass goes to
//! the host rather than the guest page cache.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use podbox_vmm::virtiofsd::{
    find_virtiofsd, CachePolicy, SandboxMode, Virtiofsd, VirtiofsdConfig, DEFAULT_START_TIMEOUT,
};
use podbox_vmm_config::{FsBackend, FsConfig, VirtiofsdSpec, VmConfig};

use crate::guest::{busybox, guest_kernel, KernelVariant};
use crate::initramfs::Initramfs;

const TAG: &str = "benchfs";
const FILE: &str = "big.bin";
/// Small on purpose: on PVM hosts every request costs emulated guest-kernel
/// work and virtio-fs reads run at well under 1 MiB/s (a 256 MiB file took
/// minutes per pass); on hardware KVM raise it for a steadier figure.
const FILE_MIB: usize = 16;
const PASSES: usize = 2;
const VCPUS: u8 = 2;
const MEMORY_MIB: u32 = 256;
const DEADLINE: Duration = Duration::from_secs(600);
const START: &str = "FSBENCH-START";
const END: &str = "FSBENCH-END";
const FAIL: &str = "FSBENCH-FAIL";

/// One boot: the host-timed duration of each read pass, and dd's own
/// report lines.
#[derive(Debug, Clone, Default)]
pub struct FsSample {
    pub passes: Vec<Duration>,
    pub dd_lines: Vec<String>,
}

impl FsSample {
    /// MiB/s of each pass.
    pub fn rates(&self) -> Vec<f64> {
        self.passes
            .iter()
            .map(|d| FILE_MIB as f64 / d.as_secs_f64())
            .collect()
    }
}

/// A busybox initramfs whose init mounts the share and times `dd` reads.
pub fn fs_initramfs(path: &Path) -> std::io::Result<()> {
    let mut fs = Initramfs::new();
    fs.dir("bin").dir("proc").dir("mnt");
    fs.copy("bin/busybox", 0o755, &busybox())?;
    for applet in ["sh", "echo", "mount", "dd", "reboot"] {
        fs.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut init =
        format!("#!/bin/sh\nmount -t virtiofs {TAG} /mnt || {{ echo {FAIL}; reboot -f; }}\n");
    for _ in 0..PASSES {
        init.push_str(&format!(
            "echo {START}\ndd if=/mnt/{FILE} of=/dev/null bs=1M 2>&1\necho {END}\n"
        ));
    }
    init.push_str("reboot -f\n");
    fs.file("init", 0o755, init.as_bytes());
    fs.write_to(path)
}

/// Writes the test file (non-sparse: every page really exists on the host).
fn write_big_file(path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..FILE_MIB {
        f.write_all(&chunk)?;
    }
    f.flush()
}

/// Runs a VMM with the guest console on its stdout; times the pass markers.
fn run_passes(mut cmd: Command) -> Result<FsSample, String> {
    let super::Watched {
        mut child,
        stdout,
        log,
        watchdog,
    } = super::spawn_watched(&mut cmd, DEADLINE)?;
    let mut sample = FsSample::default();
    let mut started = None;
    let mut console = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains(START) {
            started = Some(Instant::now());
        } else if line.contains(END) {
            if let Some(s) = started.take() {
                sample.passes.push(s.elapsed());
            }
        } else if line.contains("copied") {
            sample.dd_lines.push(line.trim().to_owned());
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = watchdog.join();
    let log = log.join().unwrap_or_default();
    if sample.passes.len() != PASSES || console.contains(FAIL) {
        return Err(format!(
            "{status}: {} of {PASSES} passes\n--- console ---\n{console}\n--- log ---\n{log}",
            sample.passes.len()
        ));
    }
    Ok(sample)
}

struct Setup {
    share: PathBuf,
    initrd: PathBuf,
    virtiofsd: PathBuf,
    work: PathBuf,
}

impl Setup {
    fn virtiofsd_config(&self, socket: PathBuf) -> VirtiofsdConfig {
        VirtiofsdConfig {
            binary: self.virtiofsd.clone(),
            socket,
            shared_dir: self.share.clone(),
            cache: CachePolicy::Never,
            sandbox: SandboxMode::Namespace,
        }
    }
}

/// podbox-vmm starts and stops virtiofsd itself (`--shared-dir`).
fn run_podbox(vmm: &Path, kernel: &Path, s: &Setup) -> Result<FsSample, String> {
    let c = s.virtiofsd_config(s.work.join("podbox-fs.sock"));
    let config = VmConfig {
        initrd: Some(s.initrd.clone()),
        vcpus: VCPUS,
        memory_mib: MEMORY_MIB,
        fs: Some(FsConfig {
            tag: TAG.into(),
            backend: FsBackend::Spawn(VirtiofsdSpec {
                shared_dir: c.shared_dir,
                binary: Some(c.binary),
                socket: Some(c.socket),
                cache: c.cache,
                sandbox: c.sandbox,
            }),
        }),
        ..VmConfig::new(kernel)
    };
    let mut cmd = Command::new(vmm);
    cmd.args(config.to_args());
    run_passes(cmd)
}

/// QEMU microvm with memfd guest RAM (share=on) and vhost-user-fs-device;
/// virtiofsd started here with the same flags podbox-vmm uses.
fn run_qemu(kernel: &Path, s: &Setup, pvm_cmdline: &[&str]) -> Result<FsSample, String> {
    let c = s.virtiofsd_config(s.work.join("qemu-fs.sock"));
    let _daemon = Virtiofsd::start(&c, DEFAULT_START_TIMEOUT).map_err(|e| e.to_string())?;
    let mut cmd = super::qemu_microvm(
        kernel,
        &s.initrd,
        pvm_cmdline,
        VCPUS.into(),
        MEMORY_MIB,
        ",memory-backend=mem",
    );
    cmd.args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
    ]);
    cmd.args([
        "-chardev",
        &format!("socket,id=char0,path={}", c.socket.display()),
    ]);
    cmd.args([
        "-device",
        &format!("vhost-user-fs-device,queue-size=1024,chardev=char0,tag={TAG}"),
    ]);
    run_passes(cmd)
}

pub struct FsBench {
    pub podbox: Vec<FsSample>,
    pub qemu: Vec<FsSample>,
}

impl FsBench {
    pub fn run(vmm: &Path, runs: usize, work: &Path) -> Result<Self, String> {
        let virtiofsd = find_virtiofsd()
            .ok_or("no virtiofsd on PATH or in ~/.cargo/bin (scripts/deps.sh installs it)")?;
        let share = work.join("share");
        std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
        write_big_file(&share.join(FILE)).map_err(|e| format!("writing the test file: {e}"))?;
        let initrd = work.join("fs-bench-initramfs.cpio");
        fs_initramfs(&initrd).map_err(|e| e.to_string())?;
        let setup = Setup {
            share,
            initrd,
            virtiofsd,
            work: work.to_owned(),
        };
        let podbox_kernel = guest_kernel(KernelVariant::Podbox);
        let qemu_kernel = guest_kernel(KernelVariant::Qemu);
        let pvm = podbox_vmm::pvm::GuestProfile::new(podbox_vmm::pvm::HostKind::detect());
        let mut bench = FsBench {
            podbox: vec![],
            qemu: vec![],
        };
        // Alternate the two so drift on a shared host hits both alike.
        for i in 0..runs {
            eprintln!("fs bench: run {}/{runs}: podbox-vmm", i + 1);
            bench.podbox.push(run_podbox(vmm, &podbox_kernel, &setup)?);
            eprintln!("fs bench: run {}/{runs}: qemu microvm", i + 1);
            bench
                .qemu
                .push(run_qemu(&qemu_kernel, &setup, pvm.cmdline_additions())?);
        }
        Ok(bench)
    }

    /// A markdown table: median MiB/s over all passes, best pass, ratios.
    pub fn table(&self) -> String {
        let all = |v: &[FsSample]| -> Vec<f64> { v.iter().flat_map(FsSample::rates).collect() };
        let (mut p, mut q) = (all(&self.podbox), all(&self.qemu));
        let best = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
        let (pb, qb) = (best(&p), best(&q));
        let (pm, qm) = (super::median(&mut p), super::median(&mut q));
        let mut t = format!(
            "Guest: {VCPUS} vCPUs, {MEMORY_MIB} MiB; `dd if=/mnt/{FILE} of=/dev/null bs=1M` of a {FILE_MIB} MiB host file over virtio-fs \
             (virtiofsd --cache never --sandbox namespace), {PASSES} passes per boot, {} boot(s) per VMM; host-timed from console markers.\n\n",
            self.podbox.len()
        );
        t.push_str("| measure | podbox-vmm | QEMU microvm | podbox / QEMU |\n|---|---|---|---|\n");
        t.push_str(&format!(
            "| read MiB/s (median pass) | {pm:.2} | {qm:.2} | {:.2} |\n",
            pm / qm
        ));
        t.push_str(&format!(
            "| read MiB/s (best pass) | {pb:.2} | {qb:.2} | {:.2} |\n",
            pb / qb
        ));
        let dd = |v: &[FsSample]| {
            v.first()
                .and_then(|s| s.dd_lines.first().cloned())
                .unwrap_or_default()
        };
        // Busybox builds without dd's status line print nothing to quote.
        if !dd(&self.podbox).is_empty() {
            t.push_str(&format!(
                "\nFirst pass as the guest's dd saw it (guest clock): podbox `{}`; QEMU `{}`.\n",
                dd(&self.podbox),
                dd(&self.qemu)
            ));
        }
        t
    }
}

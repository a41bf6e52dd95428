//! Assembles a VM from a [`VmConfig`] and runs it to its end.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    self, CMDLINE_MAX_SIZE, MPTABLE_START, VIRTIO_FIRST_IRQ, VIRTIO_LAST_IRQ, VIRTIO_MMIO_START,
    ZERO_PAGE_START,
};
use crate::arch::x86_64::{boot_params, loader, mptable, regs};
use crate::config::{
    ConfigError, FsBackend, JailMode, NetBackend, NetConfig, PvmMode, SerialOutput, VmConfig,
};
use crate::devices::serial::ConsoleOutput;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{fs, net, vsock, Interrupt, VirtioDevice};
use crate::devices::{IoBus, MmioBus, Serial, I8042, SERIAL_IRQ};
use crate::exit::{ExitLatch, VmExit};
use crate::logfile::{rotated_path, LogError, RotatingLog};
use crate::profiler::report::StatsColumn;
use crate::profiler::{Profiler, ProfilerError};
use crate::pvm::{xsave, GuestProfile, HostKind};
use crate::virtiofsd::{Virtiofsd, VirtiofsdConfig, VirtiofsdError, DEFAULT_START_TIMEOUT};
use crate::vstate::kvm_stats::{self, KvmStats};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

/// Parameters the VMM's own exit handling depends on: the console it
/// watches, keyboard-controller reset, and reboot (rather than hang) on panic.
const REQUIRED_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    #[error("--jail: {0}")]
    Jail(#[from] crate::jail::JailError),
    #[error("opening {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serial output: {0}")]
    SerialLog(#[source] LogError),
    #[error("opening /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("allocating {mib} MiB of guest memory: {source}")]
    Memory { mib: u32, source: MemoryError },
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("kernel command line too long or malformed (at most {max} bytes): {0}", max = CMDLINE_MAX_SIZE)]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing {what} into guest memory: {detail}")]
    BootData { what: &'static str, detail: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("querying KVM's supported CPUID: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("serial console irqfd: {0}")]
    SerialIrq(String),
    #[error("starting a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Vsock(#[from] vsock::MuxerError),
    #[error("virtio-fs: {0}")]
    Virtiofsd(#[from] VirtiofsdError),
    #[error("virtio-fs: {0}")]
    Fs(#[from] fs::FsError),
    #[error("--net {nic}: {source}")]
    Net { nic: String, source: net::TapError },
    #[error("more virtio devices than IRQs {VIRTIO_FIRST_IRQ}-{VIRTIO_LAST_IRQ}")]
    TooManyDevices,
    #[error(transparent)]
    Profiler(#[from] ProfilerError),
    #[error("attaching {device}: {detail}")]
    Attach {
        device: &'static str,
        detail: String,
    },
}

/// Removes a unix socket the VMM created when the VMM stops, on every
/// return path of [`run`] (errors included).
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}

/// What lives outside the VM and must go when it does: sockets the VMM
/// created, and a virtiofsd it started (stopped on drop).
#[derive(Default)]
struct Backends {
    _sockets: Vec<SocketGuard>,
    virtiofsd: Option<Virtiofsd>,
    /// Each NIC's counters, logged when the VM ends.
    nics: Vec<(String, Arc<net::NetCounters>)>,
}

/// The virtio devices the config asks for, in MMIO slot order, and their
/// host-side pieces. A virtiofsd that dies while the VM runs ends the VM
/// (exit status 6) rather than leaving the guest's file system hanging.
fn virtio_devices(
    config: &VmConfig,
    exit: &Arc<ExitLatch>,
) -> Result<(Vec<Box<dyn VirtioDevice>>, Backends), BuildError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut backends = Backends::default();
    // Taps first, before anything is started: an inherited `fd=N` comes
    // without close-on-exec (the caller cleared it to pass it on), and
    // taking it over sets it, so virtiofsd does not inherit the tap.
    let nics = config
        .nics
        .iter()
        .map(net_device)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(v) = &config.vsock {
        let muxer = vsock::Muxer::new(v.cid, &v.socket)?;
        backends._sockets.push(SocketGuard(v.socket.clone()));
        devices.push(Box::new(vsock::Vsock::new(v.cid, muxer)));
    }
    if let Some(f) = &config.fs {
        let socket = match &f.backend {
            FsBackend::Socket(socket) => socket.clone(),
            FsBackend::Spawn(spec) => {
                let c = VirtiofsdConfig::resolve(spec)?;
                let socket = c.socket.clone();
                start_virtiofsd(&c, exit, &mut backends)?;
                socket
            }
        };
        devices.push(Box::new(fs::VhostUserFs::connect(&socket, &f.tag)?));
    }
    if config.balloon {
        devices.push(Box::new(crate::devices::virtio::balloon::Balloon));
    }
    // NICs come last, so the other devices keep their slots and IRQs.
    for (nic, device) in config.nics.iter().zip(nics) {
        backends.nics.push((nic.to_string(), device.counters()));
        devices.push(Box::new(device));
    }
    Ok((devices, backends))
}

/// Opens a NIC's tap (by name in our network namespace, or the inherited
/// descriptor) and builds its device.
fn net_device(nic: &NetConfig) -> Result<net::Net<net::Tap>, BuildError> {
    let tap = match &nic.backend {
        NetBackend::Tap(name) => net::Tap::open(name),
        // SAFETY: `fd=N` hands this process the descriptor; nothing else
        // in podbox-vmm uses it.
        NetBackend::Fd(fd) => unsafe { net::Tap::from_fd(*fd) },
    }
    .map_err(|source| BuildError::Net {
        nic: nic.to_string(),
        source,
    })?;
    let device = net::Net::with_tap(tap, nic.mac);
    tracing::info!("{nic}: features offered {:#x}", device.features());
    Ok(device)
}

/// Starts virtiofsd; if it dies while the VM runs, the VM ends.
fn start_virtiofsd(
    c: &VirtiofsdConfig,
    exit: &Arc<ExitLatch>,
    backends: &mut Backends,
) -> Result<(), BuildError> {
    let daemon = Virtiofsd::start(c, DEFAULT_START_TIMEOUT)?;
    let exit = exit.clone();
    daemon.on_unexpected_exit(Box::new(move |detail| {
        tracing::error!("{detail}");
        exit.trigger(VmExit::BackendDied {
            device: "virtio-fs",
            detail,
        });
    }))?;
    backends.virtiofsd = Some(daemon);
    Ok(())
}

/// Window base and IRQ of the `index`th virtio-mmio device.
fn mmio_slot(index: usize) -> Result<(u64, u32), BuildError> {
    let irq = VIRTIO_FIRST_IRQ + u32::try_from(index).map_err(|_| BuildError::TooManyDevices)?;
    if irq > VIRTIO_LAST_IRQ {
        return Err(BuildError::TooManyDevices);
    }
    Ok((VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE, irq))
}

/// The `virtio_mmio.device=` entry that tells the guest kernel where a
/// device is (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
fn virtio_cmdline_entry(base: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{base:#x}:{irq}",
        MMIO_WINDOW_SIZE / 1024
    )
}

/// Puts a device behind a virtio-mmio window: irqfd for its interrupt,
/// ioeventfds on QueueNotify (one per queue, the queue index as datamatch)
/// so queue kicks wake the device thread without a vCPU exit.
fn attach_virtio(
    vm: &Vm,
    memory: &GuestMemoryMmap,
    bus: &mut MmioBus,
    index: usize,
    device: Box<dyn VirtioDevice>,
) -> Result<(), BuildError> {
    let name = device.name();
    let fail = |detail: String| BuildError::Attach {
        device: name,
        detail,
    };
    let (base, irq) = mmio_slot(index)?;
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| fail(format!("irq eventfd: {e}")))?;
    vm.fd
        .register_irqfd(&irqfd, irq)
        .map_err(|e| fail(format!("irqfd for IRQ {irq}: {e}")))?;
    let transport = MmioTransport::new(device, memory.clone(), Arc::new(Interrupt::new(irqfd)))
        .map_err(|e| fail(e.to_string()))?;
    for (queue, evt) in transport.queue_events().iter().enumerate() {
        let addr = kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        vm.fd
            .register_ioevent(evt, &addr, queue as u32)
            .map_err(|e| fail(format!("ioeventfd for queue {queue}: {e}")))?;
    }
    tracing::info!("{name} at {base:#x}, IRQ {irq}");
    bus.insert(
        base,
        MMIO_WINDOW_SIZE,
        Arc::new(std::sync::Mutex::new(transport)),
    );
    Ok(())
}

/// KVM's statistics files for the VM and each vCPU, labelled; none where
/// the host's KVM has no KVM_GET_STATS_FD (said once).
fn open_stats(vm: &Vm, vcpus: &[Vcpu]) -> Vec<(String, KvmStats)> {
    let mut files = Vec::new();
    let opened = std::iter::once(("vm".to_string(), KvmStats::open(&vm.fd))).chain(
        vcpus
            .iter()
            .enumerate()
            .map(|(id, v)| (format!("vcpu{id}"), v.stats())),
    );
    for (label, file) in opened {
        match file {
            Ok(file) => files.push((label, file)),
            Err(e) => {
                tracing::info!("no KVM statistics for {label}: {e}");
                return Vec::new();
            }
        }
    }
    files
}

fn read_stats(files: &[(String, KvmStats)]) -> Vec<StatsColumn> {
    files
        .iter()
        .filter_map(|(label, f)| match f.read() {
            Ok(values) => Some((label.clone(), values)),
            Err(e) => {
                tracing::warn!("{label}: {e}");
                None
            }
        })
        .collect()
}

/// The statistics that tell where a vCPU's time went, one line per vCPU.
const LOGGED_VCPU_STATS: &[&str] = &[
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "signal_exits",
    "insn_emulation",
    "insn_emulation_fail",
    "pf_taken",
    "halt_wait_ns",
];

/// One line per vCPU; `when` says at which point ("" at the VM's end).
fn log_stats(stats: &[StatsColumn], when: &str) {
    for (label, values) in stats.iter().filter(|(l, _)| l != "vm") {
        tracing::info!(
            "kvm stats{when} {label}: {}",
            kvm_stats::summary(values, LOGGED_VCPU_STATS)
        );
    }
}

/// What SIGUSR1 reports, once the vCPUs exist: the VM's KVM statistics
/// files and the profiler, if one runs.
#[derive(Default)]
struct PhaseReport {
    stats: Vec<(String, KvmStats)>,
    profiler: Option<Arc<Profiler>>,
}

impl PhaseReport {
    /// Logs the statistics so far and writes the profiler's phase file.
    fn report(&self) {
        let stats = read_stats(&self.stats);
        log_stats(&stats, " at SIGUSR1");
        if let Some(p) = &self.profiler {
            match p.write_phase(&stats) {
                Ok(path) => tracing::info!("guest profile phase written to {}", path.display()),
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }
}

type PhaseReportCell = Arc<OnceLock<PhaseReport>>;

/// SIGTERM, SIGINT and SIGHUP end the VM like any other exit, so the
/// clean-up in [`run`] (sockets) happens. SIGUSR1 logs KVM's statistics
/// so far (`kvm stats at SIGUSR1 vcpuN: ...`) and, with --guest-profile,
/// writes the profile of the phase it ends, for measuring one phase of a
/// guest's work (a benchmark signals at each phase's end). They are
/// blocked in every thread (threads inherit the mask) and taken by one
/// thread with sigwait.
fn stop_on_signals(exit: Arc<ExitLatch>, phase: PhaseReportCell) -> Result<(), BuildError> {
    // SAFETY: plain libc signal-set calls on a local, initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if sig != libc::SIGUSR1 {
                exit.trigger(VmExit::Signal(sig));
            } else if let Some(phase) = phase.get() {
                phase.report();
            }
        })
        .map(|_| ())
        .map_err(BuildError::Thread)
}

fn open(what: &'static str, path: &Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The full kernel command line: what the VMM needs, the user's part, then
/// the host profile's additions.
pub fn kernel_cmdline(user: &str, profile: &GuestProfile) -> Result<Cmdline, BuildError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline
        .insert_str(REQUIRED_CMDLINE)
        .map_err(BuildError::Cmdline)?;
    if !user.trim().is_empty() {
        cmdline
            .insert_str(user.trim())
            .map_err(BuildError::Cmdline)?;
    }
    for extra in profile.cmdline_additions() {
        cmdline.insert_str(extra).map_err(BuildError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Where the serial console goes. A file is size-bounded and unbuffered
/// (the guest decides how much it prints, and the UART flushes every byte
/// anyway); stdout is std's bounded line buffer.
fn console_output(serial: &SerialOutput) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::File { path, max_bytes } => {
            remove_old_console(path);
            Box::new(RotatingLog::create(path, *max_bytes).map_err(BuildError::SerialLog)?)
        }
    })
}

/// Each run's console file starts empty, as it did when it was truncated,
/// so a tail shows this guest's output only. Only regular files are
/// removed: a symlink or device typed as the path (`/dev/null`) stays, and
/// [`RotatingLog::create`] refuses it.
fn remove_old_console(path: &Path) {
    for old in [path.to_owned(), rotated_path(path)] {
        if std::fs::symlink_metadata(&old).is_ok_and(|m| m.is_file()) {
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!("removing old console output {}: {e}", old.display());
            }
        }
    }
}

/// The files podbox-vmm creates, connects to, rotates or removes once the
/// VM runs, whose directories its jail must hold.
fn runtime_paths<'a>(config: &'a VmConfig, backends: &'a Backends) -> Vec<&'a Path> {
    let mut paths: Vec<&Path> = Vec::new();
    if let Some(v) = &config.vsock {
        paths.push(&v.socket);
    }
    if let SerialOutput::File { path, .. } = &config.serial {
        paths.push(path);
    }
    if let Some(d) = &backends.virtiofsd {
        paths.push(d.socket());
    }
    if let Some(p) = &config.guest_profile {
        paths.push(&p.path);
    }
    paths
}

/// Descriptors podbox-vmm may hold once the VM runs: what it has open at
/// the end of the build, the vsock device's sockets, and room for the rest
/// (eventfds of late-activated devices, log rotation).
fn open_files_limit(config: &VmConfig) -> u64 {
    let highest = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(1024);
    let vsock = if config.vsock.is_some() {
        vsock::muxer::MAX_SOCKETS as u64
    } else {
        0
    };
    highest + 1 + vsock + 256
}

/// The largest file podbox-vmm writes once the VM runs: the console file
/// rotates at its cap; profiles are text reports of a few MiB at most.
fn file_size_limit(config: &VmConfig) -> u64 {
    const PROFILE_BYTES: u64 = 64 << 20;
    match &config.serial {
        SerialOutput::File { max_bytes, .. } => (*max_bytes).max(PROFILE_BYTES),
        SerialOutput::Stdout => PROFILE_BYTES,
    }
}

/// Builds the VM and runs it until it exits; returns why it exited.
pub fn run(config: &VmConfig, started: Instant) -> Result<VmExit, BuildError> {
    config.validate()?;
    // First, while this is the only thread (see crate::jail).
    let jailer = match config.jail {
        JailMode::On => Some(crate::jail::Jailer::enter()?),
        JailMode::Off => None,
    };
    // Before any other thread exists: threads inherit the caller's capabilities.
    let tap_by_name = config
        .nics
        .iter()
        .any(|nic| matches!(nic.backend, NetBackend::Tap(_)));
    crate::confine::drop_capabilities(tap_by_name)?;
    let host = match config.pvm {
        PvmMode::Auto => HostKind::detect(),
        PvmMode::On => HostKind::Pvm,
        PvmMode::Off => HostKind::HardwareKvm,
    };
    let profile = GuestProfile::new(host);
    tracing::info!(
        "host: {host:?}; {} vCPU(s), {} MiB",
        config.vcpus,
        config.memory_mib
    );

    let exit = Arc::new(ExitLatch::new());
    let phase_report = PhaseReportCell::default();
    stop_on_signals(exit.clone(), phase_report.clone())?;
    let mut kernel = open("kernel", &config.kernel)?;
    let mut initrd = config
        .initrd
        .as_deref()
        .map(|p| open("initrd", p))
        .transpose()?;
    let serial_out = console_output(&config.serial)?;
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;

    let ram = layout::ram_ranges(config.memory_bytes());
    let ranges: Vec<(GuestAddress, usize)> = ram
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    // vhost-user backends map guest memory themselves: it must be shared.
    let memory = memory::guest_memory(&ranges, config.fs.is_some()).map_err(|source| {
        BuildError::Memory {
            mib: config.memory_mib,
            source,
        }
    })?;

    // Bound now, so that host clients can connect while the guest boots,
    // and before the kernel is loaded so a failing backend fails fast.
    let (virtio, backends) = virtio_devices(config, &exit)?;
    let loaded = loader::load_kernel(&memory, &mut kernel)?;
    let low_ram_end = ram[0].0 + ram[0].1;
    let initrd = initrd
        .as_mut()
        .map(|f| loader::load_initrd(&memory, f, loaded.end, low_ram_end))
        .transpose()?;
    let mut cmdline = kernel_cmdline(&config.cmdline, &profile)?;
    for index in 0..virtio.len() {
        let (base, irq) = mmio_slot(index)?;
        cmdline
            .insert_str(virtio_cmdline_entry(base, irq))
            .map_err(BuildError::Cmdline)?;
    }
    loader::load_cmdline(&memory, &cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BuildError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    tracing::info!(
        "kernel entry {:#x}, command line: {}",
        loaded.entry,
        cmdline
            .as_cstring()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    );

    let boot_data = |what| {
        move |e: vm_memory::GuestMemoryError| BuildError::BootData {
            what,
            detail: e.to_string(),
        }
    };
    let params =
        boot_params::build(&ram, cmdline_len, initrd).map_err(|e| BuildError::BootData {
            what: "boot_params",
            detail: e.to_string(),
        })?;
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(boot_data("boot_params"))?;
    let mp = mptable::build(config.vcpus).map_err(|e| BuildError::BootData {
        what: "MP table",
        detail: e.to_string(),
    })?;
    memory
        .write_slice(&mp, GuestAddress(MPTABLE_START))
        .map_err(boot_data("MP table"))?;
    regs::write_boot_tables(&memory).map_err(boot_data("page tables and GDT"))?;

    let vm = Vm::new(&kvm, &memory)?;
    let mut mmio = MmioBus::new();
    for (index, device) in virtio.into_iter().enumerate() {
        attach_virtio(&vm, &memory, &mut mmio, index, device)?;
    }
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::SerialIrq(e.to_string()))?;
    vm.fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| BuildError::SerialIrq(e.to_string()))?;
    let bus = IoBus::new(
        Serial::new(serial_irq, ConsoleOutput::new(serial_out, exit.clone())),
        I8042::new(exit.clone()),
    );

    let supported = vcpu::supported_cpuid(&kvm).map_err(BuildError::SupportedCpuid)?;
    if profile.is_pvm() {
        let leaking = xsave::host_xcr0().map_or(0, |x| xsave::unswitchable(x, &supported));
        if leaking != 0 {
            tracing::warn!(
                "host XCR0 enables state components {leaking:#x} that KVM does not offer the \
                 guest; guest processes using them can see each other's values"
            );
        }
    }
    // A profile that cannot be taken (a stripped vmlinux) must not keep
    // the VM from booting: say why and run without.
    let profiler = config.guest_profile.as_ref().and_then(|p| {
        Profiler::new(p, &config.kernel, config.vcpus)
            .map(Arc::new)
            .inspect_err(|e| tracing::warn!("{e}; running without the profiler"))
            .ok()
    });
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm.fd, id)?;
        vcpu.configure(
            &supported,
            config.vcpus,
            &profile,
            (id == 0).then_some(loaded.entry),
        )?;
        vcpus.push(vcpu);
    }

    let shared = Arc::new(VcpuShared {
        bus,
        mmio,
        exit: exit.clone(),
        memory,
        profile,
        fallback_stats: Default::default(),
        xsave_layout: xsave::Layout::from_cpuid(&supported),
        started,
        profiler: profiler.clone(),
    });
    // Built: from here on only what running the guest takes.
    crate::confine::limit_resources(open_files_limit(config), file_size_limit(config))?;
    if let Some(jailer) = jailer {
        jailer.pivot(crate::jail::dirs_of(runtime_paths(config, &backends))?)?;
    }
    let pidfds: Vec<_> = backends
        .virtiofsd
        .iter()
        .filter_map(Virtiofsd::pidfd)
        .collect();
    crate::confine::lock_down(config.seccomp, &pidfds)?;
    if let Some(p) = &profiler {
        p.start(exit.clone())?;
    }
    let _ = phase_report.set(PhaseReport {
        stats: open_stats(&vm, &vcpus),
        profiler: profiler.clone(),
    });
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let shared = shared.clone();
        // Named per vCPU: a panic report (crate::fatal) names its thread.
        let seccomp = config.seccomp;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // Before the first guest instruction; a filter that cannot
                // be installed ends the VMM (crate::fatal).
                crate::confine::confine_vcpu_thread(seccomp)
                    .unwrap_or_else(|e| panic!("vcpu{id}: {e}"));
                vcpu.run(shared)
            })
            .map_err(BuildError::Thread)?;
    }

    let reason = exit.wait();
    shared.bus.flush();
    if profile.emulation_fallback() {
        tracing::info!(
            "emulation fallback counts: {}",
            shared.fallback_stats.summary()
        );
    }
    for (nic, counters) in &backends.nics {
        tracing::info!("--net {nic}: {}", counters.summary());
    }
    let stats = read_stats(phase_report.get().map_or(&[], |p| p.stats.as_slice()));
    log_stats(&stats, "");
    if let Some(p) = &profiler {
        match p.write(&stats) {
            Ok(path) => tracing::info!("guest profile written to {}", path.display()),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    // vCPU threads still inside KVM_RUN end with the process.
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_puts_required_then_user_then_profile() {
        let pvm = GuestProfile::new(HostKind::Pvm);
        let c = kernel_cmdline("quiet rdinit=/init", &pvm)
            .unwrap()
            .as_cstring()
            .unwrap();
        let s = c.to_str().unwrap();
        assert!(
            s.starts_with("console=ttyS0 reboot=k panic=1 quiet rdinit=/init "),
            "{s}"
        );
        assert!(
            s.ends_with("podbox.pvm_syscall rcupdate.rcu_cpu_stall_suppress=1"),
            "{s}"
        );
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        let c = kernel_cmdline("", &hw).unwrap().as_cstring().unwrap();
        assert_eq!(c.to_str().unwrap(), REQUIRED_CMDLINE);
    }

    #[test]
    fn virtio_slots_are_in_the_mmio_gap_with_irqs_from_5() {
        assert_eq!(mmio_slot(0).unwrap(), (0xd000_0000, 5));
        assert_eq!(mmio_slot(1).unwrap(), (0xd000_1000, 6));
        assert!(matches!(mmio_slot(19), Err(BuildError::TooManyDevices)));
        assert_eq!(
            virtio_cmdline_entry(0xd000_0000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn overlong_cmdline_is_an_error() {
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        assert!(matches!(
            kernel_cmdline(&"x".repeat(4096), &hw),
            Err(BuildError::Cmdline(_))
        ));
    }

    /// The shim hands podbox-vmm a tap with close-on-exec cleared; the
    /// builder must take it over (setting it) before it starts virtiofsd,
    /// or virtiofsd holds the tap for as long as it runs. A fake virtiofsd
    /// reports which tun descriptors it inherited (fdinfo names the tap).
    #[test]
    fn inherited_taps_are_taken_over_before_virtiofsd_starts() {
        use crate::config::{CachePolicy, FsConfig, MacAddr, SandboxMode, VirtiofsdSpec};
        use std::os::fd::IntoRawFd;
        if !Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: no /dev/net/tun");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-virtiofsd");
        let seen = dir.path().join("fdinfo");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncat /proc/self/fdinfo/* > {} 2>/dev/null\nexit 3\n",
                seen.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let dir_path = dir.path().to_owned();
        let inherited = move || {
            std::fs::read_to_string(&seen)
                .unwrap_or_default()
                .contains("iff:\tpbxorder0")
        };
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread, which ends here.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipping: unshare(CLONE_NEWNET): {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            let (file, _) = net::tap::attach("pbxorder0", flags).expect("a tap");
            let fd = file.into_raw_fd();
            // SAFETY: F_SETFD on our own descriptor.
            assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
            // The check works: run directly, the fake sees the tap.
            let status = std::process::Command::new(&script).status().unwrap();
            assert_eq!(status.code(), Some(3));
            assert!(
                inherited(),
                "a descriptor without close-on-exec is inherited"
            );

            let mut config = VmConfig::new("/k");
            let mut spec = VirtiofsdSpec::new(&dir_path);
            spec.binary = Some(script.clone());
            spec.socket = Some(dir_path.join("fs.sock"));
            spec.cache = CachePolicy::Never;
            spec.sandbox = SandboxMode::None;
            config.fs = Some(FsConfig {
                tag: "t".into(),
                backend: FsBackend::Spawn(spec),
            });
            config.nics = vec![NetConfig {
                backend: NetBackend::Fd(fd),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
            }];
            // The fake exits at once, so the build fails there, after the
            // NIC was opened (and then closed with the error).
            let err = virtio_devices(&config, &Arc::new(ExitLatch::new()))
                .err()
                .expect("the fake virtiofsd fails");
            assert!(matches!(err, BuildError::Virtiofsd(_)), "{err}");
            assert!(!inherited(), "virtiofsd inherited the tap");
        })
        .join()
        .unwrap();
    }
}

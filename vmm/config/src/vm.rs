//! The VM's configuration as types, its bounds and its validation.

use std::path::PathBuf;

use crate::net::{NetBackend, NetConfig};
use crate::profile::{ProfileConfig, PROFILE_HZ};

/// A NIC's `tap=NAME` or `fd=N`, as `--net` spells it.
fn backend_arg(nic: &NetConfig) -> String {
    match &nic.backend {
        NetBackend::Tap(name) => format!("tap={name}"),
        NetBackend::Fd(fd) => format!("fd={fd}"),
    }
}

/// The most vCPUs podbox-vmm boots: what its MP table describes.
pub const MAX_VCPUS: u8 = 32;
pub const VCPUS: std::ops::RangeInclusive<u8> = 1..=MAX_VCPUS;
/// Guest RAM in MiB: below 64 the guest kernel and an initramfs do not
/// fit; the top is 1 TiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u32> = 64..=(1 << 20);
/// Size limit of a serial console file (`--serial-max-bytes`): 4 KiB to
/// 1 GiB, 1 MiB by default. Disk use is up to twice the limit (the file and
/// its rotated predecessor).
pub const SERIAL_MAX_BYTES: std::ops::RangeInclusive<u64> = (4 << 10)..=(1 << 30);
pub const DEFAULT_SERIAL_MAX_BYTES: u64 = 1 << 20;
/// The longest virtio-fs tag (the device's config space field).
pub const FS_TAG_LEN: usize = 36;
/// The most NICs a VM gets.
pub const MAX_NICS: usize = 8;
/// The smallest guest CID (0-2 are reserved); CIDs are 32-bit and
/// u32::MAX is VMADDR_CID_ANY.
pub const MIN_VSOCK_CID: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    /// A size-capped, rotated file: the guest can print for ever.
    File {
        path: PathBuf,
        max_bytes: u64,
    },
}

/// Whether to apply the nested-PVM guest profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PvmMode {
    /// Apply it when the host is PVM (`/sys/module/kvm_pvm`).
    Auto,
    On,
    Off,
}

/// What podbox-vmm's seccomp filter does to a syscall outside its list,
/// once the VM is built and before the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the whole VMM (SIGSYS): the default.
    Kill,
    /// Allow it and have the host kernel log it (audit type 1326, in the
    /// kernel log): for finding what a new code path needs.
    Log,
    /// No filter (capabilities are still dropped).
    Off,
}

/// Whether podbox-vmm moves itself into a mount namespace of its own whose
/// root holds only the directories of its sockets and logs (pivot_root),
/// and an IPC namespace of its own, before the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JailMode {
    /// The default; needs CAP_SYS_ADMIN at start (podbox-vmm runs as root).
    On,
    /// The host's file system stays in view (a developer's VMM run as a
    /// user without CAP_SYS_ADMIN, or with `--virtiofsd-sandbox none`).
    Off,
}

impl JailMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            JailMode::On => "on",
            JailMode::Off => "off",
        }
    }
}

impl SeccompMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        }
    }
}

/// virtiofsd's `--cache` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// No guest page cache for file data (every read reaches the host):
    /// host and guest always see each other's writes at once.
    Never,
    /// Metadata cached for a second, data cached until the file changes.
    Auto,
    Always,
}

/// virtiofsd's `--sandbox` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// Mount, PID and network namespaces with the shared directory as its
    /// root (needs root or user namespaces): the guest cannot reach past it.
    Namespace,
    /// chroot into the shared directory (root only).
    Chroot,
    /// No isolation (tests as a normal user).
    None,
}

impl CachePolicy {
    pub fn as_arg(self) -> &'static str {
        match self {
            CachePolicy::Never => "never",
            CachePolicy::Auto => "auto",
            CachePolicy::Always => "always",
        }
    }
}

impl SandboxMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            SandboxMode::Namespace => "namespace",
            SandboxMode::Chroot => "chroot",
            SandboxMode::None => "none",
        }
    }
}

impl PvmMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            PvmMode::Auto => "auto",
            PvmMode::On => "on",
            PvmMode::Off => "off",
        }
    }
}

/// The virtio-vsock device and its host side (hybrid vsock over unix sockets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest CID (3 and up).
    pub cid: u64,
    /// The unix socket host processes connect to (`CONNECT <port>\n`); guest
    /// connections to host port P go to `<socket>_<P>`.
    pub socket: PathBuf,
}

/// A virtio-fs device and the vhost-user backend that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    pub backend: FsBackend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsBackend {
    /// Connect to a virtiofsd someone else started and stops.
    Socket(PathBuf),
    /// podbox-vmm starts virtiofsd before the VM, stops it with the VM,
    /// and ends the VM if it dies.
    Spawn(VirtiofsdSpec),
}

/// The virtiofsd podbox-vmm starts for a shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtiofsdSpec {
    pub shared_dir: PathBuf,
    /// None: podbox-vmm looks on PATH, then in ~/.cargo/bin.
    pub binary: Option<PathBuf>,
    /// None: one in the temp directory, named after podbox-vmm's pid.
    pub socket: Option<PathBuf>,
    pub cache: CachePolicy,
    pub sandbox: SandboxMode,
}

impl VirtiofsdSpec {
    /// virtiofsd for `shared_dir` with podbox-vmm's defaults.
    pub fn new(shared_dir: impl Into<PathBuf>) -> Self {
        VirtiofsdSpec {
            shared_dir: shared_dir.into(),
            binary: None,
            socket: None,
            cache: CachePolicy::Auto,
            sandbox: SandboxMode::Namespace,
        }
    }
}

/// Everything a VM is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    /// initramfs (cpio, optionally gzip-compressed).
    pub initrd: Option<PathBuf>,
    /// The kernel command line; podbox-vmm adds its own console and reboot
    /// settings before it.
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub serial: SerialOutput,
    pub pvm: PvmMode,
    pub vsock: Option<VsockConfig>,
    pub fs: Option<FsConfig>,
    pub nics: Vec<NetConfig>,
    /// Sample the vCPUs and write a profile when the VM ends.
    pub guest_profile: Option<ProfileConfig>,
    /// A virtio-balloon device that takes the guest's free page reports.
    pub balloon: bool,
    /// The seccomp filter's action on a syscall it does not list.
    pub seccomp: SeccompMode,
    /// Its own mount and IPC namespaces with a root of its runtime
    /// directories only.
    pub jail: JailMode,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("--memory-mib {0}: must be between {min} and {max}", min = MEMORY_MIB.start(), max = MEMORY_MIB.end())]
    Memory(u32),
    #[error("--cmdline: must be printable ASCII without NUL, got {0:?}")]
    Cmdline(String),
    #[error(
        "--vsock-cid {0}: must be at least {MIN_VSOCK_CID} and below 2^32 - 1 (0-2 are reserved)"
    )]
    VsockCid(u64),
    #[error("--fs-tag {0:?}: must be 1 to {FS_TAG_LEN} bytes without NUL")]
    FsTag(String),
    #[error(
        "--serial-max-bytes {0}: must be between {min} (4 KiB) and {max} (1 GiB)",
        min = SERIAL_MAX_BYTES.start(),
        max = SERIAL_MAX_BYTES.end()
    )]
    SerialMaxBytes(u64),
    #[error("--serial-max-bytes: only applies to a --serial file")]
    SerialMaxBytesWithoutFile,
    #[error("--fs-cache, --virtiofsd-sandbox and --virtiofsd need --shared-dir")]
    VirtiofsdWithoutSharedDir,
    #[error("--net: at most {MAX_NICS} NICs, got {0}")]
    TooManyNics(usize),
    #[error("--net: {0}")]
    Net(String),
    #[error("--net: {0}: each NIC needs its own tap (tap=NAME or fd=N) and MAC")]
    NetDuplicate(String),
    #[error("--serial: a file cannot be named \"-\" (that is stdout)")]
    SerialFileDash,
    #[error("--guest-profile: hz={0} must be from {min} to {max}", min = PROFILE_HZ.start(), max = PROFILE_HZ.end())]
    GuestProfileHz(u32),
    #[error(
        "--virtiofsd-sandbox none|chroot: needs --jail off (virtiofsd would stay in \
         podbox-vmm's mount namespace: with none its root would be the jail, \
         which does not hold the shared directory; with chroot mounts added to \
         the share later would not reach it)"
    )]
    UnsandboxedVirtiofsdInJail,
    #[error("--kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("--initrd {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
}

impl VmConfig {
    /// A VM of `kernel` with podbox-vmm's defaults: 1 vCPU, 256 MiB, the
    /// console on stdout, no devices beyond it.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: "quiet".into(),
            vcpus: 1,
            memory_mib: 256,
            serial: SerialOutput::Stdout,
            pvm: PvmMode::Auto,
            vsock: None,
            fs: None,
            nics: Vec::new(),
            guest_profile: None,
            balloon: false,
            seccomp: SeccompMode::Kill,
            jail: JailMode::On,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !VCPUS.contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !MEMORY_MIB.contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if !self.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(ConfigError::Cmdline(self.cmdline.clone()));
        }
        if let Some(v) = &self.vsock {
            if v.cid < MIN_VSOCK_CID || v.cid >= u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(v.cid));
            }
        }
        if let SerialOutput::File { path, max_bytes } = &self.serial {
            if !SERIAL_MAX_BYTES.contains(max_bytes) {
                return Err(ConfigError::SerialMaxBytes(*max_bytes));
            }
            if path.as_os_str() == "-" {
                return Err(ConfigError::SerialFileDash);
            }
        }
        if let Some(fs) = &self.fs {
            if let FsBackend::Spawn(spec) = &fs.backend {
                if spec.sandbox != SandboxMode::Namespace && self.jail == JailMode::On {
                    return Err(ConfigError::UnsandboxedVirtiofsdInJail);
                }
            }
            if fs.tag.is_empty() || fs.tag.len() > FS_TAG_LEN || fs.tag.contains('\0') {
                return Err(ConfigError::FsTag(fs.tag.clone()));
            }
        }
        if let Some(p) = &self.guest_profile {
            if !PROFILE_HZ.contains(&p.hz) {
                return Err(ConfigError::GuestProfileHz(p.hz));
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(ConfigError::TooManyNics(self.nics.len()));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            nic.validate().map_err(ConfigError::Net)?;
            // Two NICs on one descriptor would both own (and close) it; on
            // one tap they would split its frames; one MAC twice confuses
            // every switch and neighbour table.
            for other in &self.nics[..i] {
                if other.backend == nic.backend {
                    return Err(ConfigError::NetDuplicate(format!(
                        "{} twice",
                        backend_arg(nic)
                    )));
                }
                if other.mac == nic.mac {
                    return Err(ConfigError::NetDuplicate(format!(
                        "mac={} twice ({other} and {nic})",
                        nic.mac
                    )));
                }
            }
        }
        Ok(())
    }

    /// The kernel and initramfs files look like what they should be
    /// ([`crate::check_kernel`], [`crate::check_initrd`]), where they
    /// exist: a missing one is left to podbox-vmm's open, which names it.
    /// Reads their headers, so it is not part of [`Self::validate`]
    /// (which configs of paths that exist elsewhere, e.g. in tests, pass).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let present = |path: &std::path::Path| path.symlink_metadata().is_ok();
        if present(&self.kernel) {
            crate::check_kernel(&self.kernel).map_err(|reason| ConfigError::Kernel {
                path: self.kernel.clone(),
                reason,
            })?;
        }
        if let Some(initrd) = self.initrd.as_ref().filter(|p| present(p)) {
            let refused = |reason| ConfigError::Initrd {
                path: initrd.clone(),
                reason,
            };
            crate::check_initrd(initrd).map_err(refused)?;
            // The loader refuses one that does not fit above the kernel;
            // one larger than all of guest RAM is refused here, naming
            // both flags.
            let size = std::fs::metadata(initrd).map_or(0, |m| m.len());
            if size >= self.memory_bytes() {
                return Err(refused(format!(
                    "{size} bytes, more than the VM's --memory-mib {}",
                    self.memory_mib
                )));
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

//! podbox-vmm's command line: [`VmArgs`] parses it, [`VmConfig::to_args`]
//! writes it. Both sit here, next to each other, so a flag is named in one
//! file only.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::net::NetConfig;
use crate::profile::ProfileConfig;
use crate::vm::{
    CachePolicy, ConfigError, FsBackend, FsConfig, JailMode, PvmMode, SandboxMode, SeccompMode,
    SerialOutput, VirtiofsdSpec, VmConfig, VsockConfig, DEFAULT_SERIAL_MAX_BYTES,
};

#[derive(Debug, Parser)]
#[command(name = "podbox-vmm", version, about = "Boot a podbox microVM on KVM")]
pub struct VmArgs {
    /// Uncompressed ELF vmlinux (guest-kernel/build.sh prints its path).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// initramfs (cpio, optionally gzip-compressed).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line; the VMM adds console=ttyS0 reboot=k panic=1 before it.
    #[arg(long, value_name = "STR", default_value = "quiet")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "M", default_value_t = 256)]
    memory_mib: u32,
    /// Serial console output: a file path, or - for stdout. A file starts
    /// empty, is created mode 0600, must not be a symlink, and is rotated
    /// to PATH.1 at --serial-max-bytes.
    #[arg(long, value_name = "PATH|-", default_value = "-")]
    serial: PathBuf,
    /// Size limit of the --serial file, 4096 to 1073741824 bytes [default:
    /// 1048576]; with PATH.1, the console uses at most twice this on disk.
    #[arg(long, value_name = "N")]
    serial_max_bytes: Option<u64>,
    /// Apply the nested-PVM guest profile: auto-detect, or force it on/off.
    #[arg(long, value_enum, default_value_t = PvmMode::Auto)]
    pvm: PvmMode,
    /// Add a virtio-vsock device whose host side is this unix socket: connect,
    /// write `CONNECT <port>\n`, read `OK <hostport>\n`. Guest connections to
    /// host port P go to `PATH_P`. Removed when the VMM exits.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "vsock_socket")]
    vsock_cid: u64,
    /// Add a virtio-fs device served by the vhost-user backend on this
    /// socket. Alone: connect to an already running virtiofsd. With
    /// --shared-dir: the socket virtiofsd is started on (default: one in
    /// the temp directory); removed when the VMM exits.
    #[arg(long, value_name = "PATH")]
    fs_socket: Option<PathBuf>,
    /// Share this host directory through virtio-fs: podbox-vmm starts
    /// virtiofsd for it before the guest boots and stops it when the VM ends;
    /// if virtiofsd dies, the VM ends with status 6.
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,
    /// The tag the guest mounts: `mount -t virtiofs TAG /mnt`.
    #[arg(long, value_name = "TAG", default_value = "podbox")]
    fs_tag: String,
    /// The virtiofsd to start (default: from PATH, then ~/.cargo/bin).
    #[arg(long, value_name = "PATH")]
    virtiofsd: Option<PathBuf>,
    /// virtiofsd's --cache: never (host and guest see each other's writes at
    /// once), auto, always.
    #[arg(long, value_enum)]
    fs_cache: Option<CachePolicy>,
    /// virtiofsd's --sandbox: namespace (root), chroot (root), none.
    #[arg(long, value_enum)]
    virtiofsd_sandbox: Option<SandboxMode>,
    /// Add a virtio-net NIC on a tap: `tap=NAME` (attached or created in
    /// podbox-vmm's network namespace) or `fd=N` (an inherited tap opened
    /// with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), with `,mac=XX:XX:XX:XX:XX:XX`
    /// (the guest's). Repeat for more NICs (at most 8).
    #[arg(long, value_name = "tap=NAME|fd=N,mac=MAC")]
    net: Vec<NetConfig>,
    /// Sample every vCPU N times a second (default 100, at most 1000) and
    /// write where guest time went (kernel functions from the vmlinux's
    /// symbol table, processes, halted time, KVM's statistics) to FILE when
    /// the VM ends; folded stacks go to FILE.folded.
    #[arg(long, value_name = "FILE[,hz=N]")]
    guest_profile: Option<ProfileConfig>,
    /// A virtio-balloon device with free page reporting: the guest hands
    /// back the memory it frees (2 MiB blocks and up), and podbox-vmm drops
    /// the host pages behind it. It never asks the guest to inflate.
    #[arg(long)]
    balloon: bool,
    /// What the seccomp filter podbox-vmm puts on itself before the guest
    /// runs does to a syscall it does not allow: kill the VMM, log it
    /// (kernel log, audit type 1326) and allow it, or no filter.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    seccomp: SeccompMode,
    /// Before the guest runs, move into a mount namespace whose root holds
    /// only the directories of the VMM's sockets, console and profile
    /// (pivot_root), and an IPC namespace of its own.
    #[arg(long, value_enum, default_value_t = JailMode::On)]
    jail: JailMode,
}

impl VmArgs {
    /// The VM the command line describes, validated, its kernel and
    /// initramfs files checked where they exist.
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let serial = match (self.serial.as_os_str() == "-", self.serial_max_bytes) {
            (true, None) => SerialOutput::Stdout,
            (true, Some(_)) => return Err(ConfigError::SerialMaxBytesWithoutFile),
            (false, max_bytes) => SerialOutput::File {
                path: self.serial,
                max_bytes: max_bytes.unwrap_or(DEFAULT_SERIAL_MAX_BYTES),
            },
        };
        let backend = match (self.shared_dir, self.fs_socket) {
            (None, socket) => {
                let virtiofsd_flags = self.virtiofsd.is_some()
                    || self.fs_cache.is_some()
                    || self.virtiofsd_sandbox.is_some();
                if virtiofsd_flags {
                    return Err(ConfigError::VirtiofsdWithoutSharedDir);
                }
                socket.map(FsBackend::Socket)
            }
            (Some(shared_dir), socket) => {
                let defaults = VirtiofsdSpec::new(shared_dir);
                Some(FsBackend::Spawn(VirtiofsdSpec {
                    binary: self.virtiofsd,
                    socket,
                    cache: self.fs_cache.unwrap_or(defaults.cache),
                    sandbox: self.virtiofsd_sandbox.unwrap_or(defaults.sandbox),
                    ..defaults
                }))
            }
        };
        let config = VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            serial,
            pvm: self.pvm,
            vsock: self.vsock_socket.map(|socket| VsockConfig {
                cid: self.vsock_cid,
                socket,
            }),
            fs: backend.map(|backend| FsConfig {
                tag: self.fs_tag,
                backend,
            }),
            nics: self.net,
            guest_profile: self.guest_profile,
            balloon: self.balloon,
            seccomp: self.seccomp,
            jail: self.jail,
        };
        config.validate()?;
        // podbox-vmm's own command line: its files are checked before
        // anything is built (a FIFO as --initrd would block the open).
        config.check_files()?;
        Ok(config)
    }
}

impl VmConfig {
    /// podbox-vmm's command line for this VM (without the program name).
    /// Not validated here: podbox-vmm refuses what is out of bounds, naming
    /// the flag, which tests of those errors rely on.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Args::default();
        args.flag("--kernel", &self.kernel);
        if let Some(initrd) = &self.initrd {
            args.flag("--initrd", initrd);
        }
        args.flag("--cmdline", &self.cmdline);
        args.flag("--vcpus", self.vcpus.to_string());
        args.flag("--memory-mib", self.memory_mib.to_string());
        if let SerialOutput::File { path, max_bytes } = &self.serial {
            args.flag("--serial", path);
            args.flag("--serial-max-bytes", max_bytes.to_string());
        }
        args.flag("--pvm", self.pvm.as_arg());
        if let Some(vsock) = &self.vsock {
            args.flag("--vsock-socket", &vsock.socket);
            args.flag("--vsock-cid", vsock.cid.to_string());
        }
        if let Some(fs) = &self.fs {
            args.flag("--fs-tag", &fs.tag);
            match &fs.backend {
                FsBackend::Socket(socket) => args.flag("--fs-socket", socket),
                FsBackend::Spawn(spec) => {
                    args.flag("--shared-dir", &spec.shared_dir);
                    if let Some(socket) = &spec.socket {
                        args.flag("--fs-socket", socket);
                    }
                    if let Some(binary) = &spec.binary {
                        args.flag("--virtiofsd", binary);
                    }
                    args.flag("--fs-cache", spec.cache.as_arg());
                    args.flag("--virtiofsd-sandbox", spec.sandbox.as_arg());
                }
            }
        }
        for nic in &self.nics {
            args.flag("--net", nic.to_string());
        }
        if let Some(profile) = &self.guest_profile {
            args.flag("--guest-profile", profile.to_string());
        }
        if self.balloon {
            args.0.push("--balloon".into());
        }
        args.flag("--seccomp", self.seccomp.as_arg());
        args.flag("--jail", self.jail.as_arg());
        args.0
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    /// `--name=value`, one argument: a value starting with `-` (a command
    /// line, a relative path) cannot be taken for a flag.
    fn flag(&mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) {
        let mut arg = OsString::from(name);
        arg.push("=");
        arg.push(value);
        self.0.push(arg);
    }
}

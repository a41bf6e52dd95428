//! `podbox-vmm`: boot a guest kernel and run it until it exits.
//!
//! Exit status 0 when the guest resets the VM (`reboot -f`); otherwise a
//! non-zero status and one line saying why.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use podbox_vmm::config::{
    FsBackend, FsConfig, PvmMode, SerialOutput, VmConfig, VsockConfig, DEFAULT_SERIAL_MAX_BYTES,
};
use podbox_vmm::virtiofsd::{find_virtiofsd, CachePolicy, SandboxMode, VirtiofsdConfig};
use podbox_vmm::{builder, fatal};

#[derive(Parser)]
#[command(name = "podbox-vmm", version, about = "Boot a podbox microVM on KVM")]
struct Args {
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
    serial: String,
    /// Size limit of the --serial file, 4096 to 1073741824 bytes [default:
    /// 1048576]; with PATH.1, the console uses at most twice this on disk.
    #[arg(long, value_name = "N")]
    serial_max_bytes: Option<u64>,
    /// Apply the nested-PVM guest profile: auto-detect, or force it on/off.
    #[arg(long, value_enum, default_value_t = PvmArg::Auto)]
    pvm: PvmArg,
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
    #[arg(long, value_name = "PATH", requires = "shared_dir")]
    virtiofsd: Option<PathBuf>,
    /// virtiofsd's --cache: never (host and guest see each other's writes at
    /// once), auto, always.
    #[arg(long, value_enum, default_value_t = CacheArg::Auto, requires = "shared_dir")]
    fs_cache: CacheArg,
    /// virtiofsd's --sandbox: namespace (root), chroot (root), none.
    #[arg(long, value_enum, default_value_t = SandboxArg::Namespace, requires = "shared_dir")]
    virtiofsd_sandbox: SandboxArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum CacheArg {
    Never,
    Auto,
    Always,
}

#[derive(Clone, Copy, ValueEnum)]
enum SandboxArg {
    Namespace,
    Chroot,
    None,
}

/// The virtio-fs part of the command line.
fn fs_config(args: &Args) -> Result<Option<FsConfig>, String> {
    let backend = match (&args.shared_dir, &args.fs_socket) {
        (None, None) => return Ok(None),
        (None, Some(socket)) => FsBackend::Socket(socket.clone()),
        (Some(dir), socket) => {
            let binary = match &args.virtiofsd {
                Some(b) => b.clone(),
                None => find_virtiofsd()
                    .ok_or("--shared-dir: no virtiofsd on PATH or in ~/.cargo/bin (cargo install virtiofsd; or --virtiofsd PATH)")?,
            };
            let socket = socket.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("podbox-virtiofsd-{}.sock", std::process::id()))
            });
            FsBackend::Spawn(VirtiofsdConfig {
                binary,
                socket,
                shared_dir: dir.clone(),
                cache: match args.fs_cache {
                    CacheArg::Never => CachePolicy::Never,
                    CacheArg::Auto => CachePolicy::Auto,
                    CacheArg::Always => CachePolicy::Always,
                },
                sandbox: match args.virtiofsd_sandbox {
                    SandboxArg::Namespace => SandboxMode::Namespace,
                    SandboxArg::Chroot => SandboxMode::Chroot,
                    SandboxArg::None => SandboxMode::None,
                },
            })
        }
    };
    Ok(Some(FsConfig {
        tag: args.fs_tag.clone(),
        backend,
    }))
}

/// The serial part of the command line (the limit is checked with the rest
/// of the config, in [`VmConfig::validate`]).
fn serial_output(args: &Args) -> Result<SerialOutput, String> {
    match (args.serial.as_str(), args.serial_max_bytes) {
        ("-", None) => Ok(SerialOutput::Stdout),
        ("-", Some(_)) => Err("--serial-max-bytes: only applies to a --serial file".into()),
        (path, max_bytes) => Ok(SerialOutput::File {
            path: path.into(),
            max_bytes: max_bytes.unwrap_or(DEFAULT_SERIAL_MAX_BYTES),
        }),
    }
}

/// Test hook for vmm/tests/panic_exit.rs, in debug builds only: with
/// `PODBOX_VMM_TEST_PANIC_THREAD=NAME` in the environment, a thread named
/// NAME panics while another thread spins for ever and the main thread
/// waits on it, as a VMM's event loop would carry on past a dead device
/// thread. Only [`fatal::exit_on_panic`] ends the process then. It is read
/// once, before the command line; the guest has no way to set it.
#[cfg(debug_assertions)]
fn test_panic_trigger() {
    let Some(name) = std::env::var_os("PODBOX_VMM_TEST_PANIC_THREAD") else {
        return;
    };
    let spinner = std::thread::Builder::new()
        .name("test-spin".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(10));
        })
        .expect("spawning the test spinner");
    std::thread::Builder::new()
        .name(name.to_string_lossy().into_owned())
        .spawn(|| panic!("test panic requested by PODBOX_VMM_TEST_PANIC_THREAD"))
        .expect("spawning the test panic thread");
    let _ = spinner.join();
}

#[derive(Clone, Copy, ValueEnum)]
enum PvmArg {
    Auto,
    On,
    Off,
}

fn main() -> ExitCode {
    let started = Instant::now();
    // First, before any thread exists: a panic in any of them ends the VMM.
    fatal::exit_on_panic();
    #[cfg(debug_assertions)]
    test_panic_trigger();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODBOX_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let args = Args::parse();
    let parts = fs_config(&args).and_then(|fs| serial_output(&args).map(|serial| (fs, serial)));
    let (fs, serial) = match parts {
        Ok(parts) => parts,
        Err(e) => {
            eprintln!("podbox-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        serial,
        pvm: match args.pvm {
            PvmArg::Auto => PvmMode::Auto,
            PvmArg::On => PvmMode::On,
            PvmArg::Off => PvmMode::Off,
        },
        vsock: args.vsock_socket.map(|socket| VsockConfig {
            cid: args.vsock_cid,
            socket,
        }),
        fs,
    };
    match builder::run(&config, started) {
        Ok(exit) if exit.exit_code() == 0 => {
            tracing::info!("{exit}");
            ExitCode::SUCCESS
        }
        Ok(exit) => {
            eprintln!("podbox-vmm: {exit}");
            ExitCode::from(exit.exit_code())
        }
        Err(e) => {
            eprintln!("podbox-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

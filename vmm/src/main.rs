//! `podbox-vmm`: boot a guest kernel and run it until it exits.
//!
//! Exit status 0 when the guest resets the VM (`reboot -f`); otherwise a
//! non-zero status and one line saying why.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use podbox_vmm::builder;
use podbox_vmm::config::{PvmMode, SerialOutput, VmConfig, VsockConfig};

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
    /// Serial console output: a file path, or - for stdout.
    #[arg(long, value_name = "PATH|-", default_value = "-")]
    serial: String,
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
}

#[derive(Clone, Copy, ValueEnum)]
enum PvmArg {
    Auto,
    On,
    Off,
}

fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PODBOX_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let args = Args::parse();
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        serial: match args.serial.as_str() {
            "-" => SerialOutput::Stdout,
            path => SerialOutput::File(path.into()),
        },
        pvm: match args.pvm {
            PvmArg::Auto => PvmMode::Auto,
            PvmArg::On => PvmMode::On,
            PvmArg::Off => PvmMode::Off,
        },
        vsock: args.vsock_socket.map(|socket| VsockConfig { cid: args.vsock_cid, socket }),
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

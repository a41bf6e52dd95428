//! `podbox-bench`: podbox's benchmarks, each printing a markdown table.
//!
//!   podbox-bench boot [--runs N] [--vmm PATH]
//!   podbox-bench agent-boot [--runs N] [--vmm PATH]   (before vs after the boot diet)
//!   podbox-bench vsock [--runs N] [--vmm PATH]
//!   podbox-bench fs [--runs N] [--vmm PATH]
//!   podbox-bench pods [--runs N] [--profile DIR]   (DIR: each podbox pod's guest profile, per phase)
//!   podbox-bench net [--runs N] [--mib M] [--round-trips K]
//!   podbox-bench density [--pods N]   (idle pods at 1, 5 and 10 of each runtime, up to N)
//!
//! `net` moves M MiB each way (default 2) and times K round trips (default
//! 1000): a podbox guest on a PVM host receives TCP at tens of KiB/s (its
//! kernel is emulated), so 64 MiB would take an hour.
//!
//! Build first with `cargo build --release -p podbox-vmm` (or `make bench`).
//! `pods`, `net` and `density` run pods through a private containerd with the shim and VMM from
//! `PODBOX_BIN_DIR` (`make bench-pods` builds them and sets it).

use std::path::PathBuf;
use std::process::ExitCode;

use podbox_tests::bench::agent_boot::{AgentBootBench, GuestBuild};
use podbox_tests::bench::boot::BootBench;
use podbox_tests::bench::density::{DensityBench, POD_COUNTS};
use podbox_tests::bench::fs::FsBench;
use podbox_tests::bench::net::NetBench;
use podbox_tests::bench::pods::PodsBench;
use podbox_tests::bench::vsock::VsockBench;
use podbox_tests::guest::{guest_kernel, KernelVariant};
use podbox_tests::guest_image::{agent_initramfs, baseline_initramfs};
use podbox_tests::repo_root;

fn usage() -> ExitCode {
    eprintln!(
        "usage: podbox-bench boot|agent-boot|vsock|fs|pods|net|density [--runs N] [--vmm PATH] [--mib M] [--round-trips K] [--profile DIR] [--pods N]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(which) = args.first() else {
        return usage();
    };
    let mut runs = 1usize;
    let mut mib = 2usize;
    let mut round_trips = 1000usize;
    let mut vmm = repo_root().join("target/release/podbox-vmm");
    let mut profile_dir: Option<PathBuf> = None;
    let mut max_pods = POD_COUNTS[POD_COUNTS.len() - 1];
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--runs", Some(n)) => match positive(flag, n) {
                Some(n) => runs = n,
                None => return ExitCode::from(2),
            },
            ("--vmm", Some(p)) => vmm = PathBuf::from(p),
            ("--profile", Some(p)) => profile_dir = Some(PathBuf::from(p)),
            ("--mib", Some(n)) => match positive(flag, n) {
                Some(n) => mib = n,
                None => return ExitCode::from(2),
            },
            ("--round-trips", Some(n)) => match positive(flag, n) {
                Some(n) => round_trips = n,
                None => return ExitCode::from(2),
            },
            ("--pods", Some(n)) => match positive(flag, n) {
                Some(n) => max_pods = n,
                None => return ExitCode::from(2),
            },
            _ => return usage(),
        }
    }
    if which == "pods" {
        return report(
            which,
            PodsBench::run(runs, profile_dir.as_deref()).map(|b| b.table()),
        );
    }
    if which == "density" {
        return report(which, DensityBench::run(max_pods).map(|b| b.table()));
    }
    if which == "net" {
        return report(
            which,
            NetBench::run(runs, mib, round_trips).map(|b| b.table()),
        );
    }
    if !vmm.is_file() {
        eprintln!(
            "{} not found: run `cargo build --release -p podbox-vmm` first",
            vmm.display()
        );
        return ExitCode::from(1);
    }
    let work = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("temp dir: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match which.as_str() {
        "boot" => BootBench::run(&vmm, runs, work.path()).map(|b| b.table()),
        "agent-boot" => {
            let before = GuestBuild {
                kernel: guest_kernel(KernelVariant::Baseline),
                initrd: baseline_initramfs(),
            };
            let after = GuestBuild {
                kernel: guest_kernel(KernelVariant::Podbox),
                initrd: agent_initramfs(),
            };
            AgentBootBench::run(&vmm, runs, before, after, work.path()).map(|b| b.table())
        }
        "vsock" => VsockBench::run(&vmm, runs, work.path()).map(|b| b.table()),
        "fs" => FsBench::run(&vmm, runs, work.path()).map(|b| b.table()),
        _ => return usage(),
    };
    report(which, result)
}

/// The value of `flag` as a positive number, or None after saying why.
fn positive(flag: &str, value: &str) -> Option<usize> {
    match value.parse() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            eprintln!("{flag} {value}: expected a positive number");
            None
        }
    }
}

fn report(which: &str, result: Result<String, String>) -> ExitCode {
    match result {
        Ok(table) => {
            println!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{which} bench failed: {e}");
            ExitCode::from(1)
        }
    }
}

//! podbox-agent: serves the podbox agent API (podbox-protocol) over ttrpc
//! and runs the pod's containers.
//!
//! Layout: `init` does the PID 1 duties, `rpc` maps the ttrpc API onto
//! `sandbox` (pod state), which drives `container` (namespaces, mounts,
//! cgroups, processes and stdio; no ttrpc in there).

pub mod config;
pub mod container;
pub mod init;
pub mod logger;
pub mod network;
pub mod reaper;
pub mod rpc;
pub mod sandbox;
pub mod storage;

use config::{AgentConfig, Command};

/// Entry point of the binary; returns the process exit code.
pub fn main_entry(args: Vec<String>) -> i32 {
    // The hidden helper modes are this same binary re-executed in a fresh
    // child (see container::spawn): they must not start servers or log.
    match args.get(1).map(String::as_str) {
        Some(container::stage2::ARG) => return container::stage2::run(),
        _ => {}
    }
    let cmd = match AgentConfig::parse(&args[1..]) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("podbox-agent: {msg}\n\n{}", config::USAGE);
            return 2;
        }
    };
    let cfg = match cmd {
        Command::Help => {
            println!("{}", config::USAGE);
            return 0;
        }
        Command::Version => {
            println!("podbox-agent {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        Command::Run(cfg) => cfg,
    };
    keep_heap_memory();
    logger::init(cfg.log_level);
    match rpc::serve(cfg) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("agent failed: {e}");
            1
        }
    }
}

/// Makes glibc's malloc keep the memory it has instead of handing it back:
/// one arena for all threads, no trimming, no per-allocation mmap below
/// 32 MiB (the largest threshold glibc allows).
///
/// Why: in guests on PVM hosts (nested test VMs), memory the agent returned
/// to the guest kernel (munmap, MADV_DONTNEED) sometimes stayed reachable
/// through a stale translation, so the agent's later writes landed in pages
/// that now belonged to someone else. It showed as freshly started
/// container processes dying in libc start-up with foreign bytes in their
/// TLS block, and as large ttrpc requests the agent read but never
/// answered: 7 of 40 unanswered 200 KB requests with glibc's defaults, 0 of
/// 70 with these settings. The cost is that the agent's heap does not
/// shrink after a peak; its requests are small and short-lived.
fn keep_heap_memory() {
    const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;
    // SAFETY: mallopt only changes malloc parameters; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

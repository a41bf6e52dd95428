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
    if args.get(1).map(String::as_str) == Some(container::stage2::ARG) {
        return container::stage2::run();
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
    one_malloc_arena();
    logger::init(cfg.log_level);
    match rpc::serve(cfg) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("agent failed: {e}");
            1
        }
    }
}

/// All of the agent's threads allocate from glibc's main (brk) arena. By
/// default each thread that first calls malloc gets an arena of its own,
/// a 64 MiB mapping carved out with mmap, munmap and mprotect and grown by
/// more mprotects; the agent starts threads per connection and container,
/// and each of those syscalls is emulated guest kernel work on PVM hosts.
/// Its allocations are small and not contended enough for arenas to pay.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; called before the
    // agent starts any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

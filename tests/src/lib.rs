//! The harness shared by podbox's integration tests and benchmarks: the
//! guest kernel and image (looked up where `make test-assets` built them:
//! the harness builds and installs nothing), initramfs images, static guest
//! programs, and running a VMM with a deadline; a private containerd (with
//! CRI), its test images, and a CRI client.

pub mod bench;
pub mod containerd;
pub mod cri;
pub mod guest;
pub mod guest_image;
pub mod initramfs;
pub mod net;
pub mod oci_image;
pub mod output;
pub mod podbox;
pub mod vm;
pub mod vsock;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo")
        .to_path_buf()
}

/// True where KVM tests can run. Where /dev/kvm is absent, KVM tests say so
/// on stderr and return without asserting anything.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("SKIPPED {test}: /dev/kvm is absent on this host");
        false
    }
}

/// The host's kernel release (`uname -r`), to tell a guest kernel from it.
pub fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading the host kernel release")
        .trim()
        .to_string()
}

/// A process's arguments (`/proc/<pid>/cmdline`, lossily UTF-8); None once
/// it is gone.
pub fn process_args(pid: u32) -> Option<Vec<String>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Pids, other than this process, with an argument that `matches`.
pub fn processes_with_arg(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| process_args(*pid).is_some_and(|args| args.iter().any(|a| matches(a))))
        .collect()
}

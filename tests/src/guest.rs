//! Guest-side ingredients: the guest kernel, busybox, static programs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::repo_root;

/// Which guest kernel build (see `guest-kernel/build.sh --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelVariant {
    /// What podbox-vmm boots.
    Podbox,
    /// Plus the patches that stand in for podbox-vmm's emulation fallback,
    /// for QEMU on PVM hosts.
    Qemu,
}

impl KernelVariant {
    fn arg(self) -> &'static str {
        match self {
            KernelVariant::Podbox => "podbox",
            KernelVariant::Qemu => "qemu",
        }
    }
}

/// Path of the guest kernel, built (or taken from the cache) by
/// `guest-kernel/build.sh`; `PODBOX_KERNEL` overrides the podbox variant.
pub fn guest_kernel(variant: KernelVariant) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(KernelVariant, PathBuf)>>> = OnceLock::new();
    if variant == KernelVariant::Podbox {
        if let Some(path) = std::env::var_os("PODBOX_KERNEL") {
            return path.into();
        }
    }
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = built.iter().find(|(v, _)| *v == variant) {
        return path.clone();
    }
    let script = repo_root().join("guest-kernel/build.sh");
    let out = Command::new(&script)
        .args(["--variant", variant.arg()])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "guest-kernel/build.sh --variant {} failed:\n{}",
        variant.arg(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build.sh prints the vmlinux path")
            .trim(),
    );
    assert!(
        path.is_file(),
        "build.sh printed {}, which is not a file",
        path.display()
    );
    built.push((variant, path.clone()));
    path
}

/// Debian's static busybox (package busybox-static).
pub fn busybox() -> PathBuf {
    let path = PathBuf::from("/bin/busybox");
    let out = Command::new(&path).output();
    let is_static = Command::new("file")
        .arg("-L")
        .arg(&path)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"));
    assert!(
        out.is_ok() && is_static.unwrap_or(true),
        "{} missing or not static: install Debian's busybox-static (make deps does)",
        path.display()
    );
    path
}

/// Compiles a C source into a static x86-64 executable under `dir`.
pub fn compile_static_c(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let bin = dir.join(name);
    std::fs::write(&src, source).expect("writing C source");
    let out = Command::new("cc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("running cc (install gcc)");
    assert!(
        out.status.success(),
        "cc {name}.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

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
    /// The podbox kernel before the boot diet (`baseline.config`), for
    /// `podbox-bench agent-boot`.
    Baseline,
}

impl KernelVariant {
    fn arg(self) -> &'static str {
        match self {
            KernelVariant::Podbox => "podbox",
            KernelVariant::Qemu => "qemu",
            KernelVariant::Baseline => "baseline",
        }
    }

    /// The make target that builds this variant (the tests boot only the
    /// podbox one; the QEMU one is the benchmark's).
    fn make_target(self) -> &'static str {
        match self {
            KernelVariant::Podbox => "`make test-assets` (`make test` runs it first)",
            KernelVariant::Qemu => "`make bench-assets` (`make bench` runs it first)",
            KernelVariant::Baseline => "`make bench-agent-boot`",
        }
    }
}

/// Path of the guest kernel that `guest-kernel/build.sh --variant V` built
/// into its cache, looked up with `--print-path` (the same content-hash key,
/// nothing built or installed); `PODBOX_KERNEL` overrides the podbox
/// variant. Panics, naming the make target, where it is not built.
pub fn guest_kernel(variant: KernelVariant) -> PathBuf {
    static FOUND: OnceLock<Mutex<Vec<(KernelVariant, PathBuf)>>> = OnceLock::new();
    if variant == KernelVariant::Podbox {
        if let Some(path) = std::env::var_os("PODBOX_KERNEL") {
            return path.into();
        }
    }
    let found = FOUND.get_or_init(Default::default);
    let mut found = found.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, path)) = found.iter().find(|(v, _)| *v == variant) {
        return path.clone();
    }
    let path = prepared_output(
        "guest-kernel/build.sh",
        &["--variant", variant.arg()],
        &format!("the {} guest kernel", variant.arg()),
        &format!(
            "run {} or `guest-kernel/build.sh --variant {}`",
            variant.make_target(),
            variant.arg()
        ),
    );
    found.push((variant, path.clone()));
    path
}

/// The output of a build script that `make test-assets` ran before the
/// tests: `script ARGS --print-path` (from the repo root) prints its path
/// without building or installing anything. Where it is missing, panics
/// with the script's reason and `remedy`: the harness never builds it.
pub(crate) fn prepared_output(script: &str, args: &[&str], what: &str, remedy: &str) -> PathBuf {
    let root = repo_root();
    let command = [script]
        .iter()
        .chain(args)
        .chain(&["--print-path"])
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(root.join(script))
        .args(args)
        .arg("--print-path")
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("running {command}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last().map(|l| PathBuf::from(l.trim())) {
        Some(path) if out.status.success() && path.is_file() => path,
        _ => panic!(
            "{what} is not built: {remedy}; the test harness only looks it up.\n\
             `{command}` ({}) said:\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
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

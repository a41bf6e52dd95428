//! podbox under containerd: the shim and VMM binaries, a shim config that
//! points at the test guest kernel and image, and what a pod leaves on the
//! host (to assert that nothing is left).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cri::CriClient;

use crate::guest::{guest_kernel, KernelVariant};
use crate::guest_image::agent_initramfs;
use crate::repo_root;

/// Where the shim keeps each pod's state (podbox_shim::sandbox::state_dir::STATE_ROOT).
pub const STATE_ROOT: &str = "/run/podbox";
pub const SHIM_BINARY: &str = "containerd-shim-podbox-v2";
pub const VMM_BINARY: &str = "podbox-vmm";

/// The directory holding `containerd-shim-podbox-v2` and `podbox-vmm`
/// (the shim finds the VMM beside itself): `PODBOX_BIN_DIR` if set, else
/// `$CARGO_TARGET_DIR/release` (a relative `CARGO_TARGET_DIR` taken from
/// the repository root, where `make` runs cargo), else
/// `<repo>/target/release`. Release, as users run them: a debug VMM's
/// device threads are several times slower, which is not what the
/// end-to-end tests are there to measure. The harness does not build them
/// (a cargo build inside `cargo test` would wait on its lock): `make test`
/// does, first. Panics, saying how to build them, where either is missing.
pub fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os("PODBOX_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => default_bin_dir(),
    };
    for binary in [SHIM_BINARY, VMM_BINARY] {
        let path = dir.join(binary);
        assert!(
            path.is_file(),
            "{} is missing: run `make test` (which builds it), or build it with \
             `cargo build --release -p podbox-shim -p podbox-vmm` (or point \
             PODBOX_BIN_DIR at a directory holding {SHIM_BINARY} and {VMM_BINARY})",
            path.display()
        );
    }
    dir
}

/// Where `cargo build --release` from the repository root puts binaries.
fn default_bin_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    };
    target.join("release")
}

/// virtiofsd where scripts/deps.sh puts it, or on PATH.
pub fn virtiofsd() -> Option<PathBuf> {
    podbox_vmm::virtiofsd::find_virtiofsd()
}

/// A private containerd whose CRI handler and ctr runtime `podbox` use the
/// shim from [`bin_dir`] with a config in a new temp dir (returned: it must
/// outlive the containerd). What the demo and the pod benchmarks run on.
pub fn containerd_with_podbox() -> Result<(tempfile::TempDir, crate::containerd::Containerd), String>
{
    containerd_with_podbox_config("")
}

/// The same with `extra` lines in the shim config.
pub fn containerd_with_podbox_config(
    extra: &str,
) -> Result<(tempfile::TempDir, crate::containerd::Containerd), String> {
    let virtiofsd = virtiofsd().ok_or("no virtiofsd: run scripts/deps.sh")?;
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let config = write_shim_config_with_initrd(dir.path(), &virtiofsd, &agent_initramfs(), extra);
    let containerd =
        crate::containerd::Containerd::start_with(crate::containerd::ContainerdOptions {
            shim_dirs: vec![bin_dir()],
            podbox_config: Some(config),
        })
        .map_err(|e| format!("starting containerd: {e}"))?;
    Ok((dir, containerd))
}

/// Writes a shim config for the test guest kernel and image into `dir`.
pub fn write_shim_config(dir: &Path, virtiofsd: &Path) -> PathBuf {
    write_shim_config_with_initrd(dir, virtiofsd, &agent_initramfs(), "")
}

/// A containerd that runs this build's podbox shim with the config
/// [`write_shim_config`] writes in `dir`, and the VM slot its guests boot
/// in; None (and a SKIPPED line) where /dev/kvm is absent. A missing
/// virtiofsd fails the test: the README's test command installs it.
pub fn podbox_containerd(
    test: &str,
    dir: &Path,
) -> Option<(crate::vm::VmSlot, crate::containerd::Containerd)> {
    podbox_containerd_with(test, dir, write_shim_config)
}

/// [`podbox_containerd`] with the shim config `write_config(dir, virtiofsd)`
/// writes (and returns the path of).
pub fn podbox_containerd_with(
    test: &str,
    dir: &Path,
    write_config: impl FnOnce(&Path, &Path) -> PathBuf,
) -> Option<(crate::vm::VmSlot, crate::containerd::Containerd)> {
    if !crate::kvm_available(test) {
        return None;
    }
    // Looked up before the slot is taken: a missing binary fails the test
    // without keeping another test's guest waiting for nothing.
    let bin_dir = bin_dir();
    // The shim boots the guests: the test holds a VM slot meanwhile, so no
    // more guests run at once than the host has cores for.
    let slot = crate::vm::VmSlot::acquire();
    let virtiofsd = virtiofsd().expect("no virtiofsd: scripts/deps.sh (make test) installs it");
    let options = crate::containerd::ContainerdOptions {
        shim_dirs: vec![bin_dir],
        podbox_config: Some(write_config(dir, &virtiofsd)),
    };
    let containerd = crate::containerd::Containerd::start_with(options)
        .unwrap_or_else(|e| panic!("starting the test containerd: {e}"));
    Some((slot, containerd))
}

/// The same with another guest image and `extra` config lines; a key
/// `extra` sets replaces the default line of that key (TOML refuses a key
/// twice).
pub fn write_shim_config_with_initrd(
    dir: &Path,
    virtiofsd: &Path,
    initrd: &Path,
    extra: &str,
) -> PathBuf {
    let path = dir.join("podbox-config.toml");
    let defaults = [
        (
            "kernel",
            format!(
                "{:?}",
                guest_kernel(KernelVariant::Podbox).display().to_string()
            ),
        ),
        ("initrd", format!("{:?}", initrd.display().to_string())),
        (
            "virtiofsd",
            format!("{:?}", virtiofsd.display().to_string()),
        ),
        ("default_vcpus", "2".to_string()),
        ("default_memory_mib", "256".to_string()),
        ("log_level", "\"debug\"".to_string()),
    ];
    let set_by_extra = |key: &str| {
        extra
            .lines()
            .any(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
    };
    let mut text = String::new();
    for (key, value) in defaults.iter().filter(|(key, _)| !set_by_extra(key)) {
        text.push_str(&format!("{key} = {value}\n"));
    }
    text.push_str(extra);
    std::fs::write(&path, text).expect("writing the shim config");
    path
}

/// The shim's state directory of pod `pod_id` in containerd namespace
/// `namespace` (podbox_shim::sandbox::state_dir::StateDir).
pub fn pod_state_dir(namespace: &str, pod_id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(namespace).join(pod_id)
}

/// What of pod `pod_id` is still on the host: its state directory, mounts
/// under it, and processes naming it (podbox-vmm, virtiofsd).
pub fn pod_leftovers(namespace: &str, pod_id: &str) -> Vec<String> {
    let dir = pod_state_dir(namespace, pod_id);
    let mut left = Vec::new();
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    for mount in podbox_shim::hostfs::mounts_under(&dir) {
        left.push(format!("mount {}", mount.to_string_lossy()));
    }
    let needle = dir.display().to_string();
    for pid in processes_mentioning(&needle) {
        left.push(format!(
            "process {pid} ({})",
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
        ));
    }
    left
}

/// StopPodSandbox and RemovePodSandbox, then waits (60 s at most) for every
/// process naming the pod (shim, VMM, virtiofsd) to exit: the shim exits
/// after answering containerd's Shutdown, once its VM is down, and a
/// containerd stopped before then would leave it to be killed mid-cleanup.
pub fn remove_pod(cri: &mut CriClient, pod: &str) -> Result<(), String> {
    cri.stop_pod_sandbox(pod)
        .map_err(|e| format!("StopPodSandbox {pod}: {e}"))?;
    cri.remove_pod_sandbox(pod)
        .map_err(|e| format!("RemovePodSandbox {pod}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !processes_mentioning(pod).is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "processes of pod {pod} still running 60 s after RemovePodSandbox"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Pids whose command line contains `needle` in one of its arguments.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    crate::processes_with_arg(|arg| arg.contains(needle))
}

/// A `Name:  N kB` field of `/proc/<pid>/<file>` (`status`: VmRSS;
/// `smaps_rollup`: Pss), in KiB; None if the process or field is gone.
pub fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The bytes of guest RAM the host holds for podbox-vmm `pid`: the pages
/// allocated in its guest RAM memfd (`podbox-guest-ram`), which the guest
/// touched and has not given back through free page reporting. None if the
/// process has no such memfd (private guest memory) or is gone.
pub fn guest_ram_held(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:podbox-guest-ram"))
        })
        .and_then(|fd| std::fs::metadata(fd.path()).ok())
        .map(|m| m.blocks() * 512)
}

/// What is wrong with the confinement of process `pid`'s threads (podbox-vmm
/// confines itself before its guest runs: vmm/src/confine.rs and
/// vmm/src/jail.rs): each must have no effective or permitted capability,
/// `no_new_privs` and a seccomp filter, and be in mount and IPC namespaces
/// other than this process's, with a root where the host's files are not
/// (no /etc/passwd); a vCPU thread has one more filter than the others.
/// Empty when all of them are confined.
pub fn unconfined_threads(pid: u32) -> Vec<String> {
    let own_ns = |kind: &str| std::fs::read_link(format!("/proc/self/ns/{kind}")).ok();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![format!("process {pid} is gone")];
    };
    let mut problems = Vec::new();
    // (a vCPU thread?, its seccomp filters, its name)
    let mut filter_counts = Vec::new();
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        for (name, expected) in [
            ("CapEff:", "0000000000000000"),
            ("CapPrm:", "0000000000000000"),
            ("NoNewPrivs:", "1"),
            ("Seccomp:", "2"),
        ] {
            let value = field(name);
            if value != expected {
                problems.push(format!(
                    "thread {} ({}): {name} {value}, not {expected}",
                    task.file_name().to_string_lossy(),
                    comm.trim()
                ));
            }
        }
        let name = || {
            format!(
                "thread {} ({})",
                task.file_name().to_string_lossy(),
                comm.trim()
            )
        };
        for kind in ["mnt", "ipc"] {
            let ns = std::fs::read_link(task.path().join("ns").join(kind)).ok();
            if ns.is_none() || ns == own_ns(kind) {
                problems.push(format!("{}: {kind} namespace {ns:?}, the host's", name()));
            }
        }
        if task.path().join("root/etc/passwd").exists() {
            problems.push(format!("{}: the host's /etc/passwd is in its root", name()));
        }
        let filters: u32 = field("Seccomp_filters:").parse().unwrap_or(0);
        filter_counts.push((comm.trim().starts_with("vcpu"), filters, name()));
    }
    // vCPU threads stack a filter of their own on the process's.
    let process = filter_counts.iter().filter(|c| !c.0).map(|c| c.1).min();
    for (_, filters, name) in filter_counts.iter().filter(|c| c.0) {
        if process.is_none_or(|p| *filters <= p) {
            problems.push(format!(
                "{name}: {filters} seccomp filters, not more than the other threads' {process:?}"
            ));
        }
    }
    problems
}

/// One limit of `/proc/<pid>/limits` ("Max open files", ...): soft, hard.
pub fn proc_limit(pid: u32, name: &str) -> Option<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut values = line[name.len()..].split_whitespace();
    Some((values.next()?.to_string(), values.next()?.to_string()))
}

/// The pid of the pod's podbox-vmm, from the shim's pid file.
pub fn vmm_pid(namespace: &str, pod_id: &str) -> Option<u32> {
    std::fs::read_to_string(pod_state_dir(namespace, pod_id).join("vmm.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn proc_kib_reads_the_named_field_only() {
        let me = std::process::id();
        let rss = super::proc_kib(me, "status", "VmRSS").expect("VmRSS");
        let pss = super::proc_kib(me, "smaps_rollup", "Pss").expect("Pss");
        assert!(rss > 0 && pss > 0, "{rss} {pss}");
        // "Pss" must not match "Pss_Anon:"; an absent field is None.
        assert_eq!(super::proc_kib(me, "status", "Vm"), None);
        assert_eq!(super::proc_kib(me, "status", "NoSuchField"), None);
    }
}

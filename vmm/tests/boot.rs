//! Boots the real guest kernel from `guest-kernel/build.sh` in podbox-vmm on
//! this host's KVM. Each boot costs about a minute of emulated kernel work
//! on PVM hosts, so one boot checks as much as it can.

use std::path::PathBuf;

use podbox_tests::guest::{busybox, compile_static_c, guest_kernel, KernelVariant};
use podbox_tests::initramfs::Initramfs;
use podbox_tests::kvm_available;
use podbox_tests::vm::{run_vmm, BOOT_DEADLINE};
use podbox_vmm::config::{ProfileConfig, VmConfig};
use podbox_vmm::profiler::folded_path;

const VMM: &str = env!("CARGO_BIN_EXE_podbox-vmm");
const MARKER: &str = "PODBOX-BOOT-MARKER";

/// A busybox initramfs whose /init is `init_script`, plus extra files.
fn busybox_initramfs(
    dir: &std::path::Path,
    init_script: &str,
    extra: &[(&str, PathBuf)],
) -> PathBuf {
    let mut fs = Initramfs::new();
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        fs.dir(d);
    }
    fs.copy("bin/busybox", 0o755, &busybox()).unwrap();
    for applet in [
        "sh", "mount", "cat", "echo", "grep", "nproc", "reboot", "uname", "dd",
    ] {
        fs.symlink(&format!("bin/{applet}"), "busybox");
    }
    fs.file("init", 0o755, init_script.as_bytes());
    for (name, host) in extra {
        fs.copy(name, 0o755, host).unwrap();
    }
    let path = dir.join("initramfs.cpio");
    fs.write_to(&path).unwrap();
    path
}

fn line_value<'a>(serial: &'a str, key: &str) -> Option<&'a str> {
    serial
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
}

/// 4 KiB blocks `dd` reads from /dev/urandom under the profiler: on PVM
/// about a few seconds of emulated ChaCha20 in the guest kernel.
const URANDOM_BLOCKS: u32 = 64;

/// The boot runs under `--guest-profile`; besides the checks below it
/// checks the profiler: `dd` reading /dev/urandom spends its kernel time in
/// ChaCha20's block function, so that is dd's top kernel function in the
/// folded stacks, and the report names the boot's work and KVM's counts.
#[test]
fn boots_to_init_with_2_vcpus_and_256_mib_and_reboot_exits_0() {
    if !kvm_available("boots_to_init_with_2_vcpus_and_256_mib_and_reboot_exits_0") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let probe = compile_static_c(
        dir.path(),
        "syscall_probe",
        include_str!("guest/syscall_probe.c"),
    );
    let vector_probe = compile_static_c(
        dir.path(),
        "vector_state_probe",
        include_str!("guest/vector_state_probe.c"),
    );
    let init = format!(
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         echo {MARKER}\n\
         echo \"cpus=$(nproc)\"\n\
         grep MemTotal /proc/meminfo\n\
         /syscall_probe\n\
         /vector_state_probe\n\
         mount -t devtmpfs dev /dev\n\
         dd if=/dev/urandom of=/dev/null bs=4096 count={URANDOM_BLOCKS} 2>/dev/null\n\
         echo urandom-done\n\
         reboot -f\n"
    );
    let initrd = busybox_initramfs(
        dir.path(),
        &init,
        &[
            ("syscall_probe", probe),
            ("vector_state_probe", vector_probe),
        ],
    );
    let kernel = guest_kernel(KernelVariant::Podbox);
    let profile = dir.path().join("boot.profile");
    let run = run_vmm(
        VMM.as_ref(),
        dir.path(),
        VmConfig {
            initrd: Some(initrd),
            vcpus: 2,
            guest_profile: Some(ProfileConfig {
                path: profile.clone(),
                hz: 200,
            }),
            ..VmConfig::new(kernel)
        },
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert!(run.serial.contains(MARKER), "init marker missing\n{t}");
    assert!(
        run.serial.contains("urandom-done"),
        "dd did not finish\n{t}"
    );
    check_profile(&profile, &t);
    assert_eq!(
        run.status.code(),
        Some(0),
        "reboot -f must end the VMM with 0\n{t}"
    );
    assert_eq!(line_value(&run.serial, "cpus="), Some("2"), "{t}");
    let mem_kb: u64 = line_value(&run.serial, "MemTotal:")
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line\n{t}"));
    // 256 MiB minus what the kernel image and reservations take.
    assert!(
        (200 * 1024..256 * 1024).contains(&mem_kb),
        "MemTotal {mem_kb} kB\n{t}"
    );

    // The syscall-completion patch must grant nothing to a forged jump.
    let real =
        line_value(&run.serial, "probe real: ").unwrap_or_else(|| panic!("probe did not run\n{t}"));
    assert!(real.ends_with("iopl=0"), "{real}");
    let real_pid = real
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("pid=");
    let forged = line_value(&run.serial, "probe forged: ")
        .unwrap_or_else(|| panic!("no forged-jump result\n{t}"));
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        // The child completes a syscall (getpid of a forked child differs
        // from the parent's) and comes back with IOPL still 0.
        assert!(forged.starts_with("returned pid="), "{forged}\n{t}");
        assert!(
            forged.ends_with("iopl=0"),
            "forged R11 must not raise IOPL: {forged}"
        );
        assert_ne!(forged, format!("returned pid={real_pid} iopl=0"));
        assert!(run.stderr.contains("emulation fallback counts:"), "{t}");
    } else {
        // Without PVM the patch is off: the jump is a plain segfault.
        assert_eq!(forged, "signal=11", "{t}");
    }
    assert_eq!(
        line_value(&run.serial, "probe noncanonical: "),
        Some("signal=11"),
        "{t}"
    );

    // Each guest process keeps its own AVX / AVX-512 registers across task
    // switches (on PVM the guest kernel's XSAVE/XRSTOR run in the VMM's
    // fallback; with FXSAVE alone they leaked between processes).
    for set in ["avx", "avx512"] {
        let result = line_value(&run.serial, &format!("vector probe {set}: "))
            .unwrap_or_else(|| panic!("vector probe {set} did not report\n{t}"));
        assert!(
            result == "not supported" || result == "bad=0 of 2000",
            "{set} registers leaked between guest processes: {result}\n{t}"
        );
    }
    if pvm {
        let xsaves = run
            .stderr
            .split("xsave=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no xsave count in the fallback counts\n{t}"));
        assert!(xsaves > 0, "the guest kernel did not use XSAVE\n{t}");
    }
}

/// What `--guest-profile` wrote for the boot test's VM.
fn check_profile(profile: &std::path::Path, t: &str) {
    let report = std::fs::read_to_string(profile)
        .unwrap_or_else(|e| panic!("no profile at {}: {e}\n{t}", profile.display()));
    let folded = std::fs::read_to_string(folded_path(profile)).expect("folded stacks");
    let all = format!("{report}\n--- folded ---\n{folded}\n{t}");
    // dd's kernel samples by leaf function, from the folded stacks
    // `dd;[kernel];CALLER;...;FUNCTION COUNT`.
    let dd_stacks: Vec<(Vec<&str>, u64)> = folded
        .lines()
        .filter_map(|l| {
            let (stack, n) = l.rsplit_once(' ')?;
            let frames = stack.strip_prefix("dd;[kernel];")?;
            Some((frames.split(';').collect(), n.parse().ok()?))
        })
        .collect();
    let mut by_leaf: std::collections::HashMap<&str, u64> = Default::default();
    for (frames, n) in &dd_stacks {
        *by_leaf
            .entry(frames.last().copied().unwrap_or(""))
            .or_default() += n;
    }
    let mut dd: Vec<(u64, &str)> = by_leaf.into_iter().map(|(f, n)| (n, f)).collect();
    dd.sort_unstable_by(|a, b| b.cmp(a));
    let dd_total: u64 = dd.iter().map(|(n, _)| n).sum();
    assert!(dd_total >= 20, "too few samples of dd in the kernel\n{all}");
    assert_eq!(
        dd.first().map(|(_, f)| *f),
        Some("chacha_permute"),
        "dd's top kernel function must be ChaCha20's\n{all}"
    );
    // The guest kernel keeps frame pointers: ChaCha20 is reached from the
    // read(2) of /dev/urandom, and the stacks show it.
    assert!(
        dd_stacks
            .iter()
            .any(|(frames, _)| frames.last() == Some(&"chacha_permute")
                && frames.contains(&"vfs_read")),
        "no call chain from vfs_read to chacha_permute\n{all}"
    );
    assert!(report.contains("2 vCPU(s)"), "{all}");
    for section in ["top guest kernel functions", "processes", "KVM statistics"] {
        assert!(report.contains(section), "no {section:?} section\n{all}");
    }
    assert!(folded.lines().any(|l| l.starts_with("swapper/")), "{all}");
    assert!(t.contains("guest profile written to"), "{t}");
    assert!(t.contains("kvm stats vcpu1: exits="), "{t}");
}

#[test]
fn guest_panic_ends_the_vmm_with_a_nonzero_status_and_a_reason() {
    if !kvm_available("guest_panic_ends_the_vmm_with_a_nonzero_status_and_a_reason") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // init exits at once with status 3: the kernel panics ("Attempted to kill
    // init! exitcode=0x00000300"). The exit code in the panic line proves that
    // our init ran; text it echoed just before exiting is not checked, as the
    // panic can overtake the console's pending output.
    let initrd = busybox_initramfs(dir.path(), "#!/bin/sh\nexit 3\n", &[]);
    let kernel = guest_kernel(KernelVariant::Podbox);
    let run = run_vmm(
        VMM.as_ref(),
        dir.path(),
        VmConfig {
            initrd: Some(initrd),
            ..VmConfig::new(kernel)
        },
        BOOT_DEADLINE,
    );
    let t = run.transcript();
    assert_ne!(run.status.code(), Some(0), "{t}");
    let reason = run
        .stderr
        .lines()
        .find(|l| l.starts_with("podbox-vmm: "))
        .unwrap_or_else(|| panic!("no reason line\n{t}"));
    assert!(
        reason.contains("guest kernel panic") && reason.contains("Attempted to kill init"),
        "{reason}"
    );
    assert!(
        reason.contains("exitcode=0x00000300"),
        "init's exit status 3 must be in the reason: {reason}"
    );
}

#[test]
fn bad_flags_and_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-vmlinux");
    let out = std::process::Command::new(VMM)
        .args(VmConfig::new(&missing).to_args())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("opening kernel") && err.contains("no-such-vmlinux"),
        "{err}"
    );

    let zero_vcpus = VmConfig {
        vcpus: 0,
        ..VmConfig::new("/bin/sh")
    };
    let out = std::process::Command::new(VMM)
        .args(zero_vcpus.to_args())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus 0"));

    let out = std::process::Command::new(VMM)
        // Not a number at all, which no VmConfig can say: typed by hand.
        .args(["--kernel", "/bin/sh", "--memory-mib", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--memory-mib"));

    if kvm_available("bad_flags_and_files_get_clear_errors (kernel format)") {
        let not_elf = dir.path().join("bzImage");
        std::fs::write(&not_elf, vec![0x4d; 4096]).unwrap();
        let out = std::process::Command::new(VMM)
            .args(VmConfig::new(&not_elf).to_args())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("ELF vmlinux"));
    }
}

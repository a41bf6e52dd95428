//! Bad input is refused, naming what is wrong, and leaves nothing behind
//! (issue 13, part 4). One table, [`cases`], of malformed inputs to the
//! real components:
//!
//! - `Vmm`: podbox-vmm (the release binary) run with a bad flag or a bad
//!   kernel / initramfs file, each in a temp dir of its own: exit status
//!   not 0, stderr names the flag, no socket, file or process of it left;
//! - `Config`: a podbox config file given to the real shim through real
//!   containerd (`ctr run --runtime-config-path`): `ctr run` fails with the
//!   shim's `start` error naming the key;
//! - `Annotations`: `ctr run --annotation` on an image container;
//! - `Spec`: an OCI spec of our own (`ctr run --config`): hostname, root,
//!   process and mount fields, rootfs and volume paths escaping through
//!   `..` or symlinks, absurd resources;
//! - `Pod`: CRI RunPodSandbox with bad pod annotations, absurd limits, an
//!   oversize hostname, host networking;
//! - `Volume`: CRI CreateContainer + StartContainer in a running podbox pod
//!   with a volume that escapes into podbox's own state (the one VM boot of
//!   this file).
//!
//! Every refusal but the `Volume` ones happens before a guest boots: the
//! `start` action checks the config, the spec and the annotations. After
//! each case the harness looks for what it could have left (the pod's
//! state directory, mounts, shims and VMMs of this containerd, processes
//! in its cgroups), and at the end containerd's whole footprint.
//!
//! `cargo test -p podbox-tests --test bad_input` (release shim and VMM
//! built first). The VMM and containerd cases need /dev/kvm (SKIPPED
//! without it).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1::{LinuxContainerResources, Mount, NamespaceMode, NamespaceOption};
use podbox_tests::containerd::{
    processes_in_cgroup, Containerd, ContainerdOptions, CRI_NAMESPACE, PODBOX_HANDLER,
    PODBOX_RUNTIME, TEST_NAMESPACE,
};
use podbox_tests::cri::{container_config, CriClient};
use podbox_tests::guest::{guest_kernel, KernelVariant};
use podbox_tests::guest_image::agent_initramfs;
use podbox_tests::oci_image::BUSYBOX_IMAGE;
use podbox_tests::podbox::{
    bin_dir, pod_leftovers, processes_mentioning, virtiofsd, write_shim_config_with_initrd,
    STATE_ROOT, VMM_BINARY,
};
use podbox_tests::vm::VmSlot;

/// How long a refused case's processes may take to go (a shim whose Create
/// failed answers containerd's delete and shutdown first).
const SETTLE: Duration = Duration::from_secs(30);
/// A podbox-vmm that fails on its input does so at once; more is a hang.
const VMM_DEADLINE: Duration = Duration::from_secs(20);
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// A file a `Vmm` case puts in its temp dir before podbox-vmm runs.
#[derive(Debug, Clone, Copy)]
enum Fixture {
    /// Text that is no kernel or initramfs.
    Text(&'static str),
    /// `len` bytes of 0xa5: no format at all.
    Noise(&'static str, usize),
    /// The first `len` bytes of the real guest kernel.
    TruncatedKernel(&'static str, u64),
    /// A bzImage's header (`HdrS` at 0x202) and nothing of its payload.
    BzImage(&'static str),
    /// A host program: an x86-64 ELF that is no kernel.
    HostProgram(&'static str),
    Dir(&'static str),
    Fifo(&'static str),
    Empty(&'static str),
    /// A sparse file of `len` bytes that starts like a cpio archive.
    SparseCpio(&'static str, u64),
    /// The real initramfs, mode 000 (podbox-vmm drops its capabilities
    /// before it opens files, so root cannot read it either).
    Unreadable(&'static str),
}

/// What one case feeds to which component.
#[derive(Debug, Clone)]
enum Input {
    /// podbox-vmm's arguments; `{kernel}`, `{initrd}` (the real ones) and
    /// `{dir}` (the case's temp dir) are filled in.
    Vmm {
        args: &'static [&'static str],
        files: &'static [Fixture],
    },
    /// Lines added to (or replacing keys of) a good podbox config; `{dir}`
    /// is the test's temp dir.
    Config(&'static str),
    /// Annotations on an image container, with a config that allows every
    /// `io.podbox.*` annotation and lists `{dir}/assets` as asset_dirs.
    Annotations(&'static [(&'static str, &'static str)]),
    /// A change to a good OCI spec (`ctr run --config`).
    Spec(fn(&mut serde_json::Value, &Path)),
    /// A change to a good CRI pod config.
    Pod(fn(&mut k8s_cri::v1::PodSandboxConfig, &Path)),
    /// A volume of a CRI container: host path (`{dir}` filled in; made a
    /// symlink to `link_to` where that is given) and container path.
    Volume {
        host_path: &'static str,
        link_to: Option<&'static str>,
        container_path: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    input: Input,
    /// Substrings the error must hold: the field, flag, key or annotation,
    /// and where it helps what is wrong with it.
    expect: &'static [&'static str],
}

const fn case(name: &'static str, input: Input, expect: &'static [&'static str]) -> Case {
    Case {
        name,
        input,
        expect,
    }
}

const fn vmm(args: &'static [&'static str], files: &'static [Fixture]) -> Input {
    Input::Vmm { args, files }
}

/// The kernel and initrd flags every `Vmm` case starts from.
const BASE_VMM: [&str; 4] = ["--kernel", "{kernel}", "--initrd", "{initrd}"];

fn cases() -> Vec<Case> {
    use Fixture::*;
    vec![
        // --- podbox-vmm: sizes ---
        case("vcpus 0", vmm(&["--vcpus", "0"], &[]), &["--vcpus 0"]),
        case("vcpus 33", vmm(&["--vcpus", "33"], &[]), &["--vcpus 33"]),
        case(
            "vcpus 10000",
            vmm(&["--vcpus", "10000"], &[]),
            &["--vcpus", "10000"],
        ),
        case(
            "memory 0",
            vmm(&["--memory-mib", "0"], &[]),
            &["--memory-mib 0"],
        ),
        case(
            "memory above 1 TiB",
            vmm(&["--memory-mib", "2000000"], &[]),
            &["--memory-mib 2000000"],
        ),
        case(
            "memory past u32",
            vmm(&["--memory-mib", "99999999999"], &[]),
            &["--memory-mib", "99999999999"],
        ),
        // --- podbox-vmm: the kernel ---
        case(
            "missing kernel",
            vmm(&["--kernel", "{dir}/no-such-vmlinux"], &[]),
            &["kernel", "no-such-vmlinux", "No such file"],
        ),
        case(
            "non-ELF kernel",
            vmm(&["--kernel", "{dir}/vmlinux"], &[Text("vmlinux")]),
            &["--kernel", "not an ELF file"],
        ),
        case(
            "bzImage as kernel",
            vmm(&["--kernel", "{dir}/bzImage"], &[BzImage("bzImage")]),
            &["--kernel", "a bzImage", "uncompressed ELF vmlinux"],
        ),
        case(
            "kernel truncated in its segments",
            vmm(
                &["--kernel", "{dir}/vmlinux"],
                &[TruncatedKernel("vmlinux", 200_000)],
            ),
            &["--kernel", "truncated"],
        ),
        case(
            "kernel truncated in its header",
            vmm(
                &["--kernel", "{dir}/vmlinux"],
                &[TruncatedKernel("vmlinux", 40)],
            ),
            &["--kernel", "truncated"],
        ),
        case(
            "host program as kernel",
            vmm(&["--kernel", "{dir}/busybox"], &[HostProgram("busybox")]),
            &["--kernel", "not an ELF vmlinux"],
        ),
        case(
            "directory as kernel",
            vmm(&["--kernel", "{dir}/d"], &[Dir("d")]),
            &["--kernel", "a directory"],
        ),
        // --- podbox-vmm: the initramfs ---
        case(
            "corrupt initramfs",
            vmm(&["--initrd", "{dir}/initrd"], &[Noise("initrd", 8192)]),
            &["--initrd", "not an initramfs"],
        ),
        case(
            "empty initramfs",
            vmm(&["--initrd", "{dir}/initrd"], &[Empty("initrd")]),
            &["--initrd", "empty"],
        ),
        case(
            "directory as initramfs",
            vmm(&["--initrd", "{dir}/d"], &[Dir("d")]),
            &["--initrd", "a directory"],
        ),
        // A FIFO's open would block podbox-vmm until something wrote to it.
        case(
            "FIFO as initramfs",
            vmm(&["--initrd", "{dir}/fifo"], &[Fifo("fifo")]),
            &["--initrd", "a FIFO"],
        ),
        case(
            "unreadable initramfs",
            vmm(&["--initrd", "{dir}/initrd"], &[Unreadable("initrd")]),
            &["initrd", "Permission denied"],
        ),
        case(
            "initramfs larger than guest memory",
            vmm(
                &["--initrd", "{dir}/initrd", "--memory-mib", "128"],
                &[SparseCpio("initrd", 300 << 20)],
            ),
            &["--initrd", "314572800 bytes", "--memory-mib 128"],
        ),
        // Smaller than guest RAM, but not above the kernel: the loader
        // refuses it after the vsock socket is bound and virtiofsd
        // started, and both must be gone.
        case(
            "initramfs not fitting above the kernel",
            vmm(
                &[
                    "--initrd",
                    "{dir}/initrd",
                    "--memory-mib",
                    "128",
                    "--vsock-socket",
                    "{dir}/vsock.sock",
                    "--shared-dir",
                    "{dir}/share",
                    "--fs-socket",
                    "{dir}/fs.sock",
                ],
                &[SparseCpio("initrd", 120 << 20), Dir("share")],
            ),
            &["initramfs", "does not fit", "more memory"],
        ),
        // --- podbox-vmm: devices and the rest ---
        case(
            "net without key=value",
            vmm(&["--net", "garbage"], &[]),
            &["--net", "key=value"],
        ),
        case(
            "net with a bad MAC",
            vmm(&["--net", "tap=pbx-bad0,mac=zz"], &[]),
            &["--net", "mac \"zz\""],
        ),
        case(
            "net on stdio's fd",
            vmm(&["--net", "fd=1,mac=02:00:00:00:00:01"], &[]),
            &["--net", "fd \"1\""],
        ),
        case(
            "vsock CID 2",
            vmm(
                &["--vsock-socket", "{dir}/vsock.sock", "--vsock-cid", "2"],
                &[],
            ),
            &["--vsock-cid 2"],
        ),
        case(
            "vsock socket in a missing directory",
            vmm(&["--vsock-socket", "{dir}/absent/vsock.sock"], &[]),
            &["vsock socket", "absent/vsock.sock"],
        ),
        case(
            "fs tag of 40 bytes",
            vmm(
                &[
                    "--shared-dir",
                    "{dir}/share",
                    "--fs-tag",
                    "0123456789012345678901234567890123456789",
                ],
                &[Dir("share")],
            ),
            &["--fs-tag"],
        ),
        case(
            "missing shared dir",
            vmm(&["--shared-dir", "{dir}/absent"], &[]),
            &["shared directory", "absent"],
        ),
        case(
            "missing virtiofsd",
            vmm(
                &[
                    "--shared-dir",
                    "{dir}/share",
                    "--fs-socket",
                    "{dir}/fs.sock",
                    "--virtiofsd",
                    "{dir}/no-virtiofsd",
                ],
                &[Dir("share")],
            ),
            &["virtiofsd", "no-virtiofsd"],
        ),
        case(
            "seccomp mode bogus",
            vmm(&["--seccomp", "bogus"], &[]),
            &["--seccomp", "bogus"],
        ),
        case(
            "cmdline with a newline",
            vmm(&["--cmdline", "quiet\ninit=/evil"], &[]),
            &["--cmdline"],
        ),
        case(
            "serial size 1 byte",
            vmm(
                &["--serial", "{dir}/console.log", "--serial-max-bytes", "1"],
                &[],
            ),
            &["--serial-max-bytes 1"],
        ),
        case(
            "guest profile at 0 Hz",
            vmm(&["--guest-profile", "{dir}/profile,hz=0"], &[]),
            &["--guest-profile", "hz"],
        ),
        // --- the podbox config file ---
        case(
            "config: misspelt key",
            Input::Config("default_cpus = 2"),
            &["default_cpus"],
        ),
        case(
            "config: default_vcpus 0",
            Input::Config("default_vcpus = 0"),
            &["`default_vcpus`", "0 is not in 1..=32"],
        ),
        case(
            "config: default_vcpus 10000",
            Input::Config("default_vcpus = 10000"),
            &["`default_vcpus`", "10000"],
        ),
        case(
            "config: default_memory_mib 0",
            Input::Config("default_memory_mib = 0"),
            &["`default_memory_mib`"],
        ),
        case(
            "config: max_memory_mib past u32",
            Input::Config("max_memory_mib = 99999999999"),
            &["max_memory_mib"],
        ),
        case(
            "config: default_vcpus a string",
            Input::Config("default_vcpus = \"two\""),
            &["default_vcpus"],
        ),
        case(
            "config: missing kernel",
            Input::Config("kernel = \"{dir}/no-such-vmlinux\""),
            &["`kernel`", "no-such-vmlinux", "No such file"],
        ),
        case(
            "config: relative kernel",
            Input::Config("kernel = \"vmlinux\""),
            &["`kernel`", "not an absolute path"],
        ),
        case(
            "config: non-ELF kernel",
            Input::Config("kernel = \"{dir}/assets/notes.txt\""),
            &["`kernel`", "not an ELF file"],
        ),
        case(
            "config: oversize kernel path",
            Input::Config("kernel = \"{dir}/{long}\""),
            &["`kernel`", "File name too long"],
        ),
        case(
            "config: corrupt initrd",
            Input::Config("initrd = \"{dir}/assets/noise.bin\""),
            &["`initrd`", "not an initramfs"],
        ),
        case(
            "config: directory as initrd",
            Input::Config("initrd = \"{dir}/assets\""),
            &["`initrd`", "a directory"],
        ),
        case(
            "config: log_level loud",
            Input::Config("log_level = \"loud\""),
            &["`log_level`"],
        ),
        case(
            "config: fs_cache sometimes",
            Input::Config("fs_cache = \"sometimes\""),
            &["fs_cache"],
        ),
        case(
            "config: unknown allowed annotation",
            Input::Config("allowed_annotations = [\"io.podbox.cpus\"]"),
            &["`allowed_annotations`", "io.podbox.cpus"],
        ),
        case(
            "config: log_max_bytes 0",
            Input::Config("log_max_bytes = 0"),
            &["`log_max_bytes`"],
        ),
        // --- annotations ---
        case(
            "annotation: vcpus not a number",
            Input::Annotations(&[("io.podbox.vcpus", "lots")]),
            &["io.podbox.vcpus", "not a whole number"],
        ),
        case(
            "annotation: vcpus 0",
            Input::Annotations(&[("io.podbox.vcpus", "0")]),
            &["io.podbox.vcpus", "not in 1..=32"],
        ),
        case(
            "annotation: vcpus 10000",
            Input::Annotations(&[("io.podbox.vcpus", "10000")]),
            &["io.podbox.vcpus", "not in 1..=32"],
        ),
        case(
            "annotation: memory past u32",
            Input::Annotations(&[("io.podbox.memory_mib", "99999999999999")]),
            &["io.podbox.memory_mib", "not a whole number"],
        ),
        case(
            "annotation: oversize memory value",
            Input::Annotations(&[("io.podbox.memory_mib", "{huge}")]),
            &["io.podbox.memory_mib"],
        ),
        case(
            "annotation: unknown io.podbox key",
            Input::Annotations(&[("io.podbox.cpus", "2")]),
            &["io.podbox.cpus", "not a podbox annotation"],
        ),
        case(
            "annotation: kernel outside the asset dirs",
            Input::Annotations(&[("io.podbox.kernel", "/etc/passwd")]),
            &["io.podbox.kernel", "asset_dirs"],
        ),
        case(
            "annotation: kernel escaping the asset dir by ..",
            Input::Annotations(&[("io.podbox.kernel", "{dir}/assets/../../../../../etc/passwd")]),
            &["io.podbox.kernel", "asset_dirs"],
        ),
        case(
            "annotation: initrd escaping the asset dir by a symlink",
            Input::Annotations(&[("io.podbox.initrd", "{dir}/assets/escape")]),
            &["io.podbox.initrd", "asset_dirs"],
        ),
        case(
            "annotation: non-ELF kernel in the asset dir",
            Input::Annotations(&[("io.podbox.kernel", "{dir}/assets/notes.txt")]),
            &["io.podbox.kernel", "not an ELF file"],
        ),
        case(
            "annotation: corrupt initrd in the asset dir",
            Input::Annotations(&[("io.podbox.initrd", "{dir}/assets/noise.bin")]),
            &["io.podbox.initrd", "not an initramfs"],
        ),
        case(
            "annotation: CRI sandbox memory not a number",
            Input::Annotations(&[("io.kubernetes.cri.sandbox-memory", "lots")]),
            &["io.kubernetes.cri.sandbox-memory", "not a whole number"],
        ),
        case(
            "annotation: CRI sandbox memory absurd",
            Input::Annotations(&[("io.kubernetes.cri.sandbox-memory", "9223372036854775807")]),
            &["max_memory_mib", "io.kubernetes.cri.sandbox-*"],
        ),
        case(
            "annotation: CRI container type vm",
            Input::Annotations(&[("io.kubernetes.cri.container-type", "vm")]),
            &[
                "io.kubernetes.cri.container-type",
                "\"sandbox\" or \"container\"",
            ],
        ),
        case(
            "annotation: CRI container without its sandbox id",
            Input::Annotations(&[("io.kubernetes.cri.container-type", "container")]),
            &["io.kubernetes.cri.sandbox-id"],
        ),
        // --- OCI spec fields (ctr run --config) ---
        case(
            "spec: hostname of 300 bytes",
            Input::Spec(|spec, _| spec["hostname"] = "h".repeat(300).into()),
            &["hostname", "300 bytes"],
        ),
        case(
            "spec: rootfs escaping the bundle by ..",
            Input::Spec(|spec, _| spec["root"]["path"] = "rootfs/../../../..".into()),
            &["root.path rootfs/../../../..", "`..`"],
        ),
        case(
            "spec: rootfs elsewhere on the host",
            Input::Spec(|spec, _| spec["root"]["path"] = "/".into()),
            &["root.path /", "bundle's own rootfs"],
        ),
        case(
            "spec: no process args",
            Input::Spec(|spec, _| spec["process"]["args"] = serde_json::json!([])),
            &["process.args"],
        ),
        case(
            "spec: relative cwd",
            Input::Spec(|spec, _| spec["process"]["cwd"] = "tmp".into()),
            &["process.cwd tmp", "absolute"],
        ),
        case(
            "spec: relative mount destination",
            Input::Spec(|spec, _| add_mount(spec, "tmpfs", "tmpfs", "data")),
            &["mounts[", "].destination data", "absolute"],
        ),
        case(
            "spec: mount destination with ..",
            Input::Spec(|spec, _| add_mount(spec, "tmpfs", "tmpfs", "/a/../../etc")),
            &["].destination /a/../../etc", "`..`"],
        ),
        case(
            "spec: volume with a relative source escaping by ..",
            Input::Spec(|spec, _| add_mount(spec, "bind", "../../../../etc", "/data")),
            &["].source ../../../../etc", "not an absolute path"],
        ),
        case(
            "spec: volume source with ..",
            Input::Spec(|spec, dir| {
                let source = format!("{}/assets/../../../run/podbox", dir.display());
                add_mount(spec, "bind", &source, "/data")
            }),
            &["].source", "`..` component"],
        ),
        case(
            "spec: missing volume source",
            Input::Spec(|spec, dir| {
                let source = format!("{}/no-such-volume", dir.display());
                add_mount(spec, "bind", &source, "/data")
            }),
            &["].source", "no-such-volume", "cannot be resolved"],
        ),
        case(
            "spec: volume of podbox's state",
            Input::Spec(|spec, _| add_mount(spec, "bind", STATE_ROOT, "/data")),
            &["].source /run/podbox", "podbox's own state"],
        ),
        case(
            "spec: volume escaping into podbox's state by a symlink",
            Input::Spec(|spec, dir| {
                let source = format!("{}/to-state", dir.display());
                add_mount(spec, "bind", &source, "/data")
            }),
            &[
                "].source",
                "to-state",
                "resolves to /run/podbox",
                "podbox's own state",
            ],
        ),
        case(
            "spec: absurd memory limit",
            Input::Spec(|spec, _| {
                spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": 1i64 << 60}});
            }),
            &["max_memory_mib", "linux.resources"],
        ),
        case(
            "spec: absurd CPU quota",
            Input::Spec(|spec, _| {
                spec["linux"]["resources"] =
                    serde_json::json!({"cpu": {"quota": 1i64 << 50, "period": 100000}});
            }),
            &["max_vcpus", "linux.resources"],
        ),
        // --- CRI pods ---
        case(
            "pod: vcpus annotation not a number",
            Input::Pod(|pod, _| {
                pod.annotations
                    .insert("io.podbox.vcpus".into(), "lots".into());
            }),
            &["io.podbox.vcpus", "not a whole number"],
        ),
        case(
            "pod: unknown io.podbox annotation",
            Input::Pod(|pod, _| {
                pod.annotations.insert("io.podbox.nope".into(), "1".into());
            }),
            &["io.podbox.nope"],
        ),
        case(
            "pod: absurd memory limit",
            Input::Pod(|pod, _| {
                pod.linux.as_mut().expect("linux").resources = Some(LinuxContainerResources {
                    memory_limit_in_bytes: 1 << 50,
                    ..Default::default()
                });
            }),
            &["max_memory_mib", "io.kubernetes.cri.sandbox-*"],
        ),
        case(
            "pod: absurd CPU quota",
            Input::Pod(|pod, _| {
                pod.linux.as_mut().expect("linux").resources = Some(LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 100_000 * 100_000,
                    ..Default::default()
                });
            }),
            &["max_vcpus", "io.kubernetes.cri.sandbox-*"],
        ),
        case(
            "pod: hostname of 300 bytes",
            Input::Pod(|pod, _| pod.hostname = "h".repeat(300)),
            &["hostname", "300 bytes"],
        ),
        case(
            "pod: host network",
            Input::Pod(|pod, _| {
                let linux = pod.linux.as_mut().expect("linux");
                let mut security = linux.security_context.clone().unwrap_or_default();
                security.namespace_options = Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                });
                linux.security_context = Some(security);
            }),
            &["network namespace"],
        ),
        // --- CRI volumes of a running podbox pod (one VM) ---
        case(
            "volume: a symlink into podbox's state",
            Input::Volume {
                host_path: "{dir}/volume-link",
                link_to: Some("/run/podbox"),
                container_path: "/data",
            },
            &["].source /run/podbox", "podbox's own state"],
        ),
        case(
            "volume: a .. path into podbox's state",
            Input::Volume {
                host_path: "{dir}/assets/../../../../../../run/podbox",
                link_to: None,
                container_path: "/data",
            },
            // containerd passes the path as given (it resolves symlinks,
            // not `..`).
            &["].source", "/../run/podbox", "`..` component"],
        ),
        case(
            "volume: container path with ..",
            Input::Volume {
                host_path: "{dir}/assets",
                link_to: None,
                container_path: "/data/../../etc",
            },
            &["].destination", "`..`"],
        ),
    ]
}

fn add_mount(spec: &mut serde_json::Value, kind: &str, source: &str, destination: &str) {
    let options = if kind == "bind" {
        serde_json::json!(["rbind", "ro"])
    } else {
        serde_json::json!(["nosuid"])
    };
    spec["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(serde_json::json!({
            "destination": destination, "type": kind, "source": source, "options": options
        }));
}

/// The error must hold every expected substring. Shown either way, so a
/// run lists what each bad input got.
fn assert_names(case: &Case, error: &str) {
    // One line, from a little before the first expected part on.
    let flat = error.split_whitespace().collect::<Vec<_>>().join(" ");
    let at = case
        .expect
        .iter()
        .filter_map(|e| flat.find(e))
        .min()
        .unwrap_or(0);
    let from = flat[..at]
        .char_indices()
        .rev()
        .nth(80)
        .map_or(0, |(i, _)| i);
    let shown: String = flat[from..].chars().take(320).collect();
    eprintln!("  {}: {}", case.name, shown.trim());
    for expected in case.expect {
        assert!(
            error.contains(expected),
            "case {:?}: the error does not name {expected:?}:\n{error}",
            case.name
        );
    }
}

fn fill(text: &str, dir: &Path) -> String {
    text.replace("{dir}", &dir.display().to_string())
        .replace(
            "{kernel}",
            &guest_kernel(KernelVariant::Podbox).display().to_string(),
        )
        .replace("{initrd}", &agent_initramfs().display().to_string())
        .replace("{long}", &"k".repeat(5000))
        .replace("{huge}", &"9".repeat(64 << 10))
}

fn make_fixture(fixture: Fixture, dir: &Path) {
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("fixture");
    match fixture {
        Fixture::Text(name) => write(name, b"this is not a kernel\n"),
        Fixture::Noise(name, len) => write(name, &vec![0xa5; len]),
        Fixture::TruncatedKernel(name, len) => {
            let kernel = std::fs::read(guest_kernel(KernelVariant::Podbox)).expect("kernel");
            write(name, &kernel[..len as usize]);
        }
        Fixture::BzImage(name) => {
            let mut image = vec![0u8; 64 << 10];
            image[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
            image[0x202..0x206].copy_from_slice(b"HdrS");
            write(name, &image);
        }
        Fixture::HostProgram(name) => {
            std::fs::copy(podbox_tests::guest::busybox(), dir.join(name)).expect("copy");
        }
        Fixture::Dir(name) => std::fs::create_dir(dir.join(name)).expect("mkdir"),
        Fixture::Fifo(name) => {
            let status = Command::new("mkfifo").arg(dir.join(name)).status();
            assert!(status.is_ok_and(|s| s.success()), "mkfifo");
        }
        Fixture::Empty(name) => write(name, b""),
        Fixture::SparseCpio(name, len) => {
            write(name, b"070701");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join(name))
                .expect("open");
            file.set_len(len).expect("set_len");
        }
        Fixture::Unreadable(name) => {
            std::fs::copy(agent_initramfs(), dir.join(name)).expect("copy");
            std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o000))
                .expect("chmod");
        }
    }
}

/// Every path under `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in std::fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    paths
}

#[test]
fn podbox_vmm_refuses_bad_flags_and_files() {
    let test = "podbox_vmm_refuses_bad_flags_and_files";
    if !podbox_tests::kvm_available(test) {
        return;
    }
    let vmm = bin_dir().join(VMM_BINARY);
    let mut count = 0;
    for case in cases() {
        let Input::Vmm { args, files } = &case.input else {
            continue;
        };
        count += 1;
        let dir = tempfile::tempdir().expect("temp dir");
        for fixture in *files {
            make_fixture(*fixture, dir.path());
        }
        let before = tree(dir.path());
        // The real kernel and initrd unless the case gives its own (clap
        // takes each flag once).
        let base = BASE_VMM
            .chunks(2)
            .filter(|flag| !args.contains(&flag[0]))
            .flatten();
        let argv: Vec<String> = base
            .chain(args.iter())
            .map(|a| fill(a, dir.path()))
            .collect();
        let mut child = Command::new(&vmm)
            .args(&argv)
            .env("TMPDIR", dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting podbox-vmm");
        let started = Instant::now();
        while child.try_wait().expect("try_wait").is_none() {
            if started.elapsed() > VMM_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "case {:?}: podbox-vmm still ran after {VMM_DEADLINE:?} ({argv:?})",
                    case.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().expect("podbox-vmm's output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.status.code().is_some(),
            "case {:?}: podbox-vmm exited {:?}:\n{stderr}",
            case.name,
            out.status
        );
        assert_names(&case, &stderr);
        assert_eq!(
            tree(dir.path()),
            before,
            "case {:?}: podbox-vmm left files in its directory",
            case.name
        );
        let dir_name = dir.path().display().to_string();
        assert_eq!(
            processes_mentioning(&dir_name),
            Vec::<u32>::new(),
            "case {:?}: processes (virtiofsd?) left naming {dir_name}",
            case.name
        );
    }
    eprintln!("{test}: {count} cases refused");
    assert!(count >= 25, "{count} podbox-vmm cases");
}

/// The fixtures of the containerd cases, under one temp dir: an asset dir
/// with a text file, noise and a symlink out of it, and a symlink into
/// podbox's state dir.
fn containerd_fixtures(dir: &Path) {
    let assets = dir.join("assets");
    std::fs::create_dir(&assets).expect("mkdir");
    std::fs::write(assets.join("notes.txt"), "not a kernel\n").expect("write");
    std::fs::write(assets.join("noise.bin"), vec![0xa5u8; 8192]).expect("write");
    std::os::unix::fs::symlink("/etc/passwd", assets.join("escape")).expect("symlink");
    std::fs::create_dir_all(STATE_ROOT).expect("/run/podbox");
    std::os::unix::fs::symlink(STATE_ROOT, dir.join("to-state")).expect("symlink");
}

/// The config every annotation case runs with: every `io.podbox.*`
/// annotation allowed, the fixtures' asset dir listed.
fn permissive_config(dir: &Path) -> String {
    format!(
        "allowed_annotations = [\"io.podbox.vcpus\", \"io.podbox.memory_mib\", \
         \"io.podbox.kernel\", \"io.podbox.initrd\"]\nasset_dirs = [{:?}]\n",
        dir.join("assets").display().to_string()
    )
}

/// What a refused case may have left of podbox on the host: the state of
/// the container or pod (`id`, where it has one), shims and VMMs of this
/// containerd, processes in its cgroups, and state directories of the CRI
/// namespace that appeared and have no process (a live one is another
/// test's pod). Waits up to [`SETTLE`] for it to go.
fn leftovers(
    containerd: &Containerd,
    namespace: &str,
    id: Option<&str>,
    state_before: &[String],
) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut left = Vec::new();
        if let Some(id) = id {
            left.extend(pod_leftovers(namespace, id));
        }
        let socket = containerd.grpc_socket().display().to_string();
        for pid in processes_mentioning(&socket) {
            left.push(format!("process {pid} of this containerd"));
        }
        for pid in processes_in_cgroup(containerd.cgroup_parent()) {
            left.push(format!("process {pid} in this containerd's cgroups"));
        }
        for dir in state_dirs(namespace) {
            if !state_before.contains(&dir) && processes_mentioning(&dir).is_empty() {
                left.push(format!("state directory {namespace}/{dir}"));
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pod addresses host-local IPAM holds in this containerd's CNI
/// network (one file per address, named by it).
fn allocated_pod_ips(containerd: &Containerd) -> Vec<String> {
    let ipam = containerd.footprint().dir.join("cni/ipam");
    let mut ips: Vec<String> = tree(&ipam)
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|name| name.parse::<std::net::IpAddr>().is_ok())
        .collect();
    ips.sort();
    ips
}

/// Names of the pod state directories of `namespace` under /run/podbox.
fn state_dirs(namespace: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(Path::new(STATE_ROOT).join(namespace))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `args` with the value after `--runtime-config-path` replaced (the
/// harness adds the guard's own config there).
fn with_config(mut args: Vec<String>, config: &Path) -> Vec<String> {
    match args.iter().position(|a| a == "--runtime-config-path") {
        Some(at) => args[at + 1] = config.display().to_string(),
        None => {
            let at = args
                .iter()
                .position(|a| a == PODBOX_RUNTIME)
                .expect("runtime")
                + 1;
            args.splice(
                at..at,
                [
                    "--runtime-config-path".to_string(),
                    config.display().to_string(),
                ],
            );
        }
    }
    args
}

/// A good OCI spec for `ctr run --config`: busybox-like process, the
/// bundle's rootfs, its own network namespace and a cgroup under the
/// guard's parent.
fn good_spec(containerd: &Containerd, id: &str) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "env": ["PATH=/bin"]},
        "root": {"path": "rootfs"},
        "hostname": "bad-input",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}],
            "cgroupsPath": format!("{}/{id}", containerd.cgroup_parent()),
        },
    })
}

/// Runs one `ctr run` case; its error (ctr's stderr), or panics if it ran.
fn ctr_case(containerd: &Containerd, case: &Case, dir: &Path, good_config: &Path) -> String {
    let case_dir = dir.join(format!(
        "case-{}",
        case.name.replace([' ', ':', '/', '.'], "_")
    ));
    std::fs::create_dir_all(&case_dir).expect("case dir");
    let (id, args) = match &case.input {
        Input::Config(extra) => {
            let config = write_case_config(dir, &case_dir, &fill(extra, dir));
            let (id, args) = containerd.ctr_run_args(PODBOX_RUNTIME, BUSYBOX_IMAGE, &["true"]);
            (id, with_config(args, &config))
        }
        Input::Annotations(annotations) => {
            let config = write_case_config(dir, &case_dir, &permissive_config(dir));
            let annotations: Vec<(String, String)> = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), fill(v, dir)))
                .collect();
            let pairs: Vec<(&str, &str)> = annotations
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let (id, args) =
                containerd.ctr_run_args_annotated(PODBOX_RUNTIME, BUSYBOX_IMAGE, &["true"], &pairs);
            (id, with_config(args, &config))
        }
        Input::Spec(change) => {
            let id = containerd.unique_name("spec");
            let mut spec = good_spec(containerd, &id);
            change(&mut spec, dir);
            let spec_path = case_dir.join("config.json");
            std::fs::write(&spec_path, spec.to_string()).expect("spec");
            let args = vec![
                "run".to_string(),
                "--rm".into(),
                "--runtime".into(),
                PODBOX_RUNTIME.into(),
                "--runtime-config-path".into(),
                good_config.display().to_string(),
                "--fifo-dir".into(),
                containerd.fifo_dir().display().to_string(),
                "--config".into(),
                spec_path.display().to_string(),
                id.clone(),
            ];
            (id, args)
        }
        other => unreachable!("not a ctr case: {other:?}"),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = containerd
        .ctr_command(TEST_NAMESPACE, &args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running ctr");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "case {:?}: ctr run succeeded: {}{stderr}",
        case.name,
        String::from_utf8_lossy(&out.stdout)
    );
    let left = leftovers(containerd, TEST_NAMESPACE, Some(&id), &[]);
    assert_eq!(
        left,
        Vec::<String>::new(),
        "case {:?} left things",
        case.name
    );
    let listed = containerd
        .ctr_ok(TEST_NAMESPACE, &["containers", "ls", "-q"])
        .expect("ctr containers ls");
    assert!(
        !listed.lines().any(|l| l.trim() == id),
        "case {:?}: container {id} still listed",
        case.name
    );
    stderr
}

/// A good podbox config (the harness's, for the test guest) with `extra`
/// lines, in `case_dir`.
fn write_case_config(_dir: &Path, case_dir: &Path, extra: &str) -> PathBuf {
    let virtiofsd = virtiofsd().expect("no virtiofsd: scripts/deps.sh (make test) installs it");
    write_shim_config_with_initrd(case_dir, &virtiofsd, &agent_initramfs(), extra)
}

/// Config, annotation, spec and CRI pod cases through one real
/// containerd, none booting a guest; then the volume cases in one podbox
/// pod (one VM).
#[test]
fn shim_refuses_bad_configs_annotations_specs_and_pods() {
    let test = "shim_refuses_bad_configs_annotations_specs_and_pods";
    if !podbox_tests::kvm_available(test) {
        return;
    }
    let started = Instant::now();
    let bin_dir = bin_dir();
    let dir = tempfile::tempdir().expect("temp dir");
    containerd_fixtures(dir.path());
    let good_config = write_case_config(dir.path(), dir.path(), &permissive_config(dir.path()));
    let containerd = Containerd::start_with(ContainerdOptions {
        shim_dirs: vec![bin_dir],
        podbox_config: Some(good_config.clone()),
    })
    .unwrap_or_else(|e| panic!("starting the test containerd: {e}"));

    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for case in cases() {
        let kind = match &case.input {
            Input::Config(_) => "config",
            Input::Annotations(_) => "annotations",
            Input::Spec(_) => "spec",
            _ => continue,
        };
        let error = ctr_case(&containerd, &case, dir.path(), &good_config);
        assert_names(&case, &error);
        *counts.entry(kind).or_default() += 1;
    }

    let mut cri = containerd.cri().expect("CRI client");
    for case in cases() {
        let Input::Pod(change) = &case.input else {
            continue;
        };
        let state_before = state_dirs(CRI_NAMESPACE);
        let mut pod = containerd.pod_config("bad").expect("pod config");
        change(&mut pod, dir.path());
        let error = cri
            .run_pod_sandbox(&pod, PODBOX_HANDLER)
            .map(|id| format!("RunPodSandbox succeeded: pod {id}"))
            .unwrap_or_else(|e| e.to_string());
        assert!(
            !error.starts_with("RunPodSandbox succeeded"),
            "case {:?}: {error}",
            case.name
        );
        assert_names(&case, &error);
        assert_eq!(
            cri.list_pod_sandboxes().expect("ListPodSandbox").len(),
            0,
            "case {:?}: the refused pod is listed",
            case.name
        );
        let left = leftovers(&containerd, CRI_NAMESPACE, None, &state_before);
        assert_eq!(
            left,
            Vec::<String>::new(),
            "case {:?} left things",
            case.name
        );
        // CNI ran before the shim refused the pod: its address must be
        // given back (a pod netns left behind would keep it).
        assert_eq!(
            allocated_pod_ips(&containerd),
            Vec::<String>::new(),
            "case {:?}: CNI addresses still allocated",
            case.name
        );
        *counts.entry("pod").or_default() += 1;
    }
    eprintln!(
        "{test}: refused before any boot: {counts:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let volumes = volume_cases_in_one_pod(&containerd, &mut cri, dir.path());
    counts.insert("volume", volumes);
    let total: usize = counts.values().sum();
    eprintln!(
        "{test}: {total} cases {counts:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(total >= 40, "{total} containerd cases");
    let footprint = containerd.footprint();
    drop(containerd);
    assert_eq!(
        footprint.leftovers(),
        Vec::<String>::new(),
        "containerd left things behind"
    );
}

/// The `Volume` cases: CRI containers of one running podbox pod whose
/// volume would give the guest podbox's own state. Each StartContainer is
/// refused naming the mount; nothing of the container is left in the
/// pod's share, and the pod still runs a good container afterwards.
fn volume_cases_in_one_pod(containerd: &Containerd, cri: &mut CriClient, dir: &Path) -> usize {
    let _slot = VmSlot::acquire();
    let config = containerd.pod_config("volumes").expect("pod config");
    let pod = cri
        .run_pod_sandbox(&config, PODBOX_HANDLER)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    // The control for the pod cases' IPAM check: a pod that runs holds
    // its address there.
    assert_eq!(
        allocated_pod_ips(containerd).len(),
        1,
        "the running pod's CNI address"
    );
    let share = Path::new(STATE_ROOT)
        .join(CRI_NAMESPACE)
        .join(&pod)
        .join("share");
    let mut count = 0;
    for case in cases() {
        let Input::Volume {
            host_path,
            link_to,
            container_path,
        } = &case.input
        else {
            continue;
        };
        let host_path = fill(host_path, dir);
        if let Some(target) = link_to {
            let _ = std::fs::remove_file(&host_path);
            std::os::unix::fs::symlink(target, &host_path).expect("symlink");
        }
        let mut container = container_config("bad-volume", BUSYBOX_IMAGE, &["sleep", "1000"]);
        container.mounts = vec![Mount {
            host_path: host_path.clone(),
            container_path: container_path.to_string(),
            readonly: true,
            ..Default::default()
        }];
        let error = match cri.create_container(&pod, &container, &config) {
            // Refused by containerd itself: fine if it names the field.
            Err(e) => e.to_string(),
            Ok(id) => {
                let error = cri
                    .start_container(&id)
                    .map(|()| format!("StartContainer succeeded: {id}"))
                    .unwrap_or_else(|e| e.to_string());
                assert!(
                    !error.starts_with("StartContainer succeeded"),
                    "case {:?}: {error}",
                    case.name
                );
                assert!(
                    !share.join(&id).exists(),
                    "case {:?}: {} left in the pod's share",
                    case.name,
                    share.join(&id).display()
                );
                cri.remove_container(&id)
                    .unwrap_or_else(|e| panic!("case {:?}: RemoveContainer: {e}", case.name));
                error
            }
        };
        assert_names(&case, &error);
        count += 1;
    }
    // The pod took no harm: a good container runs in it.
    let good = cri
        .create_container(
            &pod,
            &container_config("good", BUSYBOX_IMAGE, &["sleep", "1000"]),
            &config,
        )
        .unwrap_or_else(|e| panic!("CreateContainer good: {e}"));
    cri.start_container(&good)
        .unwrap_or_else(|e| panic!("StartContainer good: {e}"));
    let out = cri
        .exec_sync(&good, &["echo", "still fine"], EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("ExecSync: {e}"));
    assert_eq!(out.stdout.trim(), "still fine", "{out:?}");
    podbox_tests::podbox::remove_pod(cri, &pod).expect("removing the pod");
    assert_eq!(pod_leftovers(CRI_NAMESPACE, &pod), Vec::<String>::new());
    assert_eq!(allocated_pod_ips(containerd), Vec::<String>::new());
    count
}

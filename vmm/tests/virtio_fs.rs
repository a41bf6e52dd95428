//! virtio-fs end to end: one VM boots the production guest image (the
//! agent as PID 1) with a vsock for the agent and a virtio-fs share served
//! by a virtiofsd that podbox-vmm starts; every check runs against that one
//! VM, because each boot costs about a minute of emulated kernel work on
//! PVM hosts. `cargo test -- virtio_fs` selects these tests.

use std::path::Path;
use std::time::Duration;

use podbox_agent_client::{ctx, AgentClient, ReadyListener};
use podbox_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest, ReadStreamRequest,
    StartContainerRequest, Storage, WaitProcessRequest,
};
use podbox_tests::guest::{busybox, guest_kernel, KernelVariant};
use podbox_tests::guest_image::agent_initramfs;
use podbox_tests::kvm_available;
use podbox_tests::vm::{run_vmm, spawn_vmm, RunningVm, BOOT_DEADLINE};
use podbox_vmm::config::{CachePolicy, FsBackend, FsConfig, VirtiofsdSpec, VmConfig, VsockConfig};
use podbox_vmm::virtiofsd::{find_virtiofsd, pid_file};

const VMM: &str = env!("CARGO_BIN_EXE_podbox-vmm");
/// Per call: container setup is guest-kernel work, which PVM hosts emulate;
/// on a loaded 2-core host one CreateContainer took over a minute.
const RPC: Duration = Duration::from_secs(300);
const TAG: &str = "podboxfs";
/// Where the agent mounts the share in the guest.
const GUEST_SHARE: &str = "/run/podbox/shared";

/// A busybox root filesystem under `dir`.
fn make_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(busybox(), dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "echo", "sleep"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
}

/// An OCI runtime spec (the shape containerd writes) running `args`.
fn spec(args: &[&str]) -> Vec<u8> {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"ociVersion":"1.0.2",
        "process":{{"user":{{"uid":0,"gid":0}},"args":[{}],"env":["PATH=/bin"],"cwd":"/",
            "capabilities":{{"bounding":["CAP_KILL"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]}},"noNewPrivileges":true}},
        "root":{{"path":"rootfs"}},
        "mounts":[{{"destination":"/proc","type":"proc","source":"proc","options":["nosuid","noexec","nodev"]}},
                  {{"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755"]}}],
        "linux":{{"namespaces":[{{"type":"pid"}},{{"type":"mount"}},{{"type":"ipc"}},{{"type":"uts"}}]}}}}"#,
        args.join(",")
    )
    .into_bytes()
}

/// Creates and starts a container on the share's rootfs, reads its stdout
/// to EOF and returns (stdout, exit status).
fn run_container(vm: &RunningVm, agent: &AgentClient, id: &str, args: &[&str]) -> (String, i32) {
    let create = CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec(args),
        rootfs: format!("{GUEST_SHARE}/rootfs"),
        ..Default::default()
    };
    agent
        .agent
        .create_container(ctx(RPC), &create)
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}\n{}", vm.transcript()));
    let start = StartContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    agent
        .agent
        .start_container(ctx(RPC), &start)
        .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}\n{}", vm.transcript()));
    let mut out = Vec::new();
    loop {
        let req = ReadStreamRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let data = agent
            .agent
            .read_stdout(ctx(RPC), &req)
            .unwrap_or_else(|e| panic!("ReadStdout {id}: {e:?}\n{}", vm.transcript()))
            .data;
        if data.is_empty() {
            break;
        }
        out.extend(data);
    }
    let wait = WaitProcessRequest {
        container_id: id.into(),
        ..Default::default()
    };
    let status = agent
        .agent
        .wait_process(ctx(RPC), &wait)
        .unwrap_or_else(|e| panic!("WaitProcess {id}: {e:?}\n{}", vm.transcript()))
        .status;
    (String::from_utf8_lossy(&out).into_owned(), status)
}

fn process_exists(pid: i32) -> bool {
    // A zombie still has /proc/<pid>; its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn virtio_fs_share_in_a_booted_vm_rootfs_exec_both_ways_and_teardown() {
    let test = "virtio_fs_share_in_a_booted_vm_rootfs_exec_both_ways_and_teardown";
    if !kvm_available(test) {
        return;
    }
    let virtiofsd =
        find_virtiofsd().expect("no virtiofsd: scripts/deps.sh (make test) installs it");
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let rootfs = share.join("rootfs");
    make_rootfs(&rootfs);
    std::fs::write(rootfs.join("from-host.txt"), "written by the host\n").unwrap();
    let kernel = guest_kernel(KernelVariant::Podbox);
    let initrd = agent_initramfs();
    let vsock = dir.path().join("vsock.sock");
    let fs_socket = dir.path().join("fs.sock");
    let mut ready = ReadyListener::bind(&vsock).unwrap();
    let vm = spawn_vmm(
        VMM.as_ref(),
        dir.path(),
        VmConfig {
            initrd: Some(initrd),
            vcpus: 2,
            vsock: Some(VsockConfig {
                cid: 3,
                socket: vsock.clone(),
            }),
            fs: Some(FsConfig {
                tag: TAG.into(),
                backend: FsBackend::Spawn(VirtiofsdSpec {
                    binary: Some(virtiofsd.clone()),
                    socket: Some(fs_socket.clone()),
                    cache: CachePolicy::Always,
                    ..VirtiofsdSpec::new(&share)
                }),
            }),
            ..VmConfig::new(kernel)
        },
    );

    // 1. The agent answers; the pod's storage mounts the share by tag.
    let agent = vm
        .agent(&vsock, &mut ready)
        .unwrap_or_else(|e| panic!("agent unreachable: {e}\n{}", vm.transcript()));
    eprintln!(
        "agent answered {:.1} s after VMM start (virtio-fs configured)",
        vm.started().elapsed().as_secs_f64()
    );
    let virtiofsd_pid: i32 = vm
        .transcript()
        .split("virtiofsd (pid ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("VMM did not log virtiofsd's pid\n{}", vm.transcript()));
    assert!(process_exists(virtiofsd_pid));
    let storage = Storage {
        driver: "virtiofs".into(),
        source: TAG.into(),
        mount_point: GUEST_SHARE.into(),
        ..Default::default()
    };
    let sandbox = CreateSandboxRequest {
        sandbox_id: "fs-pod".into(),
        storages: vec![storage],
        ..Default::default()
    };
    agent
        .agent
        .create_sandbox(ctx(RPC), &sandbox)
        .unwrap_or_else(|e| panic!("CreateSandbox: {e:?}\n{}", vm.transcript()));

    // 2. Containers whose rootfs is on the share: output and exit codes
    //    reach the host, and /proc/version is the guest kernel's.
    let (version, status) = run_container(&vm, &agent, "version", &["cat", "/proc/version"]);
    assert_eq!(status, 0, "cat /proc/version: {version}");
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(version.starts_with("Linux version "), "{version}");
    assert!(
        !version.contains(host_release.trim()),
        "guest shows the host kernel: {version}"
    );
    let (hello, status) = run_container(&vm, &agent, "hello", &["echo", "hello"]);
    assert_eq!((hello.as_str(), status), ("hello\n", 0));

    // 3. Host -> guest and guest -> host through the share, and a non-zero
    //    exit code. One program per container, so that each one's exit
    //    status is seen (a crashed `cat` inside `sh -c` would not be).
    let (seen, status) = run_container(&vm, &agent, "from-host", &["cat", "/from-host.txt"]);
    assert_eq!((seen.as_str(), status), ("written by the host\n", 0));
    let (_, status) = run_container(
        &vm,
        &agent,
        "to-host",
        &[
            "sh",
            "-c",
            "echo written by the guest > /from-guest.txt; exit 3",
        ],
    );
    assert_eq!(status, 3);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("from-guest.txt")).unwrap(),
        "written by the guest\n"
    );

    // 4. DestroySandbox ends the VM: status 0, virtiofsd gone, sockets removed.
    agent
        .agent
        .destroy_sandbox(ctx(RPC), &DestroySandboxRequest::default())
        .unwrap();
    let run = vm.wait(BOOT_DEADLINE);
    let t = run.transcript();
    assert_eq!(
        run.status.code(),
        Some(0),
        "VMM must exit 0 after DestroySandbox\n{t}"
    );
    assert!(
        !process_exists(virtiofsd_pid),
        "virtiofsd {virtiofsd_pid} outlived the VM"
    );
    assert!(
        !fs_socket.exists() && !pid_file(&fs_socket).exists(),
        "virtiofsd socket left behind"
    );
    assert!(!vsock.exists(), "vsock socket left behind");
    assert!(!t.contains("panicked"), "{t}");
}

#[test]
fn virtio_fs_virtiofsd_failures_are_reported_not_hung_on() {
    if !kvm_available("virtio_fs_virtiofsd_failures_are_reported_not_hung_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No boot happens: every case fails before the kernel is loaded; the
    // kernel is the real one because podbox-vmm checks it first.
    let kernel = guest_kernel(KernelVariant::Podbox);
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let dying = dir.path().join("dying-virtiofsd");
    std::fs::write(&dying, "#!/bin/sh\necho 'cannot serve today' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&dying, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cases: [(&str, &Path, &str); 3] = [
        (
            "missing shared dir",
            &dir.path().join("nope"),
            "shared directory",
        ),
        ("virtiofsd exits at once", &share, "cannot serve today"),
        (
            "no such virtiofsd",
            &share,
            "starting /nonexistent/virtiofsd",
        ),
    ];
    for (what, shared, expect) in cases {
        let binary = if what == "no such virtiofsd" {
            Path::new("/nonexistent/virtiofsd")
        } else {
            dying.as_path()
        };
        let run = run_vmm(
            VMM.as_ref(),
            dir.path(),
            VmConfig {
                fs: Some(FsConfig {
                    tag: "podbox".into(),
                    backend: FsBackend::Spawn(VirtiofsdSpec {
                        binary: Some(binary.to_path_buf()),
                        socket: Some(dir.path().join("fs.sock")),
                        ..VirtiofsdSpec::new(shared)
                    }),
                }),
                ..VmConfig::new(&kernel)
            },
            Duration::from_secs(60),
        );
        assert_eq!(run.status.code(), Some(1), "{what}: {}", run.transcript());
        assert!(
            run.stderr.contains("error: virtio-fs") && run.stderr.contains(expect),
            "{what}: {}",
            run.transcript()
        );
        // The VMM's own run time: waiting for a VM slot does not count.
        assert!(
            run.wall < Duration::from_secs(15),
            "{what}: took {:?}",
            run.wall
        );
    }
}

//! podbox under a real containerd 1.6 (issue 5). Each guest boot costs about
//! a minute of CPU on PVM hosts, so each test boots ONE VM and runs every
//! check it can in it:
//!
//! - `podbox_ctr_run_exec_and_kill_in_one_vm`: `ctr run --runtime
//!   io.containerd.podbox.v2` (guest kernel release, stdin to stdout, stderr),
//!   `ctr task exec` (exit codes, stdin, boot id), `ctr task kill`, and
//!   nothing left behind.
//! - `podbox_cri_pod_beside_runc_then_vmm_killed`: a two-container CRI pod
//!   with handler podbox next to the same pod under runc (one VM, shared
//!   localhost, separate root filesystems); then the pod's VMM is killed:
//!   every task exits non-zero and the pod's host state is gone.
//!
//! `cargo test -p podbox-tests --test containerd_podbox` runs them alone.
//! Without /dev/kvm they print SKIPPED and pass; a missing virtiofsd fails.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use podbox_tests::containerd::{
    Containerd, ContainerdOptions, CRI_NAMESPACE, PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER,
    TEST_NAMESPACE,
};
use podbox_tests::cri::container_config;
use podbox_tests::host_kernel_release;
use podbox_tests::oci_image::BUSYBOX_IMAGE;
use podbox_tests::output::{collect, text, wait_until};
use podbox_tests::podbox::{
    bin_dir, pod_leftovers, processes_mentioning, virtiofsd, vmm_pid, write_shim_config,
};
use podbox_tests::vm::VmSlot;

/// From `ctr run` to a running task: one guest boot, on a loaded machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(900);
const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("host boot id")
        .trim()
        .to_string()
}

/// A containerd with the podbox shim, or None (and a SKIPPED line) where
/// /dev/kvm is absent. A missing virtiofsd fails the test: the README's
/// test command installs it.
fn podbox_containerd(test: &str, dir: &std::path::Path) -> Option<(VmSlot, Containerd)> {
    if !podbox_tests::kvm_available(test) {
        return None;
    }
    // Looked up before the slot is taken: a missing binary fails the test
    // without keeping another test's guest waiting for nothing.
    let bin_dir = bin_dir();
    // The shim boots the guest: the test holds a VM slot meanwhile, so no
    // more guests run at once than the host has cores for.
    let slot = VmSlot::acquire();
    let virtiofsd = virtiofsd().expect("no virtiofsd: scripts/deps.sh (make test) installs it");
    let config = write_shim_config(dir, &virtiofsd);
    let options = ContainerdOptions {
        shim_dirs: vec![bin_dir],
        podbox_config: Some(config),
    };
    Some((
        slot,
        Containerd::start_with(options)
            .unwrap_or_else(|e| panic!("starting the test containerd: {e}")),
    ))
}

/// Stops the harness's containerd and asserts that neither it nor the pod
/// `pod` left anything on the host.
fn assert_nothing_left(containerd: Containerd, namespace: &str, pod: &str) {
    let footprint = containerd.footprint();
    drop(containerd);
    assert_eq!(
        footprint.leftovers(),
        Vec::<String>::new(),
        "containerd left things behind"
    );
    assert_eq!(pod_leftovers(namespace, pod), Vec::<String>::new());
}

#[test]
fn podbox_ctr_run_exec_and_kill_in_one_vm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, containerd)) =
        podbox_containerd("podbox_ctr_run_exec_and_kill_in_one_vm", dir.path())
    else {
        return;
    };
    let script = "uname -r; head -n 1; echo to-stderr >&2; exec sleep 1000";
    let (id, args) = containerd.ctr_run_args(PODBOX_RUNTIME, BUSYBOX_IMAGE, &["sh", "-c", script]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut run = containerd
        .ctr_command(TEST_NAMESPACE, &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ctr run");
    let stdout = collect(run.stdout.take().expect("stdout"));
    let stderr = collect(run.stderr.take().expect("stderr"));
    {
        let mut stdin = run.stdin.take().expect("stdin");
        stdin
            .write_all(b"hello through stdin\n")
            .expect("writing ctr's stdin");
        // Dropping it closes ctr's stdin: EOF travels to the guest.
    }
    wait_until(
        "the guest kernel release and the stdin line on stdout",
        BOOT_DEADLINE,
        || {
            if let Ok(Some(status)) = run.try_wait() {
                panic!(
                    "ctr run exited early ({status}); stdout {:?}, stderr {:?}",
                    text(&stdout),
                    text(&stderr)
                );
            }
            text(&stdout).lines().count() >= 2
        },
    );
    eprintln!(
        "podbox: ctr run to first output (boot included): {:?}",
        started.elapsed()
    );
    let out = text(&stdout);
    let mut lines = out.lines();
    let guest_release = lines.next().unwrap_or_default().to_string();
    assert!(
        !guest_release.is_empty() && guest_release != host_kernel_release(),
        "guest kernel {guest_release:?} vs host {:?}",
        host_kernel_release()
    );
    assert_eq!(
        lines.next(),
        Some("hello through stdin"),
        "stdin reaches the container's stdout"
    );
    wait_until("stderr", Duration::from_secs(60), || {
        text(&stderr).contains("to-stderr")
    });

    // Execs in the same VM: exit codes, stdin, the guest's boot id.
    for (command, expected) in [
        (vec!["sh", "-c", "exit 7"], 7),
        (vec!["true"], 0),
        (vec!["false"], 1),
    ] {
        let exec_id = containerd.unique_name("exec");
        let mut exec_args = vec!["task", "exec", "--exec-id", &exec_id, &id];
        exec_args.extend(command.iter());
        let output = containerd
            .ctr(TEST_NAMESPACE, &exec_args)
            .expect("ctr task exec");
        assert_eq!(
            output.status.code(),
            Some(expected),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let exec_id = containerd.unique_name("exec");
    let mut cat = containerd
        .ctr_command(
            TEST_NAMESPACE,
            &["task", "exec", "--exec-id", &exec_id, &id, "cat"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task exec cat");
    let input: String = (0..5000).map(|i| format!("exec line {i}\n")).collect();
    cat.stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("writing exec stdin");
    let cat = cat.wait_with_output().expect("ctr task exec cat");
    assert!(
        cat.status.success(),
        "exec cat: {}",
        String::from_utf8_lossy(&cat.stderr)
    );
    assert!(
        String::from_utf8_lossy(&cat.stdout) == input,
        "exec stdin comes back whole ({} of {} bytes)",
        cat.stdout.len(),
        input.len()
    );
    let exec_id = containerd.unique_name("exec");
    let boot_id = containerd
        .ctr_ok(
            TEST_NAMESPACE,
            &[
                "task",
                "exec",
                "--exec-id",
                &exec_id,
                &id,
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ],
        )
        .expect("exec boot_id");
    assert_ne!(
        boot_id.trim(),
        host_boot_id(),
        "the container runs on another kernel"
    );

    let vmm = vmm_pid(TEST_NAMESPACE, &id).expect("the pod's vmm.pid");
    let tasks = containerd
        .ctr_ok(TEST_NAMESPACE, &["task", "ls"])
        .expect("ctr task ls");
    assert!(
        tasks
            .lines()
            .any(|l| l.contains(&id) && l.contains("RUNNING")),
        "task listed as running: {tasks}"
    );

    containerd
        .ctr_ok(
            TEST_NAMESPACE,
            &["task", "kill", "--signal", "SIGKILL", &id],
        )
        .expect("ctr task kill");
    let deadline = Instant::now() + EXEC_TIMEOUT;
    let status = loop {
        if let Some(status) = run.try_wait().expect("waiting for ctr run") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ctr run still running after kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        status.code(),
        Some(137),
        "killed with SIGKILL: 128 + 9; stderr {}",
        text(&stderr)
    );

    // ctr run --rm deleted the container: the VM, the shim and the pod state go.
    wait_until(
        "the pod's host state to go",
        Duration::from_secs(60),
        || {
            pod_leftovers(TEST_NAMESPACE, &id).is_empty()
                && !std::path::Path::new(&format!("/proc/{vmm}")).exists()
        },
    );
    assert_nothing_left(containerd, TEST_NAMESPACE, &id);
}

/// One pod with two containers: `web` serves a file it wrote to its own
/// /tmp on localhost:8080, `client` sleeps. Returns (pod id, sandbox config, web id, client id).
fn two_container_pod(
    containerd: &Containerd,
    handler: &str,
) -> (
    String,
    k8s_cri::v1::PodSandboxConfig,
    String,
    String,
    Duration,
) {
    let mut cri = containerd.cri().expect("CRI client");
    let config = containerd
        .pod_config(&format!("pod-{handler}"))
        .expect("pod config");
    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(&config, handler)
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"));
    let web = cri
        .create_container(
            &pod,
            &container_config(
                "web",
                BUSYBOX_IMAGE,
                &[
                    "sh",
                    "-c",
                    "echo pod-a > /tmp/a; exec httpd -f -p 8080 -h /tmp",
                ],
            ),
            &config,
        )
        .expect("CreateContainer web");
    cri.start_container(&web).expect("StartContainer web");
    let ready = started.elapsed();
    let client = cri
        .create_container(
            &pod,
            &container_config("client", BUSYBOX_IMAGE, &["sleep", "1000"]),
            &config,
        )
        .expect("CreateContainer client");
    cri.start_container(&client).expect("StartContainer client");
    (pod, config, web, client, ready)
}

#[test]
fn podbox_cri_pod_beside_runc_then_vmm_killed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, containerd)) =
        podbox_containerd("podbox_cri_pod_beside_runc_then_vmm_killed", dir.path())
    else {
        return;
    };
    let mut cri = containerd.cri().expect("CRI client");
    let mut boot_ids = Vec::new();
    let mut pods = Vec::new();
    for handler in [RUNC_HANDLER, PODBOX_HANDLER] {
        let (pod, _config, web, client, ready) = two_container_pod(&containerd, handler);
        eprintln!("{handler}: pod ready (RunPodSandbox + first container started): {ready:?}");
        let exec = |cri: &mut podbox_tests::cri::CriClient, id: &str, command: &[&str]| {
            cri.exec_sync(id, command, EXEC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{handler}: ExecSync {command:?}: {e}"))
        };
        let web_boot = exec(&mut cri, &web, &["cat", "/proc/sys/kernel/random/boot_id"])
            .stdout
            .trim()
            .to_string();
        let client_boot = exec(
            &mut cri,
            &client,
            &["cat", "/proc/sys/kernel/random/boot_id"],
        )
        .stdout
        .trim()
        .to_string();
        assert_eq!(
            web_boot, client_boot,
            "{handler}: both containers run on one kernel"
        );
        boot_ids.push(web_boot.clone());
        let release = exec(&mut cri, &client, &["uname", "-r"])
            .stdout
            .trim()
            .to_string();
        if handler == PODBOX_HANDLER {
            assert_ne!(
                web_boot,
                host_boot_id(),
                "podbox: the pod has its own kernel"
            );
            assert_ne!(
                release,
                host_kernel_release(),
                "podbox: guest kernel release"
            );
        } else {
            assert_eq!(web_boot, host_boot_id(), "runc shares the host kernel");
        }
        // Shared localhost: the client reaches web's server on 127.0.0.1.
        let fetched = (0..50)
            .map(|_| {
                let out = exec(
                    &mut cri,
                    &client,
                    &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/a"],
                );
                if out.exit_code != 0 {
                    std::thread::sleep(Duration::from_millis(200));
                }
                out
            })
            .find(|out| out.exit_code == 0)
            .unwrap_or_else(|| panic!("{handler}: client never reached web on localhost"));
        assert_eq!(
            fetched.stdout.trim(),
            "pod-a",
            "{handler}: shared localhost"
        );
        // Separate root filesystems: web's /tmp/a is not in client's /tmp.
        assert_eq!(
            exec(&mut cri, &client, &["test", "-e", "/tmp/a"]).exit_code,
            1,
            "{handler}: separate rootfs"
        );
        assert_eq!(
            exec(&mut cri, &web, &["test", "-e", "/tmp/a"]).exit_code,
            0,
            "{handler}: web sees its own file"
        );
        pods.push((handler, pod, web, client));
    }
    assert_ne!(
        boot_ids[0], boot_ids[1],
        "the podbox pod is not on the runc pod's kernel"
    );

    // Failure: kill the podbox pod's VMM. Every task of the pod exits non-zero,
    // and the shim takes the pod's host state down.
    let (_, pod, web, client) = pods.pop().expect("the podbox pod");
    let vmm = vmm_pid(CRI_NAMESPACE, &pod).expect("the pod's vmm.pid");
    // SAFETY: kill(2) on the pid the shim recorded for this pod's VMM.
    unsafe { libc::kill(vmm as libc::pid_t, libc::SIGKILL) };
    for container in [&web, &client] {
        wait_until(
            "the container to exit after its VM died",
            Duration::from_secs(120),
            || {
                cri.container_status(container)
                    .map(|s| s.state == k8s_cri::v1::ContainerState::ContainerExited as i32)
                    .unwrap_or(false)
            },
        );
        let status = cri.container_status(container).expect("ContainerStatus");
        assert_ne!(status.exit_code, 0, "a task of a dead VM exits non-zero");
    }
    wait_until(
        "the pod's host state to go after the VMM died",
        Duration::from_secs(60),
        || pod_leftovers(CRI_NAMESPACE, &pod).is_empty(),
    );
    for (_, pod, _, _) in pods.iter().map(|p| (p.0, p.1.clone(), (), ())).chain([(
        PODBOX_HANDLER,
        pod.clone(),
        (),
        (),
    )]) {
        cri.stop_pod_sandbox(&pod).expect("StopPodSandbox");
        cri.remove_pod_sandbox(&pod).expect("RemovePodSandbox");
    }
    wait_until("the podbox shim to exit", Duration::from_secs(60), || {
        processes_mentioning(&pod).is_empty()
    });
    assert_nothing_left(containerd, CRI_NAMESPACE, &pod);
}

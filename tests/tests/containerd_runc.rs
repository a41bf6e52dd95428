//! containerd with runc, through the test harness: the runc side of the
//! podbox-vs-runc tests (issue 5), and proof that the harness itself works
//! and cleans up. Each test has its own private containerd.

use std::process::Stdio;
use std::time::{Duration, Instant};

use podbox_tests::containerd::{Containerd, RUNC_HANDLER, RUNC_RUNTIME, TEST_NAMESPACE};
use podbox_tests::cri::{container_config, CriClient};
use podbox_tests::host_kernel_release;
use podbox_tests::oci_image::BUSYBOX_IMAGE;

const EXEC_TIMEOUT: Duration = Duration::from_secs(10);

fn containerd() -> Containerd {
    Containerd::start().unwrap_or_else(|e| panic!("starting the test containerd: {e}"))
}

#[test]
fn ctr_run_with_runc_shows_the_host_kernel_release() {
    let containerd = containerd();
    let mut timings = Vec::new();
    for _ in 0..5 {
        let run = containerd
            .run_busybox_with_runc(&["uname", "-r"], b"")
            .expect("ctr run");
        assert!(
            run.status.success(),
            "ctr run uname failed ({}): {}",
            run.status,
            run.stderr
        );
        assert_eq!(
            run.stdout.trim(),
            host_kernel_release(),
            "runc shares the host kernel"
        );
        timings.push(run.elapsed);
    }
    timings.sort();
    eprintln!(
        "runc: ctr run --rm uname -r start-to-exit: min {:?}, median {:?}, max {:?}",
        timings[0],
        timings[timings.len() / 2],
        timings[timings.len() - 1]
    );
}

#[test]
fn ctr_run_with_runc_copies_stdin_to_stdout_without_loss() {
    let containerd = containerd();
    // Larger than a pipe buffer, so FIFOs must be drained up to the task's exit.
    let input: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    let run = containerd
        .run_busybox_with_runc(&["cat"], input.as_bytes())
        .expect("ctr run");
    assert!(
        run.status.success(),
        "ctr run cat failed ({}): {}",
        run.status,
        run.stderr
    );
    assert_eq!(
        run.stdout.len(),
        input.len(),
        "every byte of stdin comes back on stdout"
    );
    assert!(run.stdout == input, "stdout differs from stdin");
}

#[test]
fn ctr_run_with_runc_returns_the_task_exit_code() {
    let containerd = containerd();
    for (command, expected) in [
        (vec!["true"], 0),
        (vec!["sh", "-c", "exit 3"], 3),
        (vec!["false"], 1),
        (vec!["sh", "-c", "exit 255"], 255),
    ] {
        let run = containerd
            .run_busybox_with_runc(&command, b"")
            .expect("ctr run");
        assert_eq!(
            run.status.code(),
            Some(expected),
            "{command:?} exit code; stderr: {}",
            run.stderr
        );
    }
    let stderr_run = containerd
        .run_busybox_with_runc(&["sh", "-c", "echo to-stderr >&2"], b"")
        .expect("ctr run");
    assert_eq!(
        stderr_run.stderr.trim(),
        "to-stderr",
        "the task's stderr reaches ctr's stderr"
    );
    assert_eq!(stderr_run.stdout, "", "nothing on stdout");
}

#[test]
fn ctr_task_exec_and_kill_with_runc() {
    let containerd = containerd();
    let (container_id, args) =
        containerd.ctr_run_args(RUNC_RUNTIME, BUSYBOX_IMAGE, &["sleep", "1000"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = containerd
        .ctr_command(TEST_NAMESPACE, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ctr run");

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = containerd
            .ctr_ok(TEST_NAMESPACE, &["tasks", "ls"])
            .expect("ctr tasks ls");
        if tasks
            .lines()
            .any(|line| line.starts_with(&container_id) && line.contains("RUNNING"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "task {container_id} not RUNNING in time: {tasks}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let fifo_dir = containerd.fifo_dir().display().to_string();
    let exec = containerd
        .ctr(
            TEST_NAMESPACE,
            &[
                "tasks",
                "exec",
                "--exec-id",
                "probe",
                "--fifo-dir",
                &fifo_dir,
                &container_id,
                "sh",
                "-c",
                "echo exec-ok; exit 4",
            ],
        )
        .expect("ctr tasks exec");
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout).trim(),
        "exec-ok",
        "exec stdout"
    );
    assert_eq!(
        exec.status.code(),
        Some(4),
        "exec exit code; stderr: {}",
        String::from_utf8_lossy(&exec.stderr)
    );

    containerd
        .ctr_ok(
            TEST_NAMESPACE,
            &["tasks", "kill", "--signal", "SIGKILL", &container_id],
        )
        .expect("ctr tasks kill");
    let output = run.wait_with_output().expect("waiting for ctr run");
    assert_eq!(
        output.status.code(),
        Some(137),
        "the killed task's status; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let containers = containerd
        .ctr_ok(TEST_NAMESPACE, &["containers", "ls", "-q"])
        .expect("ctr containers ls");
    assert!(
        !containers.lines().any(|c| c == container_id),
        "ctr run --rm removed {container_id}: {containers}"
    );
}

/// Polls `command` in a container until it exits 0; returns its output.
fn exec_until_success(cri: &mut CriClient, container_id: &str, command: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = cri
            .exec_sync(container_id, command, EXEC_TIMEOUT)
            .expect("ExecSync");
        if output.exit_code == 0 {
            return output.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{command:?} in {container_id} kept failing: {output:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cri_pod_with_runc_shares_localhost_and_keeps_root_filesystems_apart() {
    let containerd = containerd();
    let mut cri = containerd.cri().expect("CRI client");
    assert!(
        cri.list_image_tags()
            .expect("ListImages")
            .iter()
            .any(|tag| tag == BUSYBOX_IMAGE),
        "the busybox image is visible to CRI"
    );

    let pod_config = containerd.pod_config("pod").expect("pod config");
    let started = Instant::now();
    let pod_id = cri
        .run_pod_sandbox(&pod_config, RUNC_HANDLER)
        .expect("RunPodSandbox");
    let pod_ready = started.elapsed();
    let netns = cri
        .pod_netns_path(&pod_id)
        .expect("PodSandboxStatus")
        .expect("the pod has a network namespace");
    assert!(
        netns.exists(),
        "{} exists while the pod runs",
        netns.display()
    );

    // The server takes one connection, keeps what it got, then idles.
    let server_config = container_config(
        "server",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "nc -l -p 7777 > /tmp/received; exec sleep 2147483647",
        ],
    );
    let client_config = container_config("client", BUSYBOX_IMAGE, &["sleep", "2147483647"]);
    let started = Instant::now();
    let server = cri
        .create_container(&pod_id, &server_config, &pod_config)
        .expect("CreateContainer server");
    cri.start_container(&server).expect("StartContainer server");
    let first_container_running = started.elapsed();
    let client = cri
        .create_container(&pod_id, &client_config, &pod_config)
        .expect("CreateContainer client");
    cri.start_container(&client).expect("StartContainer client");
    eprintln!("runc: CRI RunPodSandbox (pod ready) {pod_ready:?}; first container created+started {first_container_running:?}");

    let listed: Vec<String> = cri
        .list_containers()
        .expect("ListContainers")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert!(
        listed.contains(&server) && listed.contains(&client),
        "both containers listed: {listed:?}"
    );

    // Shared localhost: the client reaches the server on 127.0.0.1.
    exec_until_success(
        &mut cri,
        &client,
        &["sh", "-c", "echo hello-over-localhost | nc 127.0.0.1 7777"],
    );
    let received = exec_until_success(
        &mut cri,
        &server,
        &["sh", "-c", "test -s /tmp/received && cat /tmp/received"],
    );
    assert_eq!(
        received.trim(),
        "hello-over-localhost",
        "the server got the client's bytes over the pod's localhost"
    );

    // Separate root filesystems.
    let write = cri
        .exec_sync(
            &server,
            &["sh", "-c", "echo mine > /only-in-server"],
            EXEC_TIMEOUT,
        )
        .expect("ExecSync");
    assert_eq!(write.exit_code, 0, "writing in the server: {write:?}");
    let in_server = cri
        .exec_sync(&server, &["test", "-e", "/only-in-server"], EXEC_TIMEOUT)
        .expect("ExecSync");
    let in_client = cri
        .exec_sync(&client, &["test", "-e", "/only-in-server"], EXEC_TIMEOUT)
        .expect("ExecSync");
    assert_eq!(
        in_server.exit_code, 0,
        "the file exists where it was written"
    );
    assert_eq!(
        in_client.exit_code, 1,
        "the file is absent from the other container's root"
    );

    // ExecSync reports exit codes and both streams.
    let exec = cri
        .exec_sync(
            &client,
            &["sh", "-c", "echo out; echo err >&2; exit 7"],
            EXEC_TIMEOUT,
        )
        .expect("ExecSync");
    assert_eq!(
        (exec.exit_code, exec.stdout.as_str(), exec.stderr.as_str()),
        (7, "out\n", "err\n")
    );

    // Same kernel as the host under runc.
    let release = cri
        .exec_sync(&client, &["uname", "-r"], EXEC_TIMEOUT)
        .expect("ExecSync");
    assert_eq!(release.stdout.trim(), host_kernel_release());

    cri.stop_pod_sandbox(&pod_id).expect("StopPodSandbox");
    assert!(
        !netns.exists(),
        "StopPodSandbox removed the netns {}",
        netns.display()
    );
    cri.remove_pod_sandbox(&pod_id).expect("RemovePodSandbox");
    assert!(
        cri.list_pod_sandboxes().expect("ListPodSandbox").is_empty(),
        "no pod left"
    );
    assert!(
        cri.list_containers().expect("ListContainers").is_empty(),
        "no container left"
    );
}

#[test]
fn dropping_the_harness_leaves_nothing_behind() {
    let containerd = containerd();
    // Leave running work behind on purpose: a CRI pod with a container, and
    // a detached ctr task; the guard must clean up after both.
    let mut cri = containerd.cri().expect("CRI client");
    let pod_config = containerd.pod_config("pod").expect("pod config");
    let pod_id = cri
        .run_pod_sandbox(&pod_config, RUNC_HANDLER)
        .expect("RunPodSandbox");
    let sleeper = cri
        .create_container(
            &pod_id,
            &container_config("sleeper", BUSYBOX_IMAGE, &["sleep", "1000"]),
            &pod_config,
        )
        .expect("CreateContainer");
    cri.start_container(&sleeper).expect("StartContainer");
    let detached_id = containerd.unique_name("detached");
    let cgroup = format!("{}/{detached_id}", containerd.cgroup_parent());
    let runc_root = containerd.runc_root().display().to_string();
    let fifo_dir = containerd.fifo_dir().display().to_string();
    containerd
        .ctr_ok(
            TEST_NAMESPACE,
            &[
                "run",
                "--detach",
                "--fifo-dir",
                &fifo_dir,
                "--runc-root",
                &runc_root,
                "--cgroup",
                &cgroup,
                BUSYBOX_IMAGE,
                &detached_id,
                "sleep",
                "1000",
            ],
        )
        .expect("ctr run --detach");
    drop(cri);

    let footprint = containerd.footprint();
    // The checks below mean something only if these existed.
    assert_eq!(
        footprint.netns.len(),
        1,
        "the running pod's netns is known: {footprint:?}"
    );
    assert!(
        footprint.netns[0].exists(),
        "the pod's netns exists before the drop"
    );
    assert!(
        std::path::Path::new("/sys/class/net")
            .join(&footprint.bridge)
            .exists(),
        "the CNI bridge exists before the drop"
    );
    assert!(
        footprint.leftovers().len() >= 4,
        "before the drop: {:?}",
        footprint.leftovers()
    );

    drop(containerd);
    let leftovers = footprint.leftovers();
    assert!(
        leftovers.is_empty(),
        "left behind after the drop: {leftovers:#?}"
    );
}

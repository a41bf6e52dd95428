//! Faults under a running podbox pod, through a real containerd 1.6 and its
//! CRI (issue 13, part 3). A guest boot costs a minute of CPU on PVM hosts,
//! so each test boots one VM and breaks it in as many ways as it survives:
//!
//! - `podbox_hung_guest_then_containerd_restart_then_virtiofsd_killed`:
//!   the pod's podbox-vmm is SIGSTOPped (a hung guest): an ExecSync and a
//!   StartContainer into the pod fail with the shim's deadline error
//!   (DEADLINE_EXCEEDED, "did not answer within"), not never, while
//!   containerd and the shim go on answering what needs no agent (CRI
//!   status calls, `ctr task ls`); SIGCONT, and the pod serves again.
//!   Then containerd is restarted under the pod: the same shim serves it
//!   (ExecSync works) and its events reach the new containerd. Then
//!   virtiofsd is killed: the pod's tasks exit non-zero, the pod is
//!   removable, and nothing of it is left.
//! - `podbox_shim_killed_under_a_running_pod`: kill -9 of the shim:
//!   containerd reports the tasks exited (non-zero), its `shim delete`
//!   takes the VMM and virtiofsd down, and the pod state, mounts, shim
//!   socket and host cgroup go; the pod is removable.
//! - `podbox_guest_kernel_panic_under_a_running_pod`: a privileged
//!   container sets `vm.panic_on_oom = 2` and a container past its memory
//!   limit makes the guest kernel panic (the agent, PID 1, dies with it):
//!   every task exits non-zero, the shim logs the VM's unexpected end with
//!   podbox-vmm's word for it (the guest's panic line), and nothing is left
//!   once the pod is removed.
//!
//! (kill -9 of podbox-vmm itself is the last part of
//! `containerd_podbox`'s network test.)
//!
//! `cargo test -p podbox-tests --test containerd_faults` runs them alone.
//! Without /dev/kvm they print SKIPPED and pass; a missing virtiofsd fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerState, PodSandboxState};
use podbox_tests::containerd::{
    is_alive, pod_processes, process_state, shim_socket, signal, Containerd, CRI_NAMESPACE,
    PODBOX_HANDLER,
};
use podbox_tests::cri::{container_config, CriClient, CriError};
use podbox_tests::oci_image::BUSYBOX_IMAGE;
use podbox_tests::output::{collect, text, wait_until};
use podbox_tests::podbox::{pod_leftovers, podbox_containerd, processes_mentioning};

/// One exec, start to exit, on a loaded PVM host (see containerd_podbox).
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a call into a hung guest may take to fail: the shim's longest
/// agent deadline (CreateContainer, StartContainer, ExecProcess: 180 s)
/// and then some.
const HUNG_CALL_LIMIT: Duration = Duration::from_secs(300);
/// Calls that need no agent (containerd's own state, the shim's State):
/// they must answer while the guest hangs.
const RESPONSIVE_LIMIT: Duration = Duration::from_secs(30);
/// From a fault to every task reported exited.
const EXIT_DEADLINE: Duration = Duration::from_secs(120);
/// From a fault (or RemovePodSandbox) to the pod's host state gone.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(60);

/// A running podbox pod with one long-running container, `app`.
struct Pod {
    id: String,
    config: k8s_cri::v1::PodSandboxConfig,
    app: String,
}

/// Runs a podbox pod (privileged if asked: its containers may then be) and
/// starts `app` in it.
fn start_pod(containerd: &Containerd, cri: &mut CriClient, privileged: bool) -> Pod {
    let mut config = containerd.pod_config("faults").expect("pod config");
    if privileged {
        config
            .linux
            .as_mut()
            .expect("linux config")
            .security_context = Some(k8s_cri::v1::LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        });
    }
    let started = Instant::now();
    let id = cri
        .run_pod_sandbox(&config, PODBOX_HANDLER)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let mut app_config = container_config("app", BUSYBOX_IMAGE, &["sleep", "100000"]);
    if privileged {
        app_config.linux = Some(k8s_cri::v1::LinuxContainerConfig {
            security_context: Some(k8s_cri::v1::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let app = cri
        .create_container(&id, &app_config, &config)
        .unwrap_or_else(|e| panic!("CreateContainer app: {e}"));
    cri.start_container(&app)
        .unwrap_or_else(|e| panic!("StartContainer app: {e}"));
    eprintln!("pod ready (boot included): {:?}", started.elapsed());
    Pod { id, config, app }
}

/// The pod answers: an exec in `app` runs and prints.
fn assert_serves(cri: &mut CriClient, pod: &Pod, when: &str) {
    let out = cri
        .exec_sync(&pod.app, &["echo", "serving"], EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("{when}: ExecSync: {e}"));
    assert_eq!(
        (out.exit_code, out.stdout.trim()),
        (0, "serving"),
        "{when}: {out:?}"
    );
}

/// Runs `call` on a thread with its own CRI client; its result, or a
/// panic if it has not returned within `limit` (a hang is what fails).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    socket: PathBuf,
    call: impl FnOnce(&mut CriClient) -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut cri = CriClient::connect(&socket).expect("CRI client");
        let _ = tx.send(call(&mut cri));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// The same, started now and awaited later: the receiver.
fn spawn_call<T: Send + 'static>(
    socket: PathBuf,
    call: impl FnOnce(&mut CriClient) -> T + Send + 'static,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut cri = CriClient::connect(&socket).expect("CRI client");
        let _ = tx.send(call(&mut cri));
    });
    rx
}

/// A CRI call's failure as (gRPC code, message).
fn rpc_failure(what: &str, error: CriError) -> (tonic::Code, String) {
    match error {
        CriError::Rpc { status, .. } => (status.code(), status.message().to_string()),
        other => panic!("{what}: not a CRI status: {other}"),
    }
}

/// Asserts that a call into the hung guest failed with the shim's deadline
/// error for `agent_call`.
fn assert_deadline_error<T: std::fmt::Debug>(
    what: &str,
    agent_call: &str,
    result: Result<T, CriError>,
) {
    let error = result.expect_err(&format!("{what} into a hung guest must fail"));
    let (code, message) = rpc_failure(what, error);
    eprintln!("{what} into the hung guest: {code:?}: {message}");
    assert!(
        message.contains(agent_call) && message.contains("did not answer within"),
        "{what}: the shim's deadline error, naming the agent call: {code:?} {message}"
    );
    assert_eq!(code, tonic::Code::DeadlineExceeded, "{what}: {message}");
}

/// Waits until every container of `containers` is EXITED, and asserts that
/// each exited non-zero: a task whose VM (or shim) died did not succeed.
fn assert_exited_non_zero(
    cri: &mut CriClient,
    containers: &[&str],
    what: &str,
    deadline: Duration,
) {
    for container in containers {
        wait_until(
            &format!("container {container} to exit after {what}"),
            deadline,
            || {
                cri.container_status(container)
                    .is_ok_and(|s| s.state == ContainerState::ContainerExited as i32)
            },
        );
        let status = cri.container_status(container).expect("ContainerStatus");
        eprintln!(
            "after {what}: {} exited {} ({})",
            container, status.exit_code, status.reason
        );
        assert_ne!(status.exit_code, 0, "after {what}: {status:?}");
    }
}

/// The pod's sandbox is no longer ready in the CRI.
fn assert_sandbox_not_ready(cri: &mut CriClient, pod: &Pod, what: &str) {
    wait_until(
        &format!("the sandbox to be NOTREADY after {what}"),
        EXIT_DEADLINE,
        || {
            cri.pod_sandbox_status(&pod.id, false)
                .ok()
                .and_then(|s| s.status)
                .is_some_and(|s| s.state == PodSandboxState::SandboxNotready as i32)
        },
    );
}

/// StopPodSandbox and RemovePodSandbox succeed, and then no process names
/// the pod and nothing of its host state is left.
fn remove_and_assert_gone(cri: &mut CriClient, pod: &Pod, what: &str) {
    cri.stop_pod_sandbox(&pod.id)
        .unwrap_or_else(|e| panic!("after {what}: StopPodSandbox: {e}"));
    cri.remove_pod_sandbox(&pod.id)
        .unwrap_or_else(|e| panic!("after {what}: RemovePodSandbox: {e}"));
    wait_until(
        &format!("every process of the pod to exit after {what}"),
        CLEANUP_DEADLINE,
        || processes_mentioning(&pod.id).is_empty(),
    );
    assert_eq!(
        pod_leftovers(CRI_NAMESPACE, &pod.id),
        Vec::<String>::new(),
        "after {what}"
    );
}

#[test]
fn podbox_hung_guest_then_containerd_restart_then_virtiofsd_killed() {
    let test = "podbox_hung_guest_then_containerd_restart_then_virtiofsd_killed";
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, mut containerd)) = podbox_containerd(test, dir.path()) else {
        return;
    };
    let mut cri = containerd.cri().expect("CRI client");
    let pod = start_pod(&containerd, &mut cri, false);
    assert_serves(&mut cri, &pod, "before any fault");
    let processes = pod_processes(CRI_NAMESPACE, &pod.id);
    let (Some(shim), Some(vmm), Some(_)) = (processes.shim, processes.vmm, processes.virtiofsd)
    else {
        panic!("the pod's shim, VMM and virtiofsd: {processes:?}");
    };

    // A hung guest: the VMM stopped, its vCPUs and devices with it, while
    // the shim's connection to the agent stays open.
    signal(vmm, libc::SIGSTOP);
    wait_until("podbox-vmm to stop", RESPONSIVE_LIMIT, || {
        process_state(vmm) == Some('T')
    });
    let socket = containerd.grpc_socket().to_path_buf();
    let app = pod.app.clone();
    let exec = spawn_call(socket.clone(), move |cri| {
        cri.exec_sync(&app, &["echo", "late"], EXEC_TIMEOUT)
    });
    let (pod_id, pod_config) = (pod.id.clone(), pod.config.clone());
    let late = spawn_call(socket.clone(), move |cri| {
        let config = container_config("late", BUSYBOX_IMAGE, &["sleep", "100000"]);
        let late = cri
            .create_container(&pod_id, &config, &pod_config)
            .expect("CreateContainer (containerd's own record: no shim call)");
        cri.start_container(&late).map(|()| late)
    });
    // Meanwhile containerd, and the shim where it needs no agent, answer.
    let app = pod.app.clone();
    let pod_id = pod.id.clone();
    let (app_state, sandbox_state) = within(
        RESPONSIVE_LIMIT,
        "CRI status calls while the guest hangs",
        socket.clone(),
        move |cri| {
            let app = cri.container_status(&app).expect("ContainerStatus").state;
            let sandbox = cri
                .pod_sandbox_status(&pod_id, false)
                .expect("PodSandboxStatus")
                .status
                .map(|s| s.state);
            cri.list_containers().expect("ListContainers");
            (app, sandbox)
        },
    );
    assert_eq!(app_state, ContainerState::ContainerRunning as i32);
    assert_eq!(sandbox_state, Some(PodSandboxState::SandboxReady as i32));
    let tasks = {
        let mut ls = containerd.ctr_command(CRI_NAMESPACE, &["task", "ls"]);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(ls.stdin(Stdio::null()).output());
        });
        rx.recv_timeout(RESPONSIVE_LIMIT)
            .expect("`ctr task ls` (the shim's State) answers while the guest hangs")
            .expect("ctr task ls")
    };
    let tasks = String::from_utf8_lossy(&tasks.stdout).into_owned();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with(&pod.app) && l.contains("RUNNING")),
        "the shim reports app running while its guest hangs: {tasks}"
    );
    let waited = Instant::now();
    let exec = exec
        .recv_timeout(HUNG_CALL_LIMIT)
        .expect("ExecSync into a hung guest returns within the limit");
    assert_deadline_error("ExecSync", "ExecProcess", exec);
    let late = late
        .recv_timeout(HUNG_CALL_LIMIT.saturating_sub(waited.elapsed()))
        .expect("StartContainer into a hung guest returns within the limit");
    assert_deadline_error("StartContainer", "CreateContainer", late);
    assert!(is_alive(vmm), "the stopped VMM was left alone");

    // The guest runs again: the pod serves as before.
    signal(vmm, libc::SIGCONT);
    assert_serves(&mut cri, &pod, "after SIGCONT");

    // containerd restarts under the pod: it reconnects to the same shim,
    // and the shim's events (published to containerd's ttrpc socket)
    // reach the new daemon.
    drop(cri);
    containerd.restart().expect("restarting containerd");
    let mut cri = containerd.cri().expect("CRI client after the restart");
    let mut events = containerd
        .ctr_command(CRI_NAMESPACE, &["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    let seen = collect(events.stdout.take().expect("stdout"));
    // `ctr events` subscribes before it prints anything; give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    assert_serves(&mut cri, &pod, "after the containerd restart");
    wait_until(
        "the shim's TaskExecStarted to reach the restarted containerd",
        CLEANUP_DEADLINE,
        || {
            text(&seen)
                .lines()
                .any(|l| l.contains("/tasks/exec-started") && l.contains(&pod.app))
        },
    );
    let _ = events.kill();
    let _ = events.wait();
    assert_eq!(
        pod_processes(CRI_NAMESPACE, &pod.id).shim,
        Some(shim),
        "the pod's shim lived on across the restart"
    );

    // virtiofsd dies: the guest's files are gone, so the VM ends; every
    // task of the pod exits non-zero and its host state goes.
    let virtiofsd = pod_processes(CRI_NAMESPACE, &pod.id)
        .virtiofsd
        .expect("the pod's virtiofsd");
    signal(virtiofsd, libc::SIGKILL);
    assert_exited_non_zero(&mut cri, &[&pod.app], "virtiofsd was killed", EXIT_DEADLINE);
    assert_sandbox_not_ready(&mut cri, &pod, "virtiofsd was killed");
    wait_until(
        "the pod's VM and state to go after virtiofsd was killed",
        CLEANUP_DEADLINE,
        || pod_leftovers(CRI_NAMESPACE, &pod.id).is_empty(),
    );
    remove_and_assert_gone(&mut cri, &pod, "virtiofsd was killed");
    containerd.stop_and_assert_clean(CRI_NAMESPACE, &pod.id);
}

#[test]
fn podbox_shim_killed_under_a_running_pod() {
    let test = "podbox_shim_killed_under_a_running_pod";
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, containerd)) = podbox_containerd(test, dir.path()) else {
        return;
    };
    let mut cri = containerd.cri().expect("CRI client");
    let pod = start_pod(&containerd, &mut cri, false);
    assert_serves(&mut cri, &pod, "before the shim is killed");
    let processes = pod_processes(CRI_NAMESPACE, &pod.id);
    let (Some(shim), Some(vmm), Some(virtiofsd)) =
        (processes.shim, processes.vmm, processes.virtiofsd)
    else {
        panic!("the pod's shim, VMM and virtiofsd: {processes:?}");
    };
    let shim_socket = shim_socket(&pod.id).expect("the shim's -socket");
    assert!(shim_socket.exists(), "{}", shim_socket.display());

    signal(shim, libc::SIGKILL);
    // containerd sees the shim's connections close, runs `shim delete` for
    // each task and reports them exited.
    assert_exited_non_zero(&mut cri, &[&pod.app], "the shim was killed", EXIT_DEADLINE);
    assert_sandbox_not_ready(&mut cri, &pod, "the shim was killed");
    wait_until(
        "the VMM and virtiofsd to go with the shim",
        CLEANUP_DEADLINE,
        || !is_alive(vmm) && !is_alive(virtiofsd),
    );
    wait_until(
        "the pod's state, mounts and shim socket to go",
        CLEANUP_DEADLINE,
        || pod_leftovers(CRI_NAMESPACE, &pod.id).is_empty() && !shim_socket.exists(),
    );
    remove_and_assert_gone(&mut cri, &pod, "the shim was killed");
    containerd.stop_and_assert_clean(CRI_NAMESPACE, &pod.id);
}

/// What the privileged container runs: every OOM, a cgroup's included,
/// panics the (guest) kernel.
const PANIC_ON_OOM: &str = "echo 2 > /proc/sys/vm/panic_on_oom && cat /proc/sys/vm/panic_on_oom";
/// The memory limit the hog runs past, and what it takes at once: dd's
/// one buffer, filled by the guest kernel (every page fault of it is
/// emulated work on PVM hosts, so the limit is small).
const HOG_LIMIT_MIB: i64 = 16;
const HOG: &str = "dd if=/dev/zero of=/dev/null bs=32M count=1";
/// From the hog's start to the VM's end: the faults up to the limit, the
/// OOM report and panic on the serial console, then the reset (a loaded
/// run of containerd_resources saw a hog's OOM kill take minutes).
const PANIC_DEADLINE: Duration = Duration::from_secs(300);

#[test]
fn podbox_guest_kernel_panic_under_a_running_pod() {
    let test = "podbox_guest_kernel_panic_under_a_running_pod";
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, containerd)) = podbox_containerd(test, dir.path()) else {
        return;
    };
    let mut cri = containerd.cri().expect("CRI client");
    let pod = start_pod(&containerd, &mut cri, true);
    assert_serves(&mut cri, &pod, "before the panic");
    let processes = pod_processes(CRI_NAMESPACE, &pod.id);
    let Some(vmm) = processes.vmm else {
        panic!("the pod's VMM: {processes:?}");
    };
    // Privileged inside the guest: /proc/sys is writable there (it is the
    // guest kernel's, not the host's).
    let out = cri
        .exec_sync(&pod.app, &["sh", "-c", PANIC_ON_OOM], EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("ExecSync {PANIC_ON_OOM}: {e}"));
    assert_eq!(
        (out.exit_code, out.stdout.trim()),
        (0, "2"),
        "setting vm.panic_on_oom in the privileged container: {out:?}"
    );
    let mut hog_config = container_config("hog", BUSYBOX_IMAGE, &["sh", "-c", HOG]);
    hog_config.linux = Some(k8s_cri::v1::LinuxContainerConfig {
        resources: Some(k8s_cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: HOG_LIMIT_MIB << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = cri
        .create_container(&pod.id, &hog_config, &pod.config)
        .unwrap_or_else(|e| panic!("CreateContainer hog: {e}"));
    cri.start_container(&hog)
        .unwrap_or_else(|e| panic!("StartContainer hog: {e}"));

    // The hog's cgroup OOM panics the guest kernel; the agent dies with it
    // and the VM resets (panic=1, reboot=k): podbox-vmm exits.
    assert_exited_non_zero(
        &mut cri,
        &[&pod.app, &hog],
        "the guest kernel panicked",
        PANIC_DEADLINE,
    );
    assert_sandbox_not_ready(&mut cri, &pod, "the guest kernel panicked");
    wait_until("podbox-vmm to exit", CLEANUP_DEADLINE, || !is_alive(vmm));
    // podbox-vmm names the guest's panic (it reads the panic line off the
    // console) before it exits, and the shim's log of the VM's end carries
    // it. That log reaches containerd's through the bundle's FIFO, which
    // containerd copies on its own time: waited for.
    let panic_logged = |log: &str| {
        let lost = log
            .lines()
            .position(|l| l.contains("podbox-vmm exited unexpectedly"))?;
        let end: Vec<&str> = log.lines().skip(lost).take(45).collect();
        end.iter()
            .any(|l| l.contains("guest kernel panic") && l.contains("panic_on_oom"))
            .then(|| end.join("\n"))
    };
    let deadline = Instant::now() + CLEANUP_DEADLINE;
    let end = loop {
        let log = containerd.log();
        if let Some(end) = panic_logged(&log) {
            break end;
        }
        assert!(
            Instant::now() < deadline,
            "the shim logs the VM's end in the guest kernel's OOM panic; containerd's log ends:\n{}",
            log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("the shim's log of the VM's end:\n{end}");
    wait_until(
        "the pod's state to go after the panic",
        CLEANUP_DEADLINE,
        || pod_leftovers(CRI_NAMESPACE, &pod.id).is_empty(),
    );
    remove_and_assert_gone(&mut cri, &pod, "the guest kernel panicked");
    containerd.stop_and_assert_clean(CRI_NAMESPACE, &pod.id);
}

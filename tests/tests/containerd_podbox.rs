//! podbox under a real containerd 1.6 (issue 5). Each guest boot costs about
//! a minute of CPU on PVM hosts, so each test boots ONE VM and runs every
//! check it can in it:
//!
//! - `podbox_ctr_run_exec_and_kill_in_one_vm`: `ctr run --runtime
//!   io.containerd.podbox.v2` (guest kernel release, stdin to stdout, stderr),
//!   `ctr task exec` (exit codes, stdin, boot id), `ctr task kill`, and
//!   nothing left behind.
//! - `podbox_cri_pods_on_the_pod_network_beside_runc_then_vmm_killed`: two
//!   two-container CRI pods with handler podbox (two VMs) next to the same
//!   pod under runc, on one CNI bridge: one kernel per pod, shared localhost,
//!   separate root filesystems; the CNI IP, MAC, MTU and default route on the
//!   guest's virtio_net NIC; the CRI's hostname/resolv.conf/hosts files;
//!   host <-> pod ping and TCP, 1 MiB each way intact, runc pod <-> podbox
//!   pod, podbox pod <-> podbox pod, a hostPort; then one pod's VMM is
//!   killed: every task exits non-zero, the pod's host state, tap and tc
//!   filters are gone, and CNI DEL succeeds.
//!
//! `cargo test -p podbox-tests --test containerd_podbox` runs them alone.
//! Without /dev/kvm they print SKIPPED and pass; a missing virtiofsd fails.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use podbox_tests::containerd::{
    Containerd, ContainerdOptions, CRI_NAMESPACE, PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER,
    TEST_NAMESPACE,
};
use podbox_tests::cri::{container_config, CriClient, ExecOutput};
use podbox_tests::host_kernel_release;
use podbox_tests::net::{http_get_retrying, ping, random_bytes, sha256_hex, HostServer, NetnsView};
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
    // ctr runs CNI (with --cni) in /proc/<task pid>/ns/net: podbox-vmm's,
    // which must be a netns of the pod's own, never the host's.
    let netns =
        |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("a netns link");
    assert_ne!(
        netns(&vmm.to_string()),
        netns("self"),
        "podbox-vmm runs in the pod's own netns"
    );
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

/// A CRI pod of the test: `web` serves its /tmp on port 8080 (`a` holds
/// "pod-a", `big` 1 MiB of random bytes), `client` sleeps.
struct TestPod {
    handler: &'static str,
    id: String,
    hostname: String,
    web: String,
    client: String,
    ip: Ipv4Addr,
    netns: PathBuf,
}

const WEB_PORT: u16 = 8080;
const WEB_SCRIPT: &str =
    "echo pod-a > /tmp/a; head -c 1048576 /dev/urandom > /tmp/big; exec httpd -f -p 8080 -h /tmp";

/// Runs a pod with `handler` (with a hostPort mapping to web's port if
/// `host_port` is given), calls `before_containers` with its id between
/// RunPodSandbox and the first CreateContainer, then starts web and client.
fn start_pod(
    containerd: &Containerd,
    handler: &'static str,
    host_port: Option<u16>,
    before_containers: impl FnOnce(&str),
) -> TestPod {
    let mut cri = containerd.cri().expect("CRI client");
    let mut config = containerd
        .pod_config(&format!("pod-{handler}"))
        .expect("pod config");
    if let Some(host_port) = host_port {
        config.port_mappings.push(k8s_cri::v1::PortMapping {
            protocol: k8s_cri::v1::Protocol::Tcp as i32,
            container_port: i32::from(WEB_PORT),
            host_port: i32::from(host_port),
            host_ip: String::new(),
        });
    }
    let started = Instant::now();
    let id = cri
        .run_pod_sandbox(&config, handler)
        .unwrap_or_else(|e| panic!("RunPodSandbox ({handler}): {e}"));
    before_containers(&id);
    let mut container = |name: &str, command: &[&str]| {
        let container = cri
            .create_container(
                &id,
                &container_config(name, BUSYBOX_IMAGE, command),
                &config,
            )
            .unwrap_or_else(|e| panic!("{handler}: CreateContainer {name}: {e}"));
        cri.start_container(&container)
            .unwrap_or_else(|e| panic!("{handler}: StartContainer {name}: {e}"));
        container
    };
    let web = container("web", &["sh", "-c", WEB_SCRIPT]);
    eprintln!(
        "{handler}: pod ready (RunPodSandbox + first container started): {:?}",
        started.elapsed()
    );
    let client = container("client", &["sleep", "1000"]);
    let ip = cri
        .pod_ip(&id)
        .expect("the pod's IP")
        .parse()
        .expect("an IPv4 pod IP");
    let netns = cri
        .pod_netns_path(&id)
        .expect("PodSandboxStatus")
        .expect("a CRI pod has a netns path");
    TestPod {
        handler,
        id,
        hostname: config.hostname.clone(),
        web,
        client,
        ip,
        netns,
    }
}

fn exec(cri: &mut CriClient, pod: &TestPod, container: &str, command: &[&str]) -> ExecOutput {
    cri.exec_sync(container, command, EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}: ExecSync {command:?}: {e}", pod.handler))
}

/// `wget -O - url` in the pod's client, retried while the server starts.
fn fetch_in(cri: &mut CriClient, pod: &TestPod, url: &str) -> String {
    let script = format!("wget -q -O - {url}");
    for _ in 0..50 {
        let out = exec(cri, pod, &pod.client.clone(), &["sh", "-c", &script]);
        if out.exit_code == 0 {
            return out.stdout.trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{}: {url} never answered in the pod", pod.handler);
}

/// One kernel per pod, shared localhost, separate root filesystems.
fn assert_pod_basics(cri: &mut CriClient, pod: &TestPod) -> String {
    let handler = pod.handler;
    let boot = |cri: &mut CriClient, id: &str| {
        exec(cri, pod, id, &["cat", "/proc/sys/kernel/random/boot_id"])
            .stdout
            .trim()
            .to_string()
    };
    let web_boot = boot(cri, &pod.web);
    assert_eq!(
        web_boot,
        boot(cri, &pod.client),
        "{handler}: one kernel per pod"
    );
    let release = exec(cri, pod, &pod.client, &["uname", "-r"]).stdout;
    if handler == PODBOX_HANDLER {
        assert_ne!(
            web_boot,
            host_boot_id(),
            "podbox: the pod has its own kernel"
        );
        assert_ne!(
            release.trim(),
            host_kernel_release(),
            "podbox: guest kernel"
        );
    } else {
        assert_eq!(web_boot, host_boot_id(), "runc shares the host kernel");
    }
    let local = format!("http://127.0.0.1:{WEB_PORT}/a");
    assert_eq!(
        fetch_in(cri, pod, &local),
        "pod-a",
        "{handler}: shared localhost"
    );
    let exists =
        |cri: &mut CriClient, id: &str| exec(cri, pod, id, &["test", "-e", "/tmp/a"]).exit_code;
    assert_eq!(
        exists(cri, &pod.client.clone()),
        1,
        "{handler}: separate rootfs"
    );
    assert_eq!(
        exists(cri, &pod.web.clone()),
        0,
        "{handler}: web sees its own file"
    );
    web_boot
}

/// Inside the podbox pod's VM: the CNI's IP on a virtio_net NIC with the
/// veth's MAC and MTU, the default route via the CNI gateway, and the CRI's
/// hostname, resolv.conf and hosts files.
fn assert_guest_nic(cri: &mut CriClient, containerd: &Containerd, pod: &TestPod) {
    let run = |cri: &mut CriClient, script: &str| {
        let out = exec(cri, pod, &pod.client, &["sh", "-c", script]);
        assert_eq!(out.exit_code, 0, "{script}: {}", out.stderr);
        out.stdout.trim().to_string()
    };
    let addresses = run(cri, "ip -o -4 addr show dev eth0");
    assert!(
        addresses.contains(&format!("inet {}/24", pod.ip)),
        "the guest's eth0 has the CNI IP {}: {addresses}",
        pod.ip
    );
    let driver = run(cri, "readlink /sys/class/net/eth0/device/driver");
    assert!(driver.ends_with("/virtio_net"), "eth0's driver: {driver}");
    let netns = NetnsView::new(&pod.netns);
    assert_eq!(
        Some(run(cri, "cat /sys/class/net/eth0/address")),
        netns.mac("eth0"),
        "the guest NIC has the veth's MAC"
    );
    assert_eq!(
        run(cri, "cat /sys/class/net/eth0/mtu").parse::<u32>().ok(),
        netns.mtu("eth0"),
        "the guest NIC has the veth's MTU"
    );
    let routes = run(cri, "ip route");
    let gateway = containerd.pod_gateway();
    assert!(
        routes.contains(&format!("default via {gateway} dev eth0")),
        "default route via the CNI gateway: {routes}"
    );
    let files = containerd.sandbox_files(&pod.id);
    assert_eq!(run(cri, "cat /etc/hostname"), pod.hostname, "/etc/hostname");
    let resolv = std::fs::read_to_string(files.join("resolv.conf")).expect("the CRI's resolv.conf");
    assert_eq!(
        run(cri, "cat /etc/resolv.conf"),
        resolv.trim(),
        "/etc/resolv.conf"
    );
    let links = netns.links();
    assert!(
        links.iter().any(|l| l.starts_with("tap")),
        "the pod's netns has the VM's tap while the pod runs: {links:?}"
    );
}

/// The bytes of 1 MiB cross host <-> pod intact, both ways.
fn assert_bulk_transfer(cri: &mut CriClient, containerd: &Containerd, pod: &TestPod) {
    let web = SocketAddr::new(IpAddr::V4(pod.ip), WEB_PORT);
    let big = http_get_retrying(web, "/big", 50).expect("GET /big from the pod");
    assert_eq!(big.len(), 1 << 20, "1 MiB from the pod");
    let in_pod = exec(cri, pod, &pod.web, &["sha256sum", "/tmp/big"]).stdout;
    assert_eq!(
        in_pod.split_whitespace().next(),
        Some(sha256_hex(&big).as_str()),
        "pod -> host intact"
    );

    let payload = random_bytes(1 << 20);
    let server = HostServer::start(IpAddr::V4(containerd.pod_gateway()), payload.clone())
        .expect("a server on the bridge address");
    let script = format!("wget -q -O - http://{}/payload | sha256sum", server.addr);
    let out = exec(cri, pod, &pod.client, &["sh", "-c", &script]);
    assert_eq!(
        out.stdout.split_whitespace().next(),
        Some(sha256_hex(&payload).as_str()),
        "host -> pod intact (stderr {})",
        out.stderr
    );
}

/// A port nobody on the host listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn podbox_cri_pods_on_the_pod_network_beside_runc_then_vmm_killed() {
    let test = "podbox_cri_pods_on_the_pod_network_beside_runc_then_vmm_killed";
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, containerd)) = podbox_containerd(test, dir.path()) else {
        return;
    };
    let mut cri = containerd.cri().expect("CRI client");
    let runc = start_pod(&containerd, RUNC_HANDLER, None, |_| {});
    // A name only pod A's /etc/hosts knows, for the runc pod.
    let peer = "runc-peer.podbox.test";
    let host_port = free_port();
    let a = start_pod(&containerd, PODBOX_HANDLER, Some(host_port), |id| {
        let hosts = containerd.sandbox_files(id).join("hosts");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&hosts)
            .unwrap_or_else(|e| panic!("{}: {e}", hosts.display()));
        writeln!(file, "{} {peer}", runc.ip).expect("appending to the pod's hosts file");
    });
    let b = start_pod(&containerd, PODBOX_HANDLER, None, |_| {});
    let kernels = [&runc, &a, &b].map(|pod| assert_pod_basics(&mut cri, pod));
    assert!(
        kernels[0] != kernels[1] && kernels[1] != kernels[2] && kernels[0] != kernels[2],
        "three pods, three kernels: {kernels:?}"
    );

    assert_guest_nic(&mut cri, &containerd, &a);
    assert!(ping(IpAddr::V4(a.ip)), "host -> podbox pod ping");
    let web = |pod: &TestPod| SocketAddr::new(IpAddr::V4(pod.ip), WEB_PORT);
    assert_eq!(
        http_get_retrying(web(&a), "/a", 50).as_deref(),
        Ok(&b"pod-a\n"[..]),
        "host -> pod TCP"
    );
    assert_bulk_transfer(&mut cri, &containerd, &a);
    let url = |pod: &TestPod| format!("http://{}:{WEB_PORT}/a", pod.ip);
    assert_eq!(
        fetch_in(&mut cri, &runc, &url(&a)),
        "pod-a",
        "runc pod -> podbox pod"
    );
    assert_eq!(
        fetch_in(&mut cri, &a, &format!("http://{peer}:{WEB_PORT}/a")),
        "pod-a",
        "podbox pod -> runc pod, by a name from its /etc/hosts"
    );
    assert_eq!(
        fetch_in(&mut cri, &b, &url(&a)),
        "pod-a",
        "podbox pod B -> A"
    );
    assert_eq!(
        fetch_in(&mut cri, &a, &url(&b)),
        "pod-a",
        "podbox pod A -> B"
    );
    let mapped = SocketAddr::new(IpAddr::V4(containerd.pod_gateway()), host_port);
    assert_eq!(
        http_get_retrying(mapped, "/a", 50).as_deref(),
        Ok(&b"pod-a\n"[..]),
        "hostPort {host_port} -> podbox pod A's web"
    );

    // Failure: kill pod A's VMM. Every task of the pod exits non-zero, and
    // the shim takes the pod's host state down: its tap and tc filters go,
    // and the netns is as CNI made it.
    let vmm = vmm_pid(CRI_NAMESPACE, &a.id).expect("the pod's vmm.pid");
    // SAFETY: kill(2) on the pid the shim recorded for this pod's VMM.
    unsafe { libc::kill(vmm as libc::pid_t, libc::SIGKILL) };
    for container in [&a.web, &a.client] {
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
        || pod_leftovers(CRI_NAMESPACE, &a.id).is_empty(),
    );
    let netns = NetnsView::new(&a.netns);
    wait_until("the tap and filters to go", Duration::from_secs(60), || {
        netns.links() == ["lo", "eth0"] && netns.qdiscs().is_empty()
    });
    // StopPodSandbox runs CNI DEL: it fails if the netns is not as CNI left it.
    for pod in [&runc, &b, &a] {
        cri.stop_pod_sandbox(&pod.id)
            .unwrap_or_else(|e| panic!("{}: StopPodSandbox: {e}", pod.handler));
        cri.remove_pod_sandbox(&pod.id).expect("RemovePodSandbox");
    }
    for pod in [&a, &b] {
        wait_until("the podbox shim to exit", Duration::from_secs(60), || {
            processes_mentioning(&pod.id).is_empty()
        });
        assert_eq!(pod_leftovers(CRI_NAMESPACE, &pod.id), Vec::<String>::new());
    }
    assert_nothing_left(containerd, CRI_NAMESPACE, &b.id);
}

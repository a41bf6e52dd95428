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
    Containerd, CRI_NAMESPACE, PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER, TEST_NAMESPACE,
};
use podbox_tests::cri::{container_config, CriClient, ExecOutput};
use podbox_tests::host_kernel_release;
use podbox_tests::net::{http_get_retrying, ping, random_bytes, sha256_hex, HostServer, NetnsView};
use podbox_tests::oci_image::BUSYBOX_IMAGE;
use podbox_tests::output::{collect, text, wait_until};
use podbox_tests::podbox::{pod_leftovers, podbox_containerd, processes_mentioning, vmm_pid};

/// From `ctr run` to a running task: one guest boot, on a loaded machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(900);
/// One exec, start to exit: process creation is emulated kernel work in a
/// PVM guest, and two guests share the host's two cores in the network
/// test (an exec of a dozen processes took over 120 s there).
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("host boot id")
        .trim()
        .to_string()
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
    containerd.stop_and_assert_clean(TEST_NAMESPACE, &id);
}

/// A CRI pod of the test: `web` serves its /tmp on port 8080 (`a` holds
/// "pod-a", `big` 1 MiB of random bytes); `client`, if the pod has one,
/// sleeps.
struct TestPod {
    handler: &'static str,
    id: String,
    hostname: String,
    web: String,
    client: Option<String>,
    ip: Ipv4Addr,
    netns: PathBuf,
}

const WEB_PORT: u16 = 8080;
/// `/tmp/big` is 1 MiB of numbered lines made in user space: each line is
/// different, so a lost, repeated or reordered block changes its hash. Not
/// from /dev/urandom: on a PVM host the guest kernel's ChaCha20 is emulated
/// and 1 MiB took pod A 8 minutes of a host core, while pod B booted beside
/// it (a CI run's pod B then missed its CreateContainer deadline).
const WEB_SCRIPT: &str =
    "echo pod-a > /tmp/a; seq 1048576 | head -c 1048576 > /tmp/big; exec httpd -f -p 8080 -h /tmp";

/// What the checks read in a container, as `key=value` lines: one exec
/// each, and shell builtins (`read`, `[`, `echo`) wherever a command would
/// fork, since every process a podbox guest starts costs seconds of
/// emulated kernel work on PVM hosts. `echo -n key=; command; echo` keeps
/// a command's output on its key's line even when it prints nothing.
const WEB_FACTS: &str = "read boot < /proc/sys/kernel/random/boot_id; echo boot=$boot; \
    read release < /proc/sys/kernel/osrelease; echo release=$release; \
    [ -e /tmp/a ] && echo tmp_a=yes || echo tmp_a=no; \
    echo -n big=; sha256sum /tmp/big; echo";
const CLIENT_FACTS: &str = "read boot < /proc/sys/kernel/random/boot_id; echo boot=$boot; \
    [ -e /tmp/a ] && echo tmp_a=yes || echo tmp_a=no; \
    echo -n localhost=; wget -q -O - http://127.0.0.1:8080/a; echo";
/// The guest's NIC and the CRI's files, for the podbox pod's client.
const NIC_FACTS: &str = "echo -n addr=; ip -o -4 addr show dev eth0; echo; \
    while read -r l; do case $l in DRIVER=*) echo driver=${l#DRIVER=};; esac; \
    done < /sys/class/net/eth0/device/uevent; \
    read mac < /sys/class/net/eth0/address; echo mac=$mac; \
    read mtu < /sys/class/net/eth0/mtu; echo mtu=$mtu; \
    echo -n default=; ip route show default; echo; \
    read name < /etc/hostname; echo hostname=$name; \
    n=0; while IFS= read -r l || [ -n \"$l\" ]; do n=$((n+1)); echo \"resolv$n=$l\"; \
    done < /etc/resolv.conf; echo resolv_lines=$n";

type Facts = std::collections::HashMap<String, String>;

/// Runs a pod with `handler` (with a hostPort mapping to web's port if
/// `host_port` is given, a client container if `client`), calling
/// `before_containers` with its id between RunPodSandbox and the first
/// CreateContainer.
fn start_pod(
    containerd: &Containerd,
    handler: &'static str,
    host_port: Option<u16>,
    client: bool,
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
    let client = client.then(|| container("client", &["sleep", "1000"]));
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

/// The `key=value` lines `script` prints in `container`, once `complete`
/// says they are all there (servers in the pod may still be starting).
fn facts(
    cri: &mut CriClient,
    pod: &TestPod,
    container: &str,
    script: &str,
    complete: impl Fn(&Facts) -> bool,
) -> Facts {
    let mut last = ExecOutput {
        exit_code: -1,
        stdout: String::new(),
        stderr: String::new(),
    };
    for _ in 0..20 {
        last = cri
            .exec_sync(container, &["sh", "-c", script], EXEC_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: ExecSync {script:?}: {e}", pod.handler));
        let facts: Facts = last
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        if complete(&facts) {
            return facts;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{}: {script:?} never completed: {last:?}", pod.handler);
}

fn fact<'a>(facts: &'a Facts, key: &str) -> &'a str {
    facts.get(key).map(String::as_str).unwrap_or("")
}

/// The hash of a `sha256sum` line (`<hex>  <file or ->`).
fn digest<'a>(facts: &'a Facts, key: &str) -> &'a str {
    fact(facts, key).split_whitespace().next().unwrap_or("")
}

/// One kernel per pod (podbox: not the host's), shared localhost, separate
/// root filesystems. Returns the pod's boot id and web's facts.
fn assert_pod_basics(cri: &mut CriClient, pod: &TestPod) -> (String, Facts) {
    let handler = pod.handler;
    let web = facts(cri, pod, &pod.web.clone(), WEB_FACTS, |f| {
        f.contains_key("big")
    });
    assert_eq!(
        fact(&web, "tmp_a"),
        "yes",
        "{handler}: web sees its own file"
    );
    let boot = fact(&web, "boot").to_string();
    if handler == PODBOX_HANDLER {
        assert_ne!(boot, host_boot_id(), "podbox: the pod has its own kernel");
        assert_ne!(
            fact(&web, "release"),
            host_kernel_release(),
            "podbox: guest kernel"
        );
    } else {
        assert_eq!(boot, host_boot_id(), "runc shares the host kernel");
    }
    if let Some(client) = pod.client.clone() {
        let script = if handler == PODBOX_HANDLER {
            format!("{CLIENT_FACTS}; {NIC_FACTS}")
        } else {
            CLIENT_FACTS.to_string()
        };
        let seen = facts(cri, pod, &client, &script, |f| {
            fact(f, "localhost") == "pod-a"
        });
        assert_eq!(fact(&seen, "boot"), boot, "{handler}: one kernel per pod");
        assert_eq!(fact(&seen, "tmp_a"), "no", "{handler}: separate rootfs");
        return (boot, web.into_iter().chain(seen).collect());
    }
    (boot, web)
}

/// Inside the podbox pod's VM: the CNI's IP on a virtio_net NIC with the
/// veth's MAC and MTU, the default route via the CNI gateway, and the CRI's
/// hostname and resolv.conf; in the pod's netns, the VM's tap.
fn assert_guest_nic(containerd: &Containerd, pod: &TestPod, seen: &Facts) {
    let addr = fact(seen, "addr");
    assert!(
        addr.contains(&format!(" inet {}/24 ", pod.ip)),
        "the guest's eth0 has the CNI IP {}: {addr}",
        pod.ip
    );
    let [a, b, c, _] = pod.ip.octets();
    assert!(
        addr.contains(&format!(" brd {a}.{b}.{c}.255 ")),
        "the subnet's broadcast: {addr}"
    );
    assert_eq!(fact(seen, "driver"), "virtio_net", "eth0's driver");
    let netns = NetnsView::new(&pod.netns);
    assert_eq!(
        Some(fact(seen, "mac")),
        netns.mac("eth0").as_deref(),
        "the veth's MAC"
    );
    assert_eq!(
        fact(seen, "mtu").parse::<u32>().ok(),
        netns.mtu("eth0"),
        "the veth's MTU"
    );
    let gateway = containerd.pod_gateway();
    assert!(
        fact(seen, "default").starts_with(&format!("default via {gateway} dev eth0")),
        "default route via the CNI gateway: {seen:?}"
    );
    assert_eq!(fact(seen, "hostname"), pod.hostname, "/etc/hostname");
    let files = containerd.sandbox_files(&pod.id);
    let resolv = std::fs::read_to_string(files.join("resolv.conf")).expect("the CRI's resolv.conf");
    let lines: Vec<&str> = resolv.lines().collect();
    assert_eq!(
        fact(seen, "resolv_lines"),
        lines.len().to_string(),
        "/etc/resolv.conf's line count: {seen:?}"
    );
    for (i, line) in lines.iter().enumerate() {
        let key = format!("resolv{}", i + 1);
        assert_eq!(
            fact(seen, &key),
            line.trim(),
            "/etc/resolv.conf line {}",
            i + 1
        );
    }
    let links = netns.links();
    assert!(
        links.iter().any(|l| l.starts_with("tap")),
        "the pod's netns has the VM's tap while the pod runs: {links:?}"
    );
}

/// `key=$(wget -q -O - url)` for each (key, url).
fn fetch_script(fetches: &[(&str, String)]) -> String {
    fetches
        .iter()
        .map(|(key, url)| format!("echo -n {key}=; wget -q -O - {url}; echo"))
        .collect::<Vec<_>>()
        .join("; ")
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
    let runc = start_pod(&containerd, RUNC_HANDLER, None, true, |_| {});
    // A name only pod A's /etc/hosts knows, for the runc pod.
    let peer = "runc-peer.podbox.test";
    let host_port = free_port();
    let a = start_pod(&containerd, PODBOX_HANDLER, Some(host_port), true, |id| {
        let hosts = containerd.sandbox_files(id).join("hosts");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&hosts)
            .unwrap_or_else(|e| panic!("{}: {e}", hosts.display()));
        writeln!(file, "{} {peer}", runc.ip).expect("appending to the pod's hosts file");
    });
    // Pod B only serves: one container is enough for podbox <-> podbox.
    let b = start_pod(&containerd, PODBOX_HANDLER, None, false, |_| {});
    let (runc_boot, _) = assert_pod_basics(&mut cri, &runc);
    let (a_boot, a_facts) = assert_pod_basics(&mut cri, &a);
    let (b_boot, _) = assert_pod_basics(&mut cri, &b);
    assert!(
        runc_boot != a_boot && a_boot != b_boot && runc_boot != b_boot,
        "three pods, three kernels"
    );
    assert_guest_nic(&containerd, &a, &a_facts);

    // Host <-> pod: ping, HTTP, 1 MiB each way intact.
    assert!(ping(IpAddr::V4(a.ip)), "host -> podbox pod ping");
    let a_web = SocketAddr::new(IpAddr::V4(a.ip), WEB_PORT);
    assert_eq!(
        http_get_retrying(a_web, "/a", 50).as_deref(),
        Ok(&b"pod-a\n"[..]),
        "host -> pod"
    );
    let big = http_get_retrying(a_web, "/big", 5).expect("GET /big from the pod");
    assert_eq!(big.len(), 1 << 20, "1 MiB from the pod");
    assert_eq!(
        sha256_hex(&big),
        digest(&a_facts, "big"),
        "pod -> host intact"
    );
    let payload = random_bytes(1 << 20);
    let server = HostServer::start(IpAddr::V4(containerd.pod_gateway()), payload.clone())
        .expect("a server on the bridge address");
    let url = |pod: &TestPod| format!("http://{}:{WEB_PORT}/a", pod.ip);

    // Pod <-> pod, from each side, and host -> pod through the hostPort.
    let from_a = format!(
        "{}; echo -n payload=; wget -q -O - http://{}/payload | sha256sum; echo",
        fetch_script(&[
            ("runc", format!("http://{peer}:{WEB_PORT}/a")),
            ("b", url(&b))
        ]),
        server.addr
    );
    let a_client = a.client.clone().expect("pod A has a client");
    let seen = facts(&mut cri, &a, &a_client, &from_a, |f| {
        fact(f, "b") == "pod-a"
    });
    assert_eq!(
        fact(&seen, "runc"),
        "pod-a",
        "podbox pod -> runc pod, by a name from its /etc/hosts"
    );
    assert_eq!(
        digest(&seen, "payload"),
        sha256_hex(&payload),
        "host -> pod intact"
    );
    let to_a = fetch_script(&[("a", url(&a))]);
    let runc_client = runc.client.clone().expect("the runc pod has a client");
    facts(&mut cri, &runc, &runc_client, &to_a, |f| {
        fact(f, "a") == "pod-a"
    });
    facts(&mut cri, &b, &b.web.clone(), &to_a, |f| {
        fact(f, "a") == "pod-a"
    });
    let mapped = SocketAddr::new(IpAddr::V4(containerd.pod_gateway()), host_port);
    assert_eq!(
        http_get_retrying(mapped, "/a", 50).as_deref(),
        Ok(&b"pod-a\n"[..]),
        "hostPort {host_port} -> podbox pod A's web"
    );
    drop(server);

    // Failure: kill pod A's VMM. Every task of the pod exits non-zero, and
    // the shim takes the pod's host state down: its tap and tc filters go,
    // and the netns is as CNI made it.
    let vmm = vmm_pid(CRI_NAMESPACE, &a.id).expect("the pod's vmm.pid");
    // SAFETY: kill(2) on the pid the shim recorded for this pod's VMM.
    unsafe { libc::kill(vmm as libc::pid_t, libc::SIGKILL) };
    for container in [&a.web, &a_client] {
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
    containerd.stop_and_assert_clean(CRI_NAMESPACE, &b.id);
}

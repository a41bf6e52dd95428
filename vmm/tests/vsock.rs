//! virtio-vsock end to end: one VM boots the production guest image (the
//! agent as PID 1) plus the vsock test helper, and every host<->guest check
//! runs against it, because each boot costs about a minute of emulated
//! kernel work on PVM hosts. `cargo test -- vsock` selects these tests.
//! The same VM has two virtio-net NICs on taps in a network namespace of
//! the test's own (see `netns`), checked through the agent and with pings.

mod netns;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use podbox_agent_client::{ctx, ReadyListener};
use podbox_protocol::agent::{DestroySandboxRequest, GuestDetailsRequest};
use podbox_tests::guest::{guest_kernel, KernelVariant};
use podbox_tests::guest_image::{
    fnv1a64, source_byte, vsock_test_initramfs, vsock_test_vm, GUEST_HELLO, HOST_HELLO_PORT,
};
use podbox_tests::vm::{spawn_vmm, BOOT_DEADLINE};
use podbox_tests::vsock::{echo, pattern, sink, source};
use podbox_tests::{host_kernel_release, kvm_available};
use podbox_vmm::config::{ProfileConfig, VmConfig, VsockConfig};
use podbox_vmm::profiler::{folded_path, phase_path};
use sha2::{Digest, Sha256};

const VMM: &str = env!("CARGO_BIN_EXE_podbox-vmm");
const CONCURRENT_STREAMS: usize = 32;
const STREAM_BYTES: usize = 64 * 1024;
const LARGE_BYTES: usize = 8 << 20;
const RPC: Duration = Duration::from_secs(30);

/// Accepts one connection on `listener` within `timeout` and reads it to EOF.
fn accept_and_read(listener: &UnixListener, timeout: Duration) -> Option<String> {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok((mut s, _)) = listener.accept() {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(timeout)).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            return Some(text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Sends the VMM SIGUSR1 (the `n`th) and returns the phase profile it
/// writes, once its statistics are logged.
fn end_phase(vm: &podbox_tests::vm::RunningVm, profile: &Path, n: u32) -> String {
    // SAFETY: kill(2) of the VMM this test started.
    unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGUSR1) };
    let path = phase_path(profile, n);
    let written = format!("guest profile phase written to {}", path.display());
    let sent = Instant::now();
    while !vm.transcript().contains(&written) {
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "no phase {n} profile after SIGUSR1\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let logged = vm
        .transcript()
        .matches("kvm stats at SIGUSR1 vcpu1: exits=")
        .count();
    assert_eq!(logged, n as usize, "statistics logged at each SIGUSR1");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// vCPU 0's `exits` in a profile's KVM statistics table (columns: vm,
/// vcpu0, ...).
fn vcpu0_exits(report: &str) -> u64 {
    report
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&"exits") && cols.len() > 2)
        .and_then(|cols| cols[2].parse().ok())
        .unwrap_or_else(|| panic!("no exits row\n{report}"))
}

fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

#[test]
fn vsock_agent_in_a_booted_vm_health_details_streams_and_destroy() {
    if !kvm_available("vsock_agent_in_a_booted_vm_health_details_streams_and_destroy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let initrd = vsock_test_initramfs(dir.path());
    let kernel = guest_kernel(KernelVariant::Podbox);
    let socket = dir.path().join("vsock.sock");
    // The guest connects to host port 6000 once at start: listen before boot.
    let hello = UnixListener::bind(format!("{}_{HOST_HELLO_PORT}", socket.display())).unwrap();
    let mut ready = ReadyListener::bind(&socket).unwrap();
    // Declared before the VM: dropped (namespace deleted) after it is killed.
    let mut nics = netns::nics::TestNics::setup();
    let mut config = vsock_test_vm(&kernel, initrd, &socket);
    // Under the profiler: each SIGUSR1 below ends a phase (FILE.phaseN).
    let profile = dir.path().join("vsock.profile");
    config.guest_profile = Some(ProfileConfig {
        path: profile.clone(),
        hz: 50,
    });
    let vm = match &nics {
        Some(n) => {
            config.nics = n.configs();
            // The VMM opens tap=pbx0 in its namespace: start it inside ours.
            n.ns.run_in(|| spawn_vmm(VMM.as_ref(), dir.path(), config))
        }
        None => spawn_vmm(VMM.as_ref(), dir.path(), config),
    };
    if let Some(n) = &mut nics {
        n.vm_started();
    }

    // 1. The agent answers a health check through the hybrid vsock socket.
    let agent = vm
        .agent(&socket, &mut ready)
        .unwrap_or_else(|e| panic!("agent unreachable: {e}\n{}", vm.transcript()));
    eprintln!(
        "agent answered {:.1} s after VMM start",
        vm.started().elapsed().as_secs_f64()
    );
    agent.check(RPC).unwrap();

    // 1b. SIGUSR1 logs KVM's statistics so far and writes the profile of
    // the phase it ends (here: the boot to agent-ready), and the VM runs on.
    let boot = end_phase(&vm, &profile, 1);
    assert!(
        boot.starts_with("podbox-vmm guest profile, phase 1 (since the previous SIGUSR1)\n"),
        "{boot}"
    );
    assert!(
        boot.contains("KVM statistics, growth in this phase"),
        "{boot}"
    );
    assert!(std::fs::metadata(folded_path(&phase_path(&profile, 1))).is_ok());
    agent.check(RPC).unwrap();

    // 2. GetGuestDetails comes from the guest kernel, not the host's.
    let details = agent
        .agent
        .get_guest_details(ctx(RPC), &GuestDetailsRequest::default())
        .unwrap();
    assert!(!details.kernel_version.is_empty(), "{details:?}");
    assert_ne!(
        details.kernel_version,
        host_kernel_release(),
        "guest kernel release must differ from the host's"
    );
    assert_eq!(details.cpu_count, 2, "{details:?}");

    // 2b. virtio-net: addresses and routes through the agent, pings from
    // the host side of both taps, the guest's MACs on the wire.
    if let Some(n) = &nics {
        let start = Instant::now();
        n.check(&agent);
        eprintln!("virtio-net checks: {:?}", start.elapsed());
    }

    // 3. Guest-initiated stream to a host listener at <socket>_6000.
    let said = accept_and_read(&hello, Duration::from_secs(120));
    assert_eq!(said.as_deref(), Some(GUEST_HELLO), "{}", vm.transcript());

    // 4. Many concurrent streams, each with its own data, echoed intact.
    let start = Instant::now();
    let workers: Vec<_> = (0..CONCURRENT_STREAMS)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let data = pattern(STREAM_BYTES, i as u64 + 1);
                let back = echo(&socket, &data).unwrap_or_else(|e| panic!("stream {i}: {e}"));
                assert!(
                    back == data,
                    "stream {i}: {} bytes back, content differs",
                    back.len()
                );
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a concurrent stream failed");
    }
    eprintln!(
        "{CONCURRENT_STREAMS} concurrent echo streams of {STREAM_BYTES} B: {:?}",
        start.elapsed()
    );

    // 5. A large transfer each way and echoed, checked by hash.
    let large = pattern(LARGE_BYTES, 99);
    let start = Instant::now();
    let back = echo(&socket, &large).unwrap();
    assert_eq!(back.len(), large.len());
    assert_eq!(sha256(&back), sha256(&large), "echoed data differs");
    eprintln!("echo {} MiB: {:?}", LARGE_BYTES >> 20, start.elapsed());
    let (count, hash) = sink(&socket, &large).unwrap();
    assert_eq!(
        (count, hash),
        (LARGE_BYTES as u64, fnv1a64(&large)),
        "guest received different bytes"
    );
    let got = source(&socket, LARGE_BYTES as u64).unwrap();
    assert_eq!(got.len(), LARGE_BYTES);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == source_byte(i as u64)),
        "guest sent different bytes"
    );

    // 5b. The second phase (steps 2-5) counts only its own exits: fewer
    // than the whole run's, which include the boot's.
    let streams = end_phase(&vm, &profile, 2);
    assert!(
        streams.starts_with("podbox-vmm guest profile, phase 2 "),
        "{streams}"
    );

    // 6. DestroySandbox ends the VM: status 0, no socket left behind.
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
    assert!(!socket.exists(), "the vsock socket must be removed at exit");
    let whole = std::fs::read_to_string(&profile).unwrap_or_else(|e| panic!("{e}\n{t}"));
    let (phase_exits, all_exits) = (vcpu0_exits(&streams), vcpu0_exits(&whole));
    assert!(
        0 < phase_exits && phase_exits < all_exits,
        "phase 2: {phase_exits} exits, whole run: {all_exits}\n{streams}\n{whole}"
    );
    assert!(!t.contains("panicked"), "{t}");
    if nics.is_some() {
        for line in t
            .lines()
            .filter(|l| l.contains("virtio-net") || l.contains("--net"))
        {
            eprintln!("vmm: {line}");
        }
        // One line per NIC at exit: "--net tap=pbx0,mac=..: tx .. (0 malformed, ..".
        let counters: Vec<&str> = t
            .lines()
            .filter(|l| l.contains("--net") && l.contains("frames"))
            .collect();
        assert_eq!(
            counters.len(),
            2,
            "the VMM logs each NIC's counters at exit\n{t}"
        );
        for line in counters {
            assert_eq!(
                line.matches("(0 malformed").count(),
                2,
                "nothing malformed: {line}"
            );
        }
    }
}

#[test]
fn vsock_socket_is_removed_when_the_vmm_is_stopped() {
    if !kvm_available("vsock_socket_is_removed_when_the_vmm_is_stopped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(KernelVariant::Podbox);
    let socket = dir.path().join("vsock.sock");
    // A stale socket from a killed VMM is replaced, not an error.
    drop(UnixListener::bind(&socket).unwrap());
    let vm = spawn_vmm(
        VMM.as_ref(),
        dir.path(),
        VmConfig {
            vsock: Some(VsockConfig {
                cid: 3,
                socket: socket.clone(),
            }),
            ..VmConfig::new(kernel)
        },
    );
    let start = Instant::now();
    // Wait until the VMM is up (it logs its devices), then stop it.
    while !vm.transcript().contains("virtio-vsock at") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "VMM did not start\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(socket.exists());
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let run = vm.wait(Duration::from_secs(60));
    assert_eq!(
        run.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        run.transcript()
    );
    assert!(
        run.stderr.contains("stopped by signal"),
        "{}",
        run.transcript()
    );
    assert!(
        !Path::new(&socket).exists(),
        "socket left behind after SIGTERM"
    );
}

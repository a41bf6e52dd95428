//! Leaks under load (issue 13, part 5): podbox pods created and deleted
//! through a real containerd 1.6's CRI, in a row and several at once, leave
//! nothing behind and do not grow containerd.
//!
//! - `podbox_pods_created_and_deleted_leave_nothing`: one warm-up pod (the
//!   first pod makes what containerd keeps: the CNI bridge, IPAM's files),
//!   then the counts of `Containerd::host_counts` (containerd's fds, shims, processes
//!   and cgroups under the pods' cgroup parent, mounts, bridge ports,
//!   containerd's state and CRI files, IPAM files, FIFOs) are taken; then
//!   pods in a row, then pods at once, each RunPodSandbox, a container,
//!   an ExecSync that must answer, StopPodSandbox, RemovePodSandbox. After
//!   them the counts are what they were, every pod's state dir, mounts,
//!   netns, shim socket and processes are gone, and containerd's RSS grew
//!   by less than `CONTAINERD_RSS_SLACK_MIB`. It prints the pods per
//!   minute reached and the memory seen (containerd before and after, the
//!   shims' RSS per pod).
//!
//! By default 3 pods in a row and 2 at once (a few minutes here);
//! `PODBOX_LEAK_LONG=1` runs the long variant, 100 in a row and 10 at once.
//! The pods at once share one [`VmSlot`]: they boot together on purpose (the
//! point is concurrent creates and deletes in containerd and in the host's
//! network, cgroup and mount state), and the slot keeps other tests'
//! guests off the host meanwhile.
//!
//! `cargo test -p podbox-tests --test containerd_leaks` runs it alone.
//! Without /dev/kvm it prints SKIPPED and passes; a missing virtiofsd fails.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use podbox_tests::containerd::{Containerd, PodTrace, CRI_NAMESPACE, PODBOX_HANDLER};
use podbox_tests::cri::{container_config, CriClient};
use podbox_tests::oci_image::BUSYBOX_IMAGE;
use podbox_tests::output::wait_until;
use podbox_tests::podbox::{podbox_containerd, processes_mentioning};

/// One exec, start to exit, on a loaded PVM host.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// From RemovePodSandbox to every process of the pod gone (the shim exits
/// after containerd's Shutdown, once its VM is down).
const GONE_DEADLINE: Duration = Duration::from_secs(60);
/// How long the counts get to settle back after the last pod (containerd
/// closes some descriptors a moment after the call that used them).
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// How much containerd's RSS may grow over the whole run: Go's heap grows
/// in steps and is returned to the OS lazily, so it is not byte-flat even
/// without a leak; a leak per pod outgrows this in the long variant.
const CONTAINERD_RSS_SLACK_MIB: u64 = 32;

/// Pods in a row and at once: (3, 2) by default, (100, 10) with
/// `PODBOX_LEAK_LONG=1`.
fn load() -> (usize, usize) {
    match std::env::var("PODBOX_LEAK_LONG").as_deref() {
        Ok("1") => (100, 10),
        _ => (3, 2),
    }
}

/// One pod's life: RunPodSandbox, a container, an exec that must answer,
/// StopPodSandbox, RemovePodSandbox, and every process of it gone. Returns
/// what it had on the host while it ran.
fn pod_cycle(containerd: &Containerd, cri: &mut CriClient, name: &str) -> PodTrace {
    let config = containerd.pod_config(name).expect("pod config");
    let id = cri
        .run_pod_sandbox(&config, PODBOX_HANDLER)
        .unwrap_or_else(|e| panic!("{name}: RunPodSandbox: {e}"));
    let app = cri
        .create_container(
            &id,
            &container_config("app", BUSYBOX_IMAGE, &["sleep", "100000"]),
            &config,
        )
        .unwrap_or_else(|e| panic!("{name}: CreateContainer: {e}"));
    cri.start_container(&app)
        .unwrap_or_else(|e| panic!("{name}: StartContainer: {e}"));
    let out = cri
        .exec_sync(&app, &["echo", "serving"], EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("{name}: ExecSync: {e}"));
    assert_eq!(
        (out.exit_code, out.stdout.trim()),
        (0, "serving"),
        "{name}: {out:?}"
    );
    let trace = PodTrace::of_running_pod(cri, CRI_NAMESPACE, &id);
    assert_eq!(
        trace.pids.len(),
        3,
        "{name}: shim, VMM, virtiofsd: {trace:?}"
    );
    cri.stop_pod_sandbox(&id)
        .unwrap_or_else(|e| panic!("{name}: StopPodSandbox: {e}"));
    cri.remove_pod_sandbox(&id)
        .unwrap_or_else(|e| panic!("{name}: RemovePodSandbox: {e}"));
    wait_until(
        &format!("{name}: every process of the pod to exit"),
        GONE_DEADLINE,
        || processes_mentioning(&id).is_empty(),
    );
    trace
}

fn per_minute(pods: usize, took: Duration) -> f64 {
    pods as f64 * 60.0 / took.as_secs_f64()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

#[test]
fn podbox_pods_created_and_deleted_leave_nothing() {
    let test = "podbox_pods_created_and_deleted_leave_nothing";
    let (in_a_row, at_once) = load();
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_slot, containerd)) = podbox_containerd(test, dir.path()) else {
        return;
    };
    let mut cri = containerd.cri().expect("CRI client");

    let mut traces = vec![pod_cycle(&containerd, &mut cri, "warm-up")];
    let before = containerd.host_counts();
    let rss_before = containerd.rss_kib();

    let started = Instant::now();
    for i in 0..in_a_row {
        traces.push(pod_cycle(&containerd, &mut cri, &format!("row-{i}")));
    }
    let row_took = started.elapsed();

    let socket: PathBuf = containerd.grpc_socket().to_path_buf();
    let barrier = Arc::new(Barrier::new(at_once));
    let started = Instant::now();
    let concurrent: Vec<PodTrace> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..at_once)
            .map(|i| {
                let (barrier, socket, containerd) = (barrier.clone(), socket.clone(), &containerd);
                s.spawn(move || {
                    let mut cri = CriClient::connect(&socket).expect("CRI client");
                    barrier.wait();
                    pod_cycle(containerd, &mut cri, &format!("at-once-{i}"))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a pod at once failed"))
            .collect()
    });
    let at_once_took = started.elapsed();
    traces.extend(concurrent);

    eprintln!(
        "{in_a_row} pods in a row: {row_took:.1?} ({:.2} pods/minute); \
         {at_once} at once: {at_once_took:.1?} ({:.2} pods/minute)",
        per_minute(in_a_row, row_took),
        per_minute(at_once, at_once_took)
    );

    let mut after = containerd.host_counts();
    let deadline = Instant::now() + SETTLE_DEADLINE;
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = containerd.host_counts();
    }
    eprintln!("host counts after the pods: {:?}", after.0);
    assert_eq!(
        after.differences(&before),
        Vec::<String>::new(),
        "what the pods left (count before -> after)"
    );
    for trace in &traces {
        assert_eq!(trace.leftovers(), Vec::<String>::new(), "pod {}", trace.id);
    }

    let rss_after = containerd.rss_kib();
    let shims: Vec<u64> = traces.iter().filter_map(|t| t.shim_rss_kib).collect();
    eprintln!(
        "containerd RSS {} -> {}; shim RSS per pod: min {}, max {}, first {}, last {}",
        mib(rss_before),
        mib(rss_after),
        mib(shims.iter().min().copied()),
        mib(shims.iter().max().copied()),
        mib(shims.first().copied()),
        mib(shims.last().copied())
    );
    let (Some(rss_before), Some(rss_after)) = (rss_before, rss_after) else {
        panic!("containerd's VmRSS");
    };
    assert!(
        rss_after < rss_before + (CONTAINERD_RSS_SLACK_MIB << 10),
        "containerd's RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Each pod has a shim of its own: one that grew with the pods before
    // it would share state it should not; a pod's shim is its own size.
    let first = *shims.first().expect("the shims' RSS");
    assert!(
        shims.iter().all(|&s| s < first * 2),
        "shim RSS per pod: {shims:?} KiB"
    );
    let last = traces.last().expect("pods").id.clone();
    containerd.stop_and_assert_clean(CRI_NAMESPACE, &last);
}

//! The main job (`make demo`): a private containerd with the podbox shim,
//! a locally built busybox image, and the same two-container pod under
//! runc and in a podbox microVM on one CNI bridge, each container showing
//! its kernel release, CPU count, MemTotal, network interfaces and its
//! eth0 (IP and driver); then the runc pod fetches a page that the podbox
//! pod serves: one subnet, two kernels.
//!
//! Uses the test harness (one way to start containerd). `PODBOX_BIN_DIR`
//! names the directory holding containerd-shim-podbox-v2 and podbox-vmm
//! (scripts/demo.sh builds them); everything it starts is torn down at exit.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use podbox_tests::containerd::{Containerd, PODBOX_HANDLER, RUNC_HANDLER};
use podbox_tests::cri::{container_config, CriClient};
use podbox_tests::oci_image::BUSYBOX_IMAGE;
use podbox_tests::podbox::{containerd_with_podbox, remove_pod};

const REPORT: &str = "echo \"kernel:     $(uname -r)\"; echo \"CPUs:       $(nproc)\"; \
                      echo \"MemTotal:   $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)\"; \
                      echo \"interfaces: $(ls /sys/class/net | tr '\\n' ' ')\"; \
                      echo \"eth0:       $(ip -o -4 addr show dev eth0 | awk '{print $4}')\"; \
                      d=$(readlink /sys/class/net/eth0/device/driver); \
                      [ -n \"$d\" ] && d=${d##*/} || d='none (a veth, no device)'; \
                      echo \"driver:     $d\"";
/// The podbox pod's app container serves this page on port 8080.
const APP: &str = "echo \"served from the podbox pod, kernel $(uname -r)\" > /tmp/index.html; \
                   exec httpd -f -p 8080 -h /tmp";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("podbox-demo: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    eprintln!(
        "==> starting a private containerd (CRI, runtimes runc and podbox) and importing busybox"
    );
    let (_dir, containerd) = containerd_with_podbox()?;
    let mut cri = containerd.cri().map_err(|e| e.to_string())?;
    println!(
        "host:\n  kernel:     {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut pods = Vec::new();
    for handler in [RUNC_HANDLER, PODBOX_HANDLER] {
        if handler == PODBOX_HANDLER {
            eprintln!("==> the same pod in a podbox microVM (the guest boots in RunPodSandbox: 10-60 s of CPU on PVM hosts, by host speed)");
        } else {
            eprintln!("==> a pod under runc");
        }
        let pod = run_pod(&mut cri, &containerd, handler)?;
        pods.push(pod);
    }
    let (podbox_ip, runc_sidecar) = (&pods[1].2, &pods[0].1[1]);
    let url = format!("http://{podbox_ip}:8080/index.html");
    println!("runc pod -> podbox pod: wget {url}");
    let out = cri
        .exec_sync(
            runc_sidecar,
            &["wget", "-q", "-O", "-", &url],
            Duration::from_secs(120),
        )
        .map_err(|e| format!("ExecSync: {e}"))?;
    if out.exit_code != 0 {
        return Err(format!(
            "the runc pod could not reach the podbox pod: {}",
            out.stderr
        ));
    }
    println!("  {}", out.stdout.trim());
    for (pod, _, _) in pods {
        remove_pod(&mut cri, &pod)?;
    }
    Ok(())
}

/// Runs the demo pod under `handler` and prints what each container sees;
/// returns the pod id, its container ids and its IP.
fn run_pod(
    cri: &mut CriClient,
    containerd: &Containerd,
    handler: &str,
) -> Result<(String, Vec<String>, String), String> {
    let pod_config = containerd
        .pod_config(&format!("demo-{handler}"))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(&pod_config, handler)
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let mut containers = Vec::new();
    for (container, script) in [("app", APP), ("sidecar", "exec sleep 3600")] {
        let id = cri
            .create_container(
                &pod,
                &container_config(container, BUSYBOX_IMAGE, &["sh", "-c", script]),
                &pod_config,
            )
            .map_err(|e| format!("CreateContainer {container}: {e}"))?;
        cri.start_container(&id)
            .map_err(|e| format!("StartContainer {container}: {e}"))?;
        containers.push((container, id));
    }
    let ip = cri.pod_ip(&pod).map_err(|e| e.to_string())?;
    println!(
        "pod under {handler} (ready in {:.1?}), CNI IP {ip}:",
        started.elapsed()
    );
    for (name, id) in &containers {
        let out = cri
            .exec_sync(id, &["sh", "-c", REPORT], Duration::from_secs(120))
            .map_err(|e| format!("ExecSync: {e}"))?;
        println!("  container {name}:");
        for line in out.stdout.lines() {
            println!("    {line}");
        }
    }
    Ok((pod, containers.into_iter().map(|(_, id)| id).collect(), ip))
}

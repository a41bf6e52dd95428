//! Pods through real containerd, podbox beside runc in the same run: pod
//! ready time (RunPodSandbox + first container started, through CRI) and
//! `ctr run --rm` start to exit, median of several runs each; and the host
//! memory of one idle podbox pod (PSS of its shim, VMM and virtiofsd).

use std::time::{Duration, Instant};

use crate::containerd::{Containerd, PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER, RUNC_RUNTIME};
use crate::cri::container_config;
use crate::oci_image::BUSYBOX_IMAGE;
use crate::podbox::{containerd_with_podbox, processes_mentioning, remove_pod};

/// Guest size the shim config gives each pod (podbox::write_shim_config).
const GUEST: &str = "2 vCPUs, 256 MiB";
/// How long an idle pod settles before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(5);

/// PSS (KiB) of each process of a pod, by name.
type PodPss = Vec<(String, u64)>;

/// Seconds per sample; index 0 runc, 1 podbox.
#[derive(Default)]
pub struct PodsBench {
    pod_ready: [Vec<f64>; 2],
    ctr_run: [Vec<f64>; 2],
    /// The first idle podbox pod's processes.
    idle_pss: PodPss,
}

impl PodsBench {
    pub fn run(runs: usize) -> Result<PodsBench, String> {
        let (_dir, containerd) = containerd_with_podbox()?;
        let mut bench = PodsBench::default();
        for run in 0..runs {
            for (i, handler) in [RUNC_HANDLER, PODBOX_HANDLER].into_iter().enumerate() {
                let measure_memory = handler == PODBOX_HANDLER && run == 0;
                let (ready, pss) = pod_ready(&containerd, handler, measure_memory)?;
                eprintln!("run {}: {handler} pod ready in {ready:.2} s", run + 1);
                bench.pod_ready[i].push(ready);
                if let Some(pss) = pss {
                    bench.idle_pss = pss;
                }
            }
            for (i, runtime) in [RUNC_RUNTIME, PODBOX_RUNTIME].into_iter().enumerate() {
                let out = containerd
                    .ctr_run(runtime, BUSYBOX_IMAGE, &["true"], b"")
                    .map_err(|e| format!("ctr run ({runtime}): {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "ctr run ({runtime}) exited with {}: {}",
                        out.status, out.stderr
                    ));
                }
                let secs = out.elapsed.as_secs_f64();
                eprintln!("run {}: ctr run under {runtime}: {secs:.2} s", run + 1);
                bench.ctr_run[i].push(secs);
            }
        }
        Ok(bench)
    }

    pub fn table(&self) -> String {
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            super::median(&mut v)
        };
        let row = |what: &str, samples: &[Vec<f64>; 2]| {
            let (runc, podbox) = (med(&samples[0]), med(&samples[1]));
            format!(
                "| {what} | {runc:.2} s | {podbox:.2} s | {:.0} |\n",
                podbox / runc
            )
        };
        let mut t = format!(
            "Through containerd 1.6 on this host; podbox guest {GUEST}; busybox image; median of {} run(s) each.\n\n",
            self.pod_ready[0].len()
        );
        t.push_str("| measure | runc | podbox | podbox / runc |\n| --- | --- | --- | --- |\n");
        t.push_str(&row(
            "pod ready (RunPodSandbox + first container started)",
            &self.pod_ready,
        ));
        t.push_str(&row(
            "`ctr run --rm busybox true`, start to exit",
            &self.ctr_run,
        ));
        let total: u64 = self.idle_pss.iter().map(|(_, kib)| kib).sum();
        let parts: Vec<String> = self
            .idle_pss
            .iter()
            .map(|(name, kib)| format!("{name} {:.1}", *kib as f64 / 1024.0))
            .collect();
        t.push_str(&format!(
            "\nHost memory of one idle podbox pod (PSS, MiB): {:.1} in all ({}).\n",
            total as f64 / 1024.0,
            parts.join(", ")
        ));
        t
    }
}

/// Runs a pod with one `sleep` container under `handler` and removes it:
/// seconds from RunPodSandbox to the container started, and with
/// `measure_memory` the PSS of the pod's processes once idle.
fn pod_ready(
    containerd: &Containerd,
    handler: &str,
    measure_memory: bool,
) -> Result<(f64, Option<PodPss>), String> {
    let mut cri = containerd.cri().map_err(|e| e.to_string())?;
    let pod_config = containerd
        .pod_config(&format!("bench-{handler}"))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(&pod_config, handler)
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let result = (|| {
        let id = cri
            .create_container(
                &pod,
                &container_config("app", BUSYBOX_IMAGE, &["sleep", "3600"]),
                &pod_config,
            )
            .map_err(|e| format!("CreateContainer ({handler}): {e}"))?;
        cri.start_container(&id)
            .map_err(|e| format!("StartContainer ({handler}): {e}"))?;
        let ready = started.elapsed().as_secs_f64();
        let pss = measure_memory.then(|| {
            std::thread::sleep(IDLE_SETTLE);
            pod_pss(&pod)
        });
        Ok::<_, String>((ready, pss))
    })();
    let stopped = remove_pod(&mut cri, &pod).map_err(|e| format!("{handler} pod: {e}"));
    let measured = result?;
    stopped?;
    Ok(measured)
}

/// PSS (KiB) of every process whose command line names the pod: its shim,
/// podbox-vmm and virtiofsd.
fn pod_pss(pod_id: &str) -> PodPss {
    let mut out: PodPss = processes_mentioning(pod_id)
        .into_iter()
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            let kib = rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some((comm.trim().to_string(), kib))
        })
        .collect();
    out.sort();
    out
}

//! Pod density through real containerd: the host memory each idle pod
//! costs when 1, 5 and 10 of them run at once, podbox pods beside runc
//! pods in the same containerd and the same run; and how much of each
//! podbox guest's configured RAM the host actually holds for it.
//!
//! A pod's host memory is the PSS of every process it owns: its shim (the
//! process whose command line names the pod), and whatever runs in its
//! host cgroups, `<cgroup parent>/<pod id>` (runc: pause; podbox:
//! podbox-vmm and virtiofsd) and `<cgroup parent>/<container id>` (runc:
//! the container's processes; podbox runs them in the guest). PSS splits
//! pages shared between processes (the shim binaries, libc) among them,
//! which is why the per-pod cost falls as pods are added.
//!
//! The guest RAM podbox-vmm holds is the allocated size of its guest RAM
//! memfd (`podbox-guest-ram`): pages the guest has touched and not given
//! back through free page reporting.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::containerd::{processes_in_cgroup, Containerd, PODBOX_HANDLER, RUNC_HANDLER};
use crate::cri::{container_config, CriClient};
use crate::oci_image::BUSYBOX_IMAGE;
use crate::podbox::{containerd_with_podbox_config, processes_mentioning, remove_pod};

/// Pods of each runtime running at each measurement.
pub const POD_COUNTS: [usize; 3] = [1, 5, 10];
/// Guest size the shim config gives each pod (podbox::write_shim_config).
const GUEST_MIB: u64 = 256;
/// How long the pods settle before their memory is read: past the guest's
/// free page reporting delay (2 s) and its first report.
const IDLE_SETTLE: Duration = Duration::from_secs(10);

/// PSS in KiB.
type Kib = u64;

/// One pod's host memory, by process name (shim, podbox-vmm, ...).
struct PodMemory {
    parts: Vec<(String, Kib)>,
    /// podbox: guest RAM the host holds for the VM (MiB).
    guest_held_mib: Option<f64>,
}

impl PodMemory {
    fn total(&self) -> Kib {
        self.parts.iter().map(|(_, kib)| kib).sum()
    }
}

/// What was measured with `pods` pods of each runtime running.
struct Row {
    pods: usize,
    runc: Vec<PodMemory>,
    podbox: Vec<PodMemory>,
}

pub struct DensityBench {
    rows: Vec<Row>,
    /// The most pods of each runtime the run went to.
    max_pods: usize,
}

/// A running pod with one idle container.
struct Pod {
    id: String,
    container: String,
}

impl DensityBench {
    /// Runs up to `max_pods` pods of each runtime (the [`POD_COUNTS`] up to
    /// it), measuring at each count; removes them all, also on failure.
    pub fn run(max_pods: usize) -> Result<DensityBench, String> {
        let (_dir, containerd) = containerd_with_podbox_config("")?;
        let mut cri = containerd.cri().map_err(|e| e.to_string())?;
        let mut running: [Vec<Pod>; 2] = [Vec::new(), Vec::new()];
        let result = measure_rising(&containerd, &mut cri, &mut running, max_pods);
        let mut removed = Ok(());
        for pod in running.iter().flatten() {
            if let Err(e) = remove_pod(&mut cri, &pod.id) {
                removed = Err(e);
            }
        }
        let rows = result?;
        removed?;
        Ok(DensityBench { rows, max_pods })
    }

    pub fn table(&self) -> String {
        let mib = |kib: f64| kib / 1024.0;
        let mean = |pods: &[PodMemory], f: &dyn Fn(&PodMemory) -> f64| {
            pods.iter().map(f).sum::<f64>() / pods.len().max(1) as f64
        };
        let part = |pods: &[PodMemory], name: &str| {
            mean(pods, &|p| {
                p.parts
                    .iter()
                    .filter(|(n, _)| n.starts_with(name))
                    .map(|(_, kib)| *kib as f64)
                    .sum()
            })
        };
        let mut t = format!(
            "Idle pods (one `sleep` container each) through containerd 1.6 on this host, \
             podbox (guest: 2 vCPUs, {GUEST_MIB} MiB) beside runc in one containerd, \
             up to {} of each at once. Host memory per pod: PSS of its shim and of the \
             processes in its host cgroups, mean over the pods, MiB.\n\n\
             | pods of each | runc | podbox | podbox / runc | podbox: shim | podbox-vmm | virtiofsd | guest RAM held of {GUEST_MIB} MiB (mean, min-max) |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- |\n",
            self.max_pods
        );
        for row in &self.rows {
            let runc = mib(mean(&row.runc, &|p| p.total() as f64));
            let podbox = mib(mean(&row.podbox, &|p| p.total() as f64));
            let held: Vec<f64> = row.podbox.iter().filter_map(|p| p.guest_held_mib).collect();
            let (lo, hi) = held
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            t.push_str(&format!(
                "| {} | {runc:.1} | {podbox:.1} | {:.1}x | {:.1} | {:.1} | {:.1} | {:.1} ({lo:.1}-{hi:.1}) |\n",
                row.pods,
                podbox / runc,
                mib(part(&row.podbox, "containerd-shim")),
                mib(part(&row.podbox, "podbox-vmm")),
                mib(part(&row.podbox, "virtiofsd")),
                held.iter().sum::<f64>() / held.len().max(1) as f64,
            ));
        }
        t
    }
}

/// Adds pods of both runtimes up to each count and measures them there.
fn measure_rising(
    containerd: &Containerd,
    cri: &mut CriClient,
    running: &mut [Vec<Pod>; 2],
    max_pods: usize,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for count in POD_COUNTS.into_iter().filter(|c| *c <= max_pods) {
        while running[1].len() < count {
            for (i, handler) in [RUNC_HANDLER, PODBOX_HANDLER].into_iter().enumerate() {
                let started = std::time::Instant::now();
                running[i].push(start_idle_pod(containerd, cri, handler)?);
                eprintln!(
                    "{handler} pod {} ready in {:.1} s",
                    running[i].len(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        std::thread::sleep(IDLE_SETTLE);
        let parent = containerd.cgroup_parent();
        let [runc, podbox] = [0, 1].map(|i| {
            running[i]
                .iter()
                .map(|pod| pod_memory(parent, pod))
                .collect::<Vec<_>>()
        });
        rows.push(Row {
            pods: count,
            runc,
            podbox,
        });
    }
    Ok(rows)
}

fn start_idle_pod(
    containerd: &Containerd,
    cri: &mut CriClient,
    handler: &str,
) -> Result<Pod, String> {
    let config = containerd
        .pod_config(&format!("density-{handler}"))
        .map_err(|e| e.to_string())?;
    let id = cri
        .run_pod_sandbox(&config, handler)
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let started = (|| {
        let container = cri
            .create_container(
                &id,
                &container_config("idle", BUSYBOX_IMAGE, &["sleep", "36000"]),
                &config,
            )
            .map_err(|e| format!("CreateContainer ({handler}): {e}"))?;
        cri.start_container(&container)
            .map_err(|e| format!("StartContainer ({handler}): {e}"))?;
        Ok::<_, String>(container)
    })();
    match started {
        Ok(container) => Ok(Pod { id, container }),
        Err(e) => {
            let _ = remove_pod(cri, &id);
            Err(e)
        }
    }
}

/// The pod's processes (its shim, and everything in its host cgroups) and
/// their PSS.
fn pod_memory(cgroup_parent: &str, pod: &Pod) -> PodMemory {
    let mut pids: BTreeSet<u32> = processes_mentioning(&pod.id).into_iter().collect();
    for id in [&pod.id, &pod.container] {
        pids.extend(processes_in_cgroup(&format!(
            "{}/{id}",
            cgroup_parent.trim_end_matches('/')
        )));
    }
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mut parts: Vec<(String, Kib)> = pids
        .iter()
        .filter_map(|&pid| Some((comm(pid), super::pss_kib(pid)?)))
        .collect();
    parts.sort();
    let guest_held_mib = pids
        .iter()
        .filter(|&&pid| comm(pid) == "podbox-vmm")
        .find_map(|&pid| crate::podbox::guest_ram_held(pid))
        .map(|bytes| bytes as f64 / f64::from(1u32 << 20));
    PodMemory {
        parts,
        guest_held_mib,
    }
}

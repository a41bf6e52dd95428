//! Pods through real containerd, podbox beside runc in the same run: pod
//! ready time (RunPodSandbox + first container started, through CRI),
//! ExecSync of `true` in the running pod and `ctr run --rm` start to exit,
//! median of several runs each; the guest kernel instructions KVM emulated
//! in each phase of a podbox pod (SIGUSR1 to its VMM at each phase's end:
//! [`PhaseMeter`]); and the host memory of one idle podbox pod (PSS of its
//! shim, VMM and virtiofsd).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::PodSandboxConfig;
use podbox_shim::settings::annotations;

use crate::containerd::{
    Containerd, CRI_NAMESPACE, PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER, RUNC_RUNTIME,
};
use crate::cri::container_config;
use crate::guest::{guest_kernel, KernelVariant};
use crate::guest_image::{baseline_initramfs, baseline_rev};
use crate::oci_image::BUSYBOX_IMAGE;
use crate::podbox::{
    containerd_with_podbox_config, pod_state_dir, processes_mentioning, remove_pod, vmm_pid,
};

/// Guest size the shim config gives each pod (podbox::write_shim_config).
const GUEST: &str = "2 vCPUs, 256 MiB";
const GUEST_VCPUS: usize = 2;
/// The phases of a podbox pod that [`PhaseMeter`] separates.
const PHASES: [&str; 3] = [
    "RunPodSandbox (boot, agent, sandbox)",
    "first container created and started",
    "ExecSync `true`",
];
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an idle pod settles before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(5);

/// PSS (KiB) of each process of a pod, by name.
type PodPss = Vec<(String, u64)>;

/// The pods the bench runs, side by side in each run.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Runc,
    /// podbox with the guest kernel and agent of before issue 11
    /// (`baseline.config`; the agent's source at guest-image/build.sh's
    /// BASELINE_REV, in its old build profile), given
    /// to the shim by the `io.podbox.kernel` / `io.podbox.initrd` pod
    /// annotations.
    PodboxBefore,
    Podbox,
}

const VARIANTS: [Variant; 3] = [Variant::Runc, Variant::PodboxBefore, Variant::Podbox];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Runc => "runc",
            Variant::PodboxBefore => "podbox before",
            Variant::Podbox => "podbox",
        }
    }

    fn handler(self) -> &'static str {
        match self {
            Variant::Runc => RUNC_HANDLER,
            _ => PODBOX_HANDLER,
        }
    }
}

/// The baseline guest kernel and image, as pod annotations.
struct BeforeAssets {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl BeforeAssets {
    fn find() -> BeforeAssets {
        BeforeAssets {
            kernel: guest_kernel(KernelVariant::Baseline),
            initrd: baseline_initramfs(),
        }
    }

    /// Shim config lines that let pods name these files.
    fn shim_config(&self) -> String {
        let dir = |p: &Path| p.parent().unwrap_or(p).display().to_string();
        format!(
            "allowed_annotations = [{:?}, {:?}]\nasset_dirs = [{:?}, {:?}]\n",
            annotations::KERNEL,
            annotations::INITRD,
            dir(&self.kernel),
            dir(&self.initrd)
        )
    }

    /// The annotations that make a pod (or a `ctr run`) boot these files.
    fn annotations(&self) -> [(&'static str, String); 2] {
        [
            (annotations::KERNEL, self.kernel.display().to_string()),
            (annotations::INITRD, self.initrd.display().to_string()),
        ]
    }

    fn annotate(&self, config: &mut PodSandboxConfig) {
        for (key, value) in self.annotations() {
            config.annotations.insert(key.into(), value);
        }
    }
}

/// Seconds per sample, indexed like [`VARIANTS`].
#[derive(Default)]
pub struct PodsBench {
    pod_ready: [Vec<f64>; 3],
    exec_sync: [Vec<f64>; 3],
    /// `ctr run --rm true` (the before guest through `--annotation`).
    ctr_run: [Vec<f64>; 3],
    /// Emulated instructions per phase of each podbox pod: before, after.
    phases: [Vec<[u64; PHASES.len()]>; 2],
    /// The first idle podbox pod's processes.
    idle_pss: PodPss,
}

impl PodsBench {
    /// With `profile_dir`, every podbox pod's VM runs under the guest
    /// profiler (the shim's `guest_profile_dir`), and each phase's profile
    /// is left there beside the whole run's.
    pub fn run(runs: usize, profile_dir: Option<&Path>) -> Result<PodsBench, String> {
        let before = BeforeAssets::find();
        let mut extra = before.shim_config();
        if let Some(dir) = profile_dir {
            extra.push_str(&format!(
                "guest_profile_dir = {:?}\n",
                dir.display().to_string()
            ));
        }
        let (_dir, containerd) = containerd_with_podbox_config(&extra)?;
        let mut bench = PodsBench::default();
        for run in 0..runs {
            for (i, variant) in VARIANTS.into_iter().enumerate() {
                let measure_memory = variant == Variant::Podbox && run == 0;
                let assets = (variant == Variant::PodboxBefore).then_some(&before);
                let pod = pod_ready(&containerd, variant.handler(), assets, measure_memory)?;
                eprintln!(
                    "run {}: {} pod ready in {:.2} s, ExecSync true {:.2} s",
                    run + 1,
                    variant.name(),
                    pod.ready,
                    pod.exec_sync
                );
                bench.pod_ready[i].push(pod.ready);
                bench.exec_sync[i].push(pod.exec_sync);
                if let Some(pss) = pod.pss {
                    bench.idle_pss = pss;
                }
                if let Some(phases) = pod.phases {
                    bench.phases[usize::from(variant == Variant::Podbox)].push(phases);
                }
            }
            for (i, variant) in VARIANTS.into_iter().enumerate() {
                let runtime = match variant {
                    Variant::Runc => RUNC_RUNTIME,
                    _ => PODBOX_RUNTIME,
                };
                let owned = match variant {
                    Variant::PodboxBefore => before.annotations().to_vec(),
                    _ => Vec::new(),
                };
                let annotations: Vec<(&str, &str)> =
                    owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let name = variant.name();
                let out = containerd
                    .ctr_run_annotated(runtime, BUSYBOX_IMAGE, &["true"], b"", &annotations)
                    .map_err(|e| format!("ctr run ({name}): {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "ctr run ({name}) exited with {}: {}",
                        out.status, out.stderr
                    ));
                }
                let secs = out.elapsed.as_secs_f64();
                eprintln!("run {}: ctr run, {name}: {secs:.2} s", run + 1);
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
        let row = |what: &str, samples: &[Vec<f64>; 3]| {
            let [runc, before, after] = [0, 1, 2].map(|i| med(&samples[i]));
            format!(
                "| {what} | {runc:.2} s | {before:.2} s | {after:.2} s | {:.2}x | {:.0} |\n",
                after / before,
                after / runc
            )
        };
        let mut t = format!(
            "Through containerd 1.6 on this host; podbox guest {GUEST}; busybox image; median of {} run(s) each. \
             podbox before: the guest kernel config and agent of before issue 11 (baseline.config; \
             guest-image/build.sh --baseline: the agent's source at {}, release, static-pie), \
             through pod annotations (`ctr run --annotation`); both on today's shim and podbox-vmm.\n\n",
            self.pod_ready[0].len(),
            baseline_rev()
        );
        t.push_str(
            "| measure | runc | podbox before | podbox | podbox / before | podbox / runc |\n\
             | --- | --- | --- | --- | --- | --- |\n",
        );
        t.push_str(&row(
            "pod ready (RunPodSandbox + first container started)",
            &self.pod_ready,
        ));
        t.push_str(&row("ExecSync `true` in the running pod", &self.exec_sync));
        t.push_str(&row(
            "`ctr run --rm busybox true`, start to exit",
            &self.ctr_run,
        ));
        t.push_str(
            "\nGuest instructions KVM emulated per phase of a podbox pod (median, millions, both vCPUs):\n\n\
             | phase | before | after | after / before |\n| --- | --- | --- | --- |\n",
        );
        for (i, phase) in PHASES.iter().enumerate() {
            let [before, after] = [0, 1].map(|v| {
                let mut m: Vec<f64> = self.phases[v].iter().map(|p| p[i] as f64 / 1e6).collect();
                super::median(&mut m)
            });
            t.push_str(&format!(
                "| {phase} | {before:.2} M | {after:.2} M | {:.2}x |\n",
                after / before
            ));
        }
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

/// What one pod run measured.
struct PodRun {
    ready: f64,
    exec_sync: f64,
    pss: Option<PodPss>,
    /// For a podbox pod: emulated instructions per [`PHASES`] entry.
    phases: Option<[u64; PHASES.len()]>,
}

/// Runs a pod with one `sleep` container under `handler` (booting the
/// `before` guest if given), execs `true` in
/// it and removes it: seconds from RunPodSandbox to the container started
/// and of the ExecSync, and with `measure_memory` the PSS of the pod's
/// processes once idle.
fn pod_ready(
    containerd: &Containerd,
    handler: &str,
    before: Option<&BeforeAssets>,
    measure_memory: bool,
) -> Result<PodRun, String> {
    let mut cri = containerd.cri().map_err(|e| e.to_string())?;
    let mut pod_config = containerd
        .pod_config(&format!("bench-{handler}"))
        .map_err(|e| e.to_string())?;
    if let Some(assets) = before {
        assets.annotate(&mut pod_config);
    }
    let started = Instant::now();
    let pod = cri
        .run_pod_sandbox(&pod_config, handler)
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let result = (|| {
        let mut meter = (handler == PODBOX_HANDLER)
            .then(|| PhaseMeter::new(&pod))
            .transpose()?;
        let mut phases = [0u64; PHASES.len()];
        let mut end_phase = |i: usize| -> Result<(), String> {
            if let Some(m) = meter.as_mut() {
                phases[i] = m.end_phase()?;
            }
            Ok(())
        };
        end_phase(0)?;
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
        end_phase(1)?;
        let exec_started = Instant::now();
        let out = cri
            .exec_sync(&id, &["true"], EXEC_TIMEOUT)
            .map_err(|e| format!("ExecSync true ({handler}): {e}"))?;
        let exec_sync = exec_started.elapsed().as_secs_f64();
        if out.exit_code != 0 {
            return Err(format!(
                "ExecSync true ({handler}) exited {}",
                out.exit_code
            ));
        }
        end_phase(2)?;
        let pss = measure_memory.then(|| {
            std::thread::sleep(IDLE_SETTLE);
            pod_pss(&pod)
        });
        Ok::<_, String>(PodRun {
            ready,
            exec_sync,
            pss,
            phases: meter.map(|_| phases),
        })
    })();
    let stopped = remove_pod(&mut cri, &pod).map_err(|e| format!("{handler} pod: {e}"));
    let measured = result?;
    stopped?;
    Ok(measured)
}

/// Guest instructions emulated per phase of a podbox pod: at each phase's
/// end the meter sends SIGUSR1 to the pod's podbox-vmm, which logs its
/// vCPUs' KVM counters (`kvm stats at SIGUSR1 vcpuN: ... insn_emulation=`)
/// to vmm.log in the pod's state directory.
pub struct PhaseMeter {
    pid: u32,
    log: PathBuf,
    signals: usize,
    last: u64,
}

impl PhaseMeter {
    pub fn new(pod: &str) -> Result<PhaseMeter, String> {
        let pid = vmm_pid(CRI_NAMESPACE, pod).ok_or(format!("pod {pod}: no podbox-vmm pid"))?;
        Ok(PhaseMeter {
            pid,
            log: pod_state_dir(CRI_NAMESPACE, pod).join("vmm.log"),
            signals: 0,
            last: 0,
        })
    }

    /// Ends a phase: its emulated instructions (both vCPUs).
    pub fn end_phase(&mut self) -> Result<u64, String> {
        // SAFETY: kill(2) of the pod's VMM, whose pid the shim recorded.
        if unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGUSR1) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("SIGUSR1 to podbox-vmm {}: {e}", self.pid));
        }
        self.signals += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let counts: Vec<u64> = log
                .lines()
                .filter(|l| l.contains("kvm stats at SIGUSR1 vcpu"))
                .filter_map(|l| {
                    let v = l
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("insn_emulation="))?;
                    v.parse().ok()
                })
                .collect();
            if counts.len() >= self.signals * GUEST_VCPUS {
                let now: u64 = counts[(self.signals - 1) * GUEST_VCPUS..][..GUEST_VCPUS]
                    .iter()
                    .sum();
                let phase = now.saturating_sub(self.last);
                self.last = now;
                return Ok(phase);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no KVM statistics 30 s after SIGUSR1 {}",
                    self.log.display(),
                    self.signals
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// PSS (KiB) of every process whose command line names the pod: its shim,
/// podbox-vmm and virtiofsd.
fn pod_pss(pod_id: &str) -> PodPss {
    let mut out: PodPss = processes_mentioning(pod_id)
        .into_iter()
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((comm.trim().to_string(), super::pss_kib(pid)?))
        })
        .collect();
    out.sort();
    out
}

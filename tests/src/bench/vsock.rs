//! vsock benchmark: VMM start to the agent's first answer through the
//! hybrid vsock socket, and vsock throughput each way plus echo, on the
//! vsock test image (the production image plus tests/guest/vsock_helper.c).
//!
//! There is no QEMU column with numbers: QEMU's vsock device is
//! vhost-vsock-pci/-device, which needs the host's vhost_vsock module, and
//! this host has none; QEMU has no hybrid (unix socket) vsock. The table
//! says so instead of inventing a peer.

use std::path::Path;
use std::time::{Duration, Instant};

use podbox_agent_client::{ctx, ReadyListener};
use podbox_protocol::agent::DestroySandboxRequest;

use super::{median, secs};
use crate::guest::{guest_kernel, KernelVariant};
use crate::guest_image::{fnv1a64, vsock_test_initramfs, vsock_test_vm};
use crate::vm::spawn_vmm;
use crate::vsock::{echo, pattern, sink, source};

/// Bytes moved per throughput sample.
pub const TRANSFER_BYTES: usize = 8 << 20;
const DEADLINE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct VsockSample {
    pub first_answer: Duration,
    /// MiB/s.
    pub host_to_guest: f64,
    pub guest_to_host: f64,
    pub echo: f64,
}

pub struct VsockBench {
    pub samples: Vec<VsockSample>,
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn one_run(vmm: &Path, work: &Path) -> Result<VsockSample, String> {
    let initrd = vsock_test_initramfs(work);
    let kernel = guest_kernel(KernelVariant::Podbox);
    let socket = work.join("vsock.sock");
    let mut ready =
        ReadyListener::bind(&socket).map_err(|e| format!("binding the ready socket: {e}"))?;
    let vm = spawn_vmm(vmm, work, vsock_test_vm(&kernel, initrd, &socket));
    let agent = vm
        .agent(&socket, &mut ready)
        .map_err(|e| format!("{e}\n{}", vm.transcript()))?;
    let first_answer = vm.started().elapsed();
    let data = pattern(TRANSFER_BYTES, 7);
    let err = |what: &str, e: std::io::Error| format!("{what}: {e}");

    let t = Instant::now();
    let (count, hash) = sink(&socket, &data).map_err(|e| err("host to guest", e))?;
    let host_to_guest = mib_per_s(TRANSFER_BYTES, t.elapsed());
    if (count, hash) != (TRANSFER_BYTES as u64, fnv1a64(&data)) {
        return Err(format!(
            "host to guest: guest got {count} bytes, hash {hash:x}"
        ));
    }
    let t = Instant::now();
    let got = source(&socket, TRANSFER_BYTES as u64).map_err(|e| err("guest to host", e))?;
    let guest_to_host = mib_per_s(got.len(), t.elapsed());
    if got.len() != TRANSFER_BYTES {
        return Err(format!(
            "guest to host: {} of {TRANSFER_BYTES} bytes",
            got.len()
        ));
    }
    let t = Instant::now();
    let back = echo(&socket, &data).map_err(|e| err("echo", e))?;
    let echo_rate = mib_per_s(TRANSFER_BYTES, t.elapsed());
    if back != data {
        return Err("echo: data differs".into());
    }
    agent
        .agent
        .destroy_sandbox(
            ctx(Duration::from_secs(30)),
            &DestroySandboxRequest::default(),
        )
        .map_err(|e| format!("DestroySandbox: {e}"))?;
    let run = vm.wait(DEADLINE);
    if run.status.code() != Some(0) {
        return Err(format!("VMM exit {:?}\n{}", run.status, run.transcript()));
    }
    Ok(VsockSample {
        first_answer,
        host_to_guest,
        guest_to_host,
        echo: echo_rate,
    })
}

impl VsockBench {
    pub fn run(vmm: &Path, runs: usize, work: &Path) -> Result<Self, String> {
        let mut samples = Vec::new();
        for i in 0..runs {
            let dir = work.join(format!("vsock-{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let sample = one_run(vmm, &dir)?;
            eprintln!("vsock run {}: {sample:?}", i + 1);
            samples.push(sample);
        }
        Ok(Self { samples })
    }

    pub fn table(&self) -> String {
        let med = |f: &dyn Fn(&VsockSample) -> f64| {
            median(&mut self.samples.iter().map(f).collect::<Vec<_>>())
        };
        let no_qemu = "n/a: no vhost_vsock on this host";
        let mut t = format!(
            "vsock: median of {} run(s), 2 vCPUs, 256 MiB, {} MiB per transfer, through the hybrid vsock unix socket\n\n",
            self.samples.len(),
            TRANSFER_BYTES >> 20
        );
        t.push_str("| measure | podbox-vmm | QEMU microvm | podbox / QEMU |\n|---|---|---|---|\n");
        t.push_str(&format!(
            "| VMM start to agent's first health answer | {:.1} s | {no_qemu} | n/a |\n",
            med(&|s| secs(s.first_answer))
        ));
        for (what, f) in [
            (
                "host to guest (sink)",
                &(|s: &VsockSample| s.host_to_guest) as &dyn Fn(&VsockSample) -> f64,
            ),
            ("guest to host (source)", &|s: &VsockSample| s.guest_to_host),
            ("echo (both ways at once)", &|s: &VsockSample| s.echo),
        ] {
            t.push_str(&format!(
                "| vsock throughput, {what} | {:.1} MiB/s | {no_qemu} | n/a |\n",
                med(f)
            ));
        }
        t
    }
}

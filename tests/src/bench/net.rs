//! Host <-> pod networking through real containerd and CNI, a podbox pod
//! beside a runc pod in the same run: TCP throughput each way (one stream)
//! and TCP round-trip latency (1-byte ping-pong), plus podbox-vmm's CPU
//! time per MiB moved. The servers in each pod are busybox `nc -ll -e`:
//! port 5001 counts what it receives (`wc -c`), 5002 echoes (`cat`), 5003
//! sends zeros (`head -c`).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::containerd::CRI_NAMESPACE;
use crate::containerd::{Containerd, PODBOX_HANDLER, RUNC_HANDLER};
use crate::cri::container_config;
use crate::oci_image::BUSYBOX_IMAGE;
use crate::podbox::{containerd_with_podbox, remove_pod, vmm_pid};

const SINK_PORT: u16 = 5001;
const ECHO_PORT: u16 = 5002;
const SOURCE_PORT: u16 = 5003;
const IO_TIMEOUT: Duration = Duration::from_secs(300);

/// What one pod measured.
#[derive(Default, Clone)]
struct PodNet {
    /// MiB/s per run, host -> pod and pod -> host.
    to_pod: Vec<f64>,
    from_pod: Vec<f64>,
    /// Round trips, microseconds (every sample of every run).
    rtt_us: Vec<f64>,
    /// podbox-vmm user+system CPU ms per MiB, each direction (podbox only).
    vmm_ms_per_mib: [Vec<f64>; 2],
}

pub struct NetBench {
    mib: usize,
    round_trips: usize,
    /// Index 0 runc, 1 podbox.
    pods: [PodNet; 2],
}

fn servers(mib: usize) -> String {
    format!(
        "nc -ll -p {SINK_PORT} -e wc -c & nc -ll -p {ECHO_PORT} -e cat & \
         nc -ll -p {SOURCE_PORT} -e head -c {} /dev/zero & wait",
        mib << 20
    )
}

impl NetBench {
    pub fn run(runs: usize, mib: usize, round_trips: usize) -> Result<NetBench, String> {
        let (_dir, containerd) = containerd_with_podbox()?;
        let mut bench = NetBench {
            mib,
            round_trips,
            pods: Default::default(),
        };
        for (i, handler) in [RUNC_HANDLER, PODBOX_HANDLER].into_iter().enumerate() {
            bench.pods[i] = measure_pod(&containerd, handler, runs, mib, round_trips)?;
        }
        Ok(bench)
    }

    pub fn table(&self) -> String {
        let med = |v: &[f64]| super::median(&mut v.to_vec());
        let p99 = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let [runc, podbox] = &self.pods;
        let mut t = format!(
            "Host <-> pod over the pod's CNI network (bridge + veth; podbox adds tap + tc redirect + virtio-net), \
             one TCP stream of {} MiB each way, {} 1-byte round trips; median of {} run(s).\n\n",
            self.mib,
            self.round_trips,
            runc.to_pod.len()
        );
        t.push_str("| measure | runc | podbox | podbox / runc |\n| --- | --- | --- | --- |\n");
        let mut row = |what: &str, unit: &str, r: f64, p: f64| {
            t.push_str(&format!(
                "| {what} | {r:.1} {unit} | {p:.1} {unit} | {} |\n",
                three_digits(p / r)
            ));
        };
        row(
            "throughput host -> pod",
            "KiB/s",
            med(&runc.to_pod) * 1024.0,
            med(&podbox.to_pod) * 1024.0,
        );
        row(
            "throughput pod -> host",
            "KiB/s",
            med(&runc.from_pod) * 1024.0,
            med(&podbox.from_pod) * 1024.0,
        );
        row(
            "round trip, median",
            "µs",
            med(&runc.rtt_us),
            med(&podbox.rtt_us),
        );
        row(
            "round trip, p99",
            "µs",
            p99(&runc.rtt_us),
            p99(&podbox.rtt_us),
        );
        t.push_str(&format!(
            "\npodbox-vmm CPU time (user + system, all its threads, vCPUs included: on PVM hosts that is the emulated guest kernel) per MiB: {:.1} ms host -> pod, {:.1} ms pod -> host.\n",
            med(&podbox.vmm_ms_per_mib[0]),
            med(&podbox.vmm_ms_per_mib[1])
        ));
        t
    }
}

/// A ratio with three significant digits (0.000229, 0.0151, 1.02, 493).
fn three_digits(x: f64) -> String {
    if !x.is_finite() || x <= 0.0 {
        return format!("{x}");
    }
    let decimals = (2 - x.log10().floor() as i32).max(0) as usize;
    format!("{x:.decimals$}")
}

/// Runs the server pod under `handler`, measures it `runs` times, removes it.
fn measure_pod(
    containerd: &Containerd,
    handler: &str,
    runs: usize,
    mib: usize,
    round_trips: usize,
) -> Result<PodNet, String> {
    let mut cri = containerd.cri().map_err(|e| e.to_string())?;
    let pod_config = containerd
        .pod_config(&format!("bench-net-{handler}"))
        .map_err(|e| e.to_string())?;
    let pod = cri
        .run_pod_sandbox(&pod_config, handler)
        .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
    let result = (|| {
        let script = servers(mib);
        let id = cri
            .create_container(
                &pod,
                &container_config("servers", BUSYBOX_IMAGE, &["sh", "-c", &script]),
                &pod_config,
            )
            .map_err(|e| format!("CreateContainer ({handler}): {e}"))?;
        cri.start_container(&id)
            .map_err(|e| format!("StartContainer ({handler}): {e}"))?;
        let ip: IpAddr = cri
            .pod_ip(&pod)
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| format!("pod IP: {e}"))?;
        let vmm = (handler == PODBOX_HANDLER)
            .then(|| vmm_pid(CRI_NAMESPACE, &pod))
            .flatten();
        let mut out = PodNet::default();
        wait_for_server(SocketAddr::new(ip, ECHO_PORT))?;
        for run in 0..runs {
            let cpu = vmm.map(cpu_ms);
            out.to_pod.push(send(SocketAddr::new(ip, SINK_PORT), mib)?);
            let cpu_mid = vmm.map(cpu_ms);
            out.from_pod
                .push(receive(SocketAddr::new(ip, SOURCE_PORT), mib)?);
            if let (Some(a), Some(b), Some(pid)) = (cpu, cpu_mid, vmm) {
                out.vmm_ms_per_mib[0].push((b - a) / mib as f64);
                out.vmm_ms_per_mib[1].push((cpu_ms(pid) - b) / mib as f64);
            }
            out.rtt_us
                .extend(ping_pong(SocketAddr::new(ip, ECHO_PORT), round_trips)?);
            eprintln!(
                "{handler} run {}: host->pod {:.3} MiB/s, pod->host {:.3} MiB/s",
                run + 1,
                out.to_pod[run],
                out.from_pod[run]
            );
        }
        Ok::<_, String>(out)
    })();
    let stopped = remove_pod(&mut cri, &pod).map_err(|e| format!("{handler} pod: {e}"));
    let measured = result?;
    stopped?;
    Ok(measured)
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
    Ok(stream)
}

/// The pod's servers start after StartContainer returns: retry a while.
fn wait_for_server(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match ping_pong(addr, 1) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// MiB/s of `mib` MiB written to the pod's counting sink, up to its count.
fn send(addr: SocketAddr, mib: usize) -> Result<f64, String> {
    let mut stream = connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..mib {
        stream
            .write_all(&chunk)
            .map_err(|e| format!("send to {addr}: {e}"))?;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("shutdown {addr}: {e}"))?;
    let mut count = String::new();
    stream
        .read_to_string(&mut count)
        .map_err(|e| format!("count from {addr}: {e}"))?;
    let elapsed = started.elapsed().as_secs_f64();
    if count.trim() != (mib << 20).to_string() {
        return Err(format!("{addr} counted {count:?} of {} bytes", mib << 20));
    }
    Ok(mib as f64 / elapsed)
}

/// MiB/s of reading the pod's `mib` MiB source to EOF.
fn receive(addr: SocketAddr, mib: usize) -> Result<f64, String> {
    let mut stream = connect(addr)?;
    let mut buffer = vec![0u8; 1 << 16];
    let mut total = 0usize;
    let started = Instant::now();
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => return Err(format!("read from {addr}: {e}")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if total != mib << 20 {
        return Err(format!("{addr} sent {total} of {} bytes", mib << 20));
    }
    Ok(mib as f64 / elapsed)
}

/// Microseconds of each of `n` 1-byte round trips on one connection.
fn ping_pong(addr: SocketAddr, n: usize) -> Result<Vec<f64>, String> {
    let mut stream = connect(addr)?;
    stream.set_nodelay(true).ok();
    let mut samples = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    // Round trip 0 is not timed: busybox `nc -ll -e cat` starts `cat` for
    // each connection, which in a podbox guest takes seconds of emulated
    // kernel work and would be every run's slowest sample.
    for i in 0..=n {
        let started = Instant::now();
        stream
            .write_all(&[i as u8])
            .and_then(|()| stream.read_exact(&mut byte))
            .map_err(|e| format!("round trip to {addr}: {e}"))?;
        if byte[0] != i as u8 {
            return Err(format!("{addr} echoed {} for {}", byte[0], i as u8));
        }
        if i > 0 {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(samples)
}

/// User + system CPU milliseconds of process `pid` (all its threads).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start past ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

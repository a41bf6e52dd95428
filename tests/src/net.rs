//! Host-side ends of the pod network tests and benchmarks: a tiny HTTP
//! server and client on std sockets, ping, and what a pod's network
//! namespace holds (read with `ip`/`tc`, which the tests may use as
//! observers; podbox itself speaks netlink).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};

const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Lower-case hex SHA-256, as busybox `sha256sum` prints it.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `len` bytes that no compression or pattern can fake.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64;
    (0..len)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// GET `http://addr/path` with HTTP/1.0; the body, or what went wrong.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no HTTP header in {} bytes", response.len()))?;
    let status = String::from_utf8_lossy(&response[..split]).into_owned();
    if !status.starts_with("HTTP/1.0 200") && !status.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{addr}{path}: {}",
            status.lines().next().unwrap_or("")
        ));
    }
    Ok(response[split + 4..].to_vec())
}

/// Retries [`http_get`] for up to `attempts` × 200 ms (a server that is
/// still starting, ARP on a new link).
pub fn http_get_retrying(addr: SocketAddr, path: &str, attempts: usize) -> Result<Vec<u8>, String> {
    let mut last = String::new();
    for _ in 0..attempts.max(1) {
        match http_get(addr, path) {
            Ok(body) => return Ok(body),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last)
}

/// An HTTP server on the host answering every GET with `body`, until dropped.
pub struct HostServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostServer {
    pub fn start(ip: IpAddr, body: Vec<u8>) -> std::io::Result<HostServer> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &body),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(HostServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

fn answer(mut stream: TcpStream, body: &[u8]) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    let header = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(header.as_bytes());
    let _ = stream.write_all(body);
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// True if `ip` answers ICMP echo from the host (busybox ping: Debian's
/// busybox-static is a test dependency already).
pub fn ping(ip: IpAddr) -> bool {
    Command::new("busybox")
        .args(["ping", "-c", "2", "-W", "5", &ip.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A network namespace under /var/run/netns (where CNI's netns live),
/// looked at with `ip -n` and `tc -n`.
pub struct NetnsView {
    name: String,
}

impl NetnsView {
    pub fn new(path: &Path) -> NetnsView {
        NetnsView {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new(program)
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Interface names (without the `@peer` suffix of veths).
    pub fn links(&self) -> Vec<String> {
        self.run("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// `link/ether` address of `dev`.
    pub fn mac(&self, dev: &str) -> Option<String> {
        let out = self.run("ip", &["-o", "link", "show", "dev", dev]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "link/ether")?;
        words.next().map(str::to_string)
    }

    pub fn mtu(&self, dev: &str) -> Option<u32> {
        let out = self.run("ip", &["-o", "link", "show", "dev", dev]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "mtu")?;
        words.next()?.parse().ok()
    }

    /// `tc qdisc show` lines: what podbox's redirect leaves (or doesn't).
    pub fn qdiscs(&self) -> Vec<String> {
        self.run("tc", &["qdisc", "show"])
            .lines()
            .filter(|l| l.contains("ingress"))
            .map(str::to_string)
            .collect()
    }

    /// `tc filter show dev DEV ingress` output.
    pub fn ingress_filters(&self, dev: &str) -> String {
        self.run("tc", &["filter", "show", "dev", dev, "ingress"])
    }
}

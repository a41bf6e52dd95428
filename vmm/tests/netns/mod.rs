//! A network namespace of the test's own with taps for a test VM's NICs,
//! and ICMP echo sent from inside it (no `ping` binary needed: a raw
//! socket in the namespace). Everything made here goes when the
//! [`NetNs`] is dropped, also when the test fails.

pub mod nics;

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Makes the namespace, or says why not (not root, no iproute2).
    pub fn create(name: &str) -> Result<NetNs, String> {
        // A namespace left by a killed run of this test has the same name.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(&["netns", "add", name])?;
        let ns = NetNs { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n <ns> ARGS`; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Runs `f` on a thread that joined the namespace: sockets it opens
    /// and processes it starts live there.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on a namespace fd we opened; it changes only
                // this thread, which ends after `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in the test namespace panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Its taps go with it (once the VMM holding them has exited).
        if let Err(e) = run(&["netns", "del", &self.name]) {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Opens a new tap `name` with the flags podbox-vmm needs, in the calling
/// thread's namespace, inheritable (no close-on-exec) so that a child can
/// be given it as `--net fd=N`.
pub fn open_tap_fd(name: &str) -> io::Result<OwnedFd> {
    let path = CString::new("/dev/net/tun").unwrap();
    // SAFETY: open of a constant path; the result is checked.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF takes a struct ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One echo request to `dst` from `src` (or the routed address) with
/// `payload` bytes, `fragment` allowed or DF set.
pub struct Ping {
    pub dst: Ipv4Addr,
    pub src: Option<Ipv4Addr>,
    pub payload: usize,
    pub fragment: bool,
}

fn raw_icmp_socket(p: &Ping, timeout: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let pmtu: libc::c_int = if p.fragment {
        libc::IP_PMTUDISC_DONT
    } else {
        libc::IP_PMTUDISC_DO
    };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(&sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, &pmtu)?;
    setsockopt(&sock, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    if let Some(src) = p.src {
        let sa = sockaddr(src);
        // SAFETY: a valid sockaddr_in of the right length.
        let rc = unsafe {
            libc::bind(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(sock)
}

fn setsockopt<T>(sock: &OwnedFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points to a T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Sends `count` echo requests (one at a time, each waiting up to
/// `timeout` for its reply, whose payload must come back intact) and
/// returns the round-trip times. Call it inside [`NetNs::run_in`].
pub fn ping(p: &Ping, count: u16, timeout: Duration) -> Result<Vec<Duration>, String> {
    let sock = raw_icmp_socket(p, timeout).map_err(|e| format!("raw ICMP socket: {e}"))?;
    let id = (std::process::id() as u16) ^ 0x5042;
    let mut rtts = Vec::new();
    for seq in 1..=count {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend(id.to_be_bytes());
        pkt.extend(seq.to_be_bytes());
        pkt.extend((0..p.payload).map(|i| (i as u8) ^ (seq as u8)));
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let sa = sockaddr(p.dst);
        let start = Instant::now();
        // SAFETY: a valid buffer and sockaddr_in.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&sa) as u32,
            )
        };
        if sent < 0 {
            return Err(format!("sendto {}: {}", p.dst, io::Error::last_os_error()));
        }
        wait_reply(sock.as_raw_fd(), &pkt, start + timeout)
            .map_err(|e| format!("echo {seq} to {} ({} bytes): {e}", p.dst, p.payload))?;
        rtts.push(start.elapsed());
    }
    Ok(rtts)
}

/// Reads ICMP packets until the reply to `request` comes, or `deadline`.
fn wait_reply(fd: RawFd, request: &[u8], deadline: Instant) -> Result<(), String> {
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("recv: {e}"));
        }
        let got = &buf[..n as usize];
        let ihl = usize::from(got.first().copied().unwrap_or(0) & 0xf) * 4;
        let Some(icmp) = got.get(ihl..) else { continue };
        // An echo reply (type 0) with our id and seq.
        if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..8] == request[4..8] {
            if icmp[8..] != request[8..] {
                return Err(format!(
                    "reply payload differs ({} bytes back)",
                    icmp.len() - 8
                ));
            }
            return Ok(());
        }
    }
    Err("no reply".into())
}

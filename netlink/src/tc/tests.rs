//! Against the real kernel, in a network namespace of the test's own (needs
//! root, as the whole test suite does). Fixtures: a veth pair made with
//! `ip link` and a tap opened here; frames go through AF_PACKET sockets.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::link::{link_by_name, set_link, LinkChange};
use crate::testing::in_new_netns;

/// A veth pair `va`/`vb`, both up; `ip` runs in this thread's netns.
fn veth_pair(nl: &mut Netlink) -> (u32, u32) {
    let netns = format!("/proc/{}/task/{}/ns/net", std::process::id(), unsafe {
        libc::gettid()
    });
    let status = Command::new("nsenter")
        .args([
            "--net=".to_string() + &netns,
            "ip".into(),
            "link".into(),
            "add".into(),
        ])
        .args(["va", "type", "veth", "peer", "name", "vb"])
        .status()
        .expect("running ip");
    assert!(status.success(), "ip link add va type veth peer name vb");
    (up(nl, "va"), up(nl, "vb"))
}

/// Sets link `name` up; returns its index.
fn up(nl: &mut Netlink, name: &str) -> u32 {
    let link = link_by_name(nl, name).unwrap().expect(name);
    set_link(
        nl,
        link.index,
        &LinkChange {
            up: Some(true),
            ..Default::default()
        },
    )
    .unwrap();
    link.index
}

/// A non-persistent tap as podbox makes one (IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR), non-blocking; up.
fn tap(nl: &mut Netlink, name: &str) -> (OwnedFd, u32) {
    // SAFETY: plain syscalls on a fresh descriptor and a zeroed ifreq.
    let fd = unsafe {
        let fd = libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        let rc = libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &ifr);
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        fd
    };
    (fd, up(nl, name))
}

/// An AF_PACKET socket on interface `index` (every protocol), non-blocking.
fn packet_socket(index: u32) -> OwnedFd {
    // SAFETY: plain syscalls; the sockaddr is fully initialised.
    unsafe {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = index as i32;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &address as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        fd
    }
}

/// A broadcast frame of a local experimental ethertype carrying `marker`.
fn frame(marker: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(marker);
    frame.resize(60, 0);
    frame
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: writes from a live buffer.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        std::io::Error::last_os_error()
    );
}

/// Reads from `fd` until a frame containing `marker` comes, or 2 s pass.
fn saw(fd: &OwnedFd, marker: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: reads into a live buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if n > 0
            && buffer[..n as usize]
                .windows(marker.len())
                .any(|w| w == marker)
        {
            return true;
        }
        if n <= 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    false
}

#[test]
fn a_redirect_pair_carries_frames_both_ways_and_goes_with_the_qdiscs() {
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink socket");
        let (va, vb) = veth_pair(&mut nl);
        let (tap_fd, tap) = tap(&mut nl, "tap0_test");
        for index in [vb, tap] {
            add_ingress_qdisc(&mut nl, index).expect("ingress qdisc");
        }
        let err = add_ingress_qdisc(&mut nl, vb).expect_err("a second ingress qdisc");
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        let used = add_redirect_any(&mut nl, vb, tap).expect("vb -> tap");
        eprintln!("classifier: {used}");
        add_redirect(&mut nl, tap, vb, used).expect("tap -> vb");

        let filters = ingress_filters(&mut nl, vb).expect("dump vb");
        assert!(
            filters
                .iter()
                .any(|f| f.kind == used.kind() && f.redirect_to == Some(tap)),
            "{filters:?}"
        );
        let filters = ingress_filters(&mut nl, tap).expect("dump tap");
        assert!(
            filters.iter().any(|f| f.redirect_to == Some(vb)),
            "{filters:?}"
        );

        // va -> vb's ingress -> the tap's egress: the tap's reader gets it.
        let on_va = packet_socket(va);
        write_all(&on_va, &frame(b"podbox-to-tap"));
        assert!(
            saw(&tap_fd, b"podbox-to-tap"),
            "a frame sent on va reaches the tap"
        );
        // The tap's writer (the VMM) -> the tap's ingress -> vb -> va.
        let mut to_va = vec![0u8; 10]; // virtio_net_hdr (IFF_VNET_HDR): no offloads
        to_va.extend(frame(b"podbox-to-veth"));
        write_all(&tap_fd, &to_va);
        assert!(
            saw(&on_va, b"podbox-to-veth"),
            "a frame written to the tap reaches va"
        );

        assert!(delete_ingress_qdisc(&mut nl, vb).expect("delete"));
        assert!(!delete_ingress_qdisc(&mut nl, vb).expect("delete again is no error"));
        assert!(ingress_filters(&mut nl, vb).expect("dump").is_empty());
        let left = qdiscs(&mut nl).expect("qdiscs");
        assert!(
            !left.iter().any(|q| q.index == vb && q.is_ingress()),
            "{left:?}"
        );
        assert!(
            left.iter().any(|q| q.index == tap && q.is_ingress()),
            "{left:?}"
        );
        // Closing the tap's last descriptor removes it and its qdisc. A
        // child another test thread forks holds a copy until its exec, so
        // "last" may come a moment later.
        drop(tap_fd);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while link_by_name(&mut nl, "tap0_test").unwrap().is_some()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(link_by_name(&mut nl, "tap0_test").unwrap(), None);
        let left = qdiscs(&mut nl).expect("qdiscs");
        assert!(!left.iter().any(|q| q.index == tap), "{left:?}");
        assert!(!delete_ingress_qdisc(&mut nl, tap).expect("a gone interface is no error"));
    });
}

#[test]
fn the_bpf_classifier_is_built_and_listed() {
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink socket");
        let (va, vb) = veth_pair(&mut nl);
        add_ingress_qdisc(&mut nl, va).expect("ingress qdisc");
        add_redirect(&mut nl, va, vb, Classifier::Bpf).expect("bpf filter");
        let filters = ingress_filters(&mut nl, va).expect("dump");
        assert_eq!(
            filters,
            vec![Filter {
                index: va,
                kind: "bpf".into(),
                redirect_to: Some(vb)
            }]
        );
        // No qdisc: the filter request names the interface.
        let err = add_redirect(&mut nl, vb, va, Classifier::Bpf).expect_err("no qdisc on vb");
        assert!(
            err.to_string().contains(&format!("interface {vb}")),
            "{err}"
        );
    });
}

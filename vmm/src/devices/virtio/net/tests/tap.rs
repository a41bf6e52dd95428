/// Runs `f` on a thread of its own in a new, empty network namespace, or
/// returns None where this process may not make one (not root).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which ends after `f`.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

/// Opens /dev/net/tun as `TUNSETIFF` with `flags` would, for a descriptor
/// to pass to `Tap::from_fd`.
fn raw_tun(name: &str, flags: libc::c_int) -> RawFd {
    // SAFETY: open of a constant path; result checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "/dev/net/tun: {}", io::Error::last_os_error());
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as i16;
    // SAFETY: TUNSETIFF takes a struct ifreq.
    assert_eq!(
        unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) },
        0,
        "{}",
        io::Error::last_os_error()
    );
    fd
}

#[test]
fn net_real_tap_open_by_name_and_inherited_fd_checks() {
    use super::tap::{Tap, TapError};
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: no /dev/net/tun");
        return;
    }
    let Some(()) = in_new_netns(|| {
        let mut tap = Tap::open("pbxtest0").expect("a tap by name");
        assert_eq!(tap.name(), "pbxtest0");
        let offloads = tap.probe_offloads(&TAP_OFFLOAD_CANDIDATES);
        eprintln!("tap offloads accepted: {offloads:#x}");
        assert_ne!(
            offloads & libc::TUN_F_CSUM,
            0,
            "every tap has checksum offload"
        );
        drop(tap);

        let ok = raw_tun(
            "pbxtest1",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        // SAFETY: `ok` is ours and handed over.
        let tap = unsafe { Tap::from_fd(ok) }.expect("a good inherited tap");
        assert_eq!(tap.name(), "pbxtest1");

        // (A tap opened without IFF_NO_PI is not tried: this host's kernel
        // reports IFF_NO_PI for a TAP | VNET_HDR tap anyway.)
        for (flags, missing) in [
            (libc::IFF_TAP | libc::IFF_NO_PI, "IFF_VNET_HDR"),
            (
                libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                "IFF_TAP",
            ),
        ] {
            let fd = raw_tun("pbxtest2", flags);
            // SAFETY: refused descriptors are not taken over; closed below.
            let err = unsafe { Tap::from_fd(fd) }.unwrap_err();
            assert!(
                matches!(&err, TapError::Flag { flag, .. } if *flag == missing),
                "{err}"
            );
            assert!(err.to_string().contains(missing), "{err}");
            // SAFETY: still ours.
            unsafe { libc::close(fd) };
        }
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: refused, so not taken over; `null` closes it.
        let err = unsafe { Tap::from_fd(null.as_raw_fd()) }.unwrap_err();
        assert!(matches!(err, TapError::GetIff { .. }), "{err}");
    }) else {
        return;
    };
}


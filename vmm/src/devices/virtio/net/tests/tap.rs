//! A real tap, in a network namespace of its own (root only).

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use super::super::tap::{attach, Tap, TapError};
use super::TAP_OFFLOAD_CANDIDATES;

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

/// A tap descriptor as the shim passes one on: opened by the production
/// path (`tap::attach`) with `flags`, then with close-on-exec and
/// O_NONBLOCK cleared, as a descriptor inherited across exec has them.
fn inherited_tun(name: &str, flags: libc::c_int) -> RawFd {
    let (file, _) = attach(name, flags).expect("TUNSETIFF");
    let fd = file.into_raw_fd();
    // SAFETY: fcntl on our own descriptor.
    unsafe {
        assert_eq!(libc::fcntl(fd, libc::F_SETFD, 0), 0);
        let fl = libc::fcntl(fd, libc::F_GETFL);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK), 0);
    }
    assert_eq!(fd_flags(fd), (false, false));
    fd
}

/// (close-on-exec, O_NONBLOCK) of `fd`.
fn fd_flags(fd: RawFd) -> (bool, bool) {
    // SAFETY: F_GETFD / F_GETFL take no argument.
    let (fd_flags, fl) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETFD),
            libc::fcntl(fd, libc::F_GETFL),
        )
    };
    assert!(fd_flags >= 0 && fl >= 0);
    (fd_flags & libc::FD_CLOEXEC != 0, fl & libc::O_NONBLOCK != 0)
}

#[test]
fn net_real_tap_open_by_name_and_inherited_fd_checks() {
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

        let ok = inherited_tun(
            "pbxtest1",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        // SAFETY: `ok` is ours and handed over.
        let tap = unsafe { Tap::from_fd(ok) }.expect("a good inherited tap");
        assert_eq!(tap.name(), "pbxtest1");
        assert_eq!(
            fd_flags(tap.as_raw_fd()),
            (true, true),
            "taken over: close-on-exec and non-blocking"
        );

        // (A tap opened without IFF_NO_PI is not tried: this host's kernel
        // reports IFF_NO_PI for a TAP | VNET_HDR tap anyway.)
        for (flags, missing) in [
            (libc::IFF_TAP | libc::IFF_NO_PI, "IFF_VNET_HDR"),
            (
                libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                "IFF_TAP",
            ),
        ] {
            let fd = inherited_tun("pbxtest2", flags);
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

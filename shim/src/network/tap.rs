//! The pod's tap: the host end of the guest's NIC. podbox-vmm inherits its
//! descriptor; it is not persistent, so the device goes when the last
//! descriptor (the VMM's) closes, and its qdisc and filters with it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::NetworkError;

/// The tap's name in the pod's network namespace (one pod per netns).
pub const TAP_NAME: &str = "tap0_podbox";

/// Opens a new tap `name` in the calling thread's network namespace:
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as podbox-vmm's virtio-net expects.
/// The descriptor is close-on-exec; the VMM's spawn clears that in its copy.
pub fn create(name: &str) -> Result<OwnedFd, NetworkError> {
    let error = |source: std::io::Error| NetworkError::Tap {
        name: name.to_string(),
        source,
    };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(error(std::io::Error::from_raw_os_error(libc::EINVAL)));
    }
    // SAFETY: open(2) of a constant path; the result is checked.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a descriptor just opened and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked above) and
    // stays NUL-terminated.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq passed by pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    Ok(fd)
}

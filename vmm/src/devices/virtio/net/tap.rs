//! The host side of a NIC: a tap device, opened by name in podbox-vmm's
//! network namespace or inherited as an open descriptor.
//!
//! Either way the tap must hand frames over with a 12-byte virtio-net
//! header and nothing else in front (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR),
//! and is non-blocking: the device thread waits for it with epoll.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use super::header::HDR_LEN;

/// How the device moves frames; one read or write is one frame with its
/// virtio-net header in front. [`Tap`] is the real one; tests use a fake.
pub trait Backend: AsRawFd + Send + 'static {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame; `WouldBlock` when the tap cannot take it now.
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Which offloaded frames (TUN_F_*) the backend may hand us.
    fn set_offloads(&mut self, flags: libc::c_uint) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap {name}: TUNSETIFF: {source} (does podbox-vmm have CAP_NET_ADMIN in its network namespace, and is {name} a tap without IFF_MULTI_QUEUE?)")]
    SetIff { name: String, source: io::Error },
    #[error("fd {fd}: TUNGETIFF: {source} (not a tun/tap descriptor attached to a device?)")]
    GetIff { fd: RawFd, source: io::Error },
    #[error("fd {fd} (tap {name}): {flag} is {state}; podbox-vmm needs a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    Flag {
        fd: RawFd,
        name: String,
        flag: &'static str,
        state: &'static str,
    },
    #[error("tap {name}: {what}: {source}")]
    Setup {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open tap with a 12-byte vnet header, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Flags a tap needs, with the names used in errors.
const REQUIRED_FLAGS: [(libc::c_int, &str); 3] = [
    (libc::IFF_TAP, "IFF_TAP"),
    (libc::IFF_NO_PI, "IFF_NO_PI"),
    (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
];

fn ifreq_named(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // The config crate checked the name: 1-15 bytes, no NUL.
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    req
}

fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One ioctl on `fd` with a pointer argument.
///
/// SAFETY (for callers): `arg` must point to what `req` expects.
unsafe fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller passes the argument type `req` expects.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens /dev/net/tun (non-blocking, close-on-exec) and attaches it to
/// the tap `name` with `flags` (TUNSETIFF); returns it with the name the
/// kernel reports. Tests use it for descriptors to pass to
/// [`Tap::from_fd`], flags of their choosing included.
pub(crate) fn attach(name: &str, flags: libc::c_int) -> Result<(File, String), TapError> {
    // SAFETY: a plain open of a constant path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TapError::OpenTun(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let mut req = ifreq_named(name);
    req.ifr_ifru.ifru_flags = flags as i16;
    // SAFETY: TUNSETIFF takes a struct ifreq.
    unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req) }.map_err(|source| {
        TapError::SetIff {
            name: name.to_string(),
            source,
        }
    })?;
    Ok((file, ifreq_name(&req)))
}

impl Tap {
    /// Opens (or creates) the tap `name` in this process's network namespace.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let (file, name) = attach(name, flags)?;
        let tap = Tap { file, name };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Takes over an inherited tap descriptor after checking (TUNGETIFF)
    /// that it is a tap with the flags the device needs. It is made
    /// non-blocking and close-on-exec; O_NONBLOCK lives on the open file,
    /// so whoever else holds it sees that too.
    ///
    /// # Safety
    /// `fd` must be open and owned by nothing else in this process: the
    /// returned Tap closes it.
    pub unsafe fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: TUNGETIFF fills a struct ifreq; a non-tun fd fails it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        unsafe { ioctl_ptr(fd, libc::TUNGETIFF, &mut req) }
            .map_err(|source| TapError::GetIff { fd, source })?;
        let name = ifreq_name(&req);
        // SAFETY: TUNGETIFF set the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff;
        for (flag, label) in REQUIRED_FLAGS {
            if flags & flag == 0 {
                let state = if flag == libc::IFF_TAP {
                    "not set (a tun, not a tap)"
                } else {
                    "not set"
                };
                return Err(TapError::Flag {
                    fd,
                    name,
                    flag: label,
                    state,
                });
            }
        }
        // SAFETY: the caller hands us ownership of `fd`.
        let file = unsafe { File::from_raw_fd(fd) };
        let tap = Tap { file, name };
        tap.fcntl_or(libc::F_GETFL, libc::F_SETFL, libc::O_NONBLOCK, "O_NONBLOCK")?;
        tap.fcntl_or(libc::F_GETFD, libc::F_SETFD, libc::FD_CLOEXEC, "FD_CLOEXEC")?;
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// The interface's name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Setup {
            name: self.name.clone(),
            what,
            source,
        }
    }

    fn fcntl_or(
        &self,
        get: libc::c_int,
        set: libc::c_int,
        bit: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL/F_GETFD take no argument.
        let old = unsafe { libc::fcntl(fd, get) };
        // SAFETY: F_SETFL/F_SETFD take an int.
        if old < 0 || unsafe { libc::fcntl(fd, set, old | bit) } < 0 {
            return Err(self.setup_err(what)(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The tap's vnet header is `virtio_net_hdr_v1`, 12 bytes, like the
    /// guest's, so headers pass through unchanged.
    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let mut size = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
        unsafe { ioctl_ptr(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut size) }
            .map_err(self.setup_err("TUNSETVNETHDRSZ 12"))
    }

    /// The largest of `candidates` (TUN_F_* sets, best first) this tap
    /// accepts, or 0: the kernel refuses a TUNSETOFFLOAD with any flag it
    /// does not know. The tap is left with no offloads until the guest
    /// negotiates.
    pub fn probe_offloads(&mut self, candidates: &[libc::c_uint]) -> libc::c_uint {
        let accepted = candidates
            .iter()
            .copied()
            .find(|&flags| match self.set_offloads(flags) {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!("tap {}: offloads {flags:#x} refused: {e}", self.name);
                    false
                }
            })
            .unwrap_or(0);
        if let Err(e) = self.set_offloads(0) {
            tracing::warn!("tap {}: TUNSETOFFLOAD 0: {e}", self.name);
        }
        accepted
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        self.file.read(buf)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::io::Write;
        self.file.write(buf)
    }

    fn set_offloads(&mut self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags as the argument value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

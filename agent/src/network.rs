//! UpdateInterface / UpdateRoutes for the guest's NICs, with the classic
//! SIOC* ioctls: enough for what the shim needs (one IPv4 address per
//! interface, MTU, link up, IPv4 routes) without a netlink stack. IPv6 and
//! multiple addresses are refused with a clear error.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::container::Error;

/// One IPv4 address with its prefix length.
#[derive(Debug, Clone, PartialEq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn parse(addr: &str, prefix: &str) -> Result<Ipv4Net, Error> {
        let a: Ipv4Addr = addr
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("{addr:?} is not an IPv4 address")))?;
        let p: u8 = match prefix.parse() {
            Ok(p) if p <= 32 => p,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{prefix:?} is not a prefix length 0-32"
                )))
            }
        };
        Ok(Ipv4Net { addr: a, prefix: p })
    }

    /// "default" or "a.b.c.d/len".
    pub fn parse_cidr(s: &str) -> Result<Ipv4Net, Error> {
        if s == "default" || s.is_empty() {
            return Ok(Ipv4Net {
                addr: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
            });
        }
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        Self::parse(a, p)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }
}

fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ctl_socket() -> Result<OwnedFd, Error> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::sys("socket", e))
}

fn ifreq(name: &str) -> Result<libc::ifreq, Error> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') || name.contains('/')
    {
        return Err(Error::InvalidArgument(format!(
            "bad interface name {name:?}"
        )));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(fd: &OwnedFd, req: libc::Ioctl, arg: *mut libc::c_void, what: &str) -> Result<(), Error> {
    // SAFETY: every caller passes a pointer to the struct `req` expects.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
        return Err(Error::sys(what.to_string(), nix::errno::Errno::last()));
    }
    Ok(())
}

/// Sets address, MTU and brings `name` up.
pub fn configure_interface(name: &str, addrs: &[Ipv4Net], mtu: u64) -> Result<(), Error> {
    if addrs.len() > 1 {
        return Err(Error::Unsupported(
            "more than one IPv4 address per interface".into(),
        ));
    }
    let fd = ctl_socket()?;
    if mtu > 0 {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_mtu = i32::try_from(mtu)
            .map_err(|_| Error::InvalidArgument(format!("mtu {mtu} too large")))?;
        ioctl(
            &fd,
            libc::SIOCSIFMTU,
            &mut r as *mut _ as *mut _,
            &format!("set mtu of {name}"),
        )?;
    }
    for a in addrs {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr(a.addr);
        ioctl(
            &fd,
            libc::SIOCSIFADDR,
            &mut r as *mut _ as *mut _,
            &format!("set address of {name}"),
        )?;
        r.ifr_ifru.ifru_addr = sockaddr(a.netmask());
        ioctl(
            &fd,
            libc::SIOCSIFNETMASK,
            &mut r as *mut _ as *mut _,
            &format!("set netmask of {name}"),
        )?;
    }
    let mut r = ifreq(name)?;
    ioctl(
        &fd,
        libc::SIOCGIFFLAGS,
        &mut r as *mut _ as *mut _,
        &format!("get flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS,
        &mut r as *mut _ as *mut _,
        &format!("bring {name} up"),
    )
}

/// Adds one IPv4 route; an existing identical route is not an error.
pub fn add_route(dest: &Ipv4Net, gateway: Option<Ipv4Addr>, device: &str) -> Result<(), Error> {
    let fd = ctl_socket()?;
    // SAFETY: rtentry is plain data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(dest.addr);
    rt.rt_genmask = sockaddr(dest.netmask());
    rt.rt_flags = libc::RTF_UP;
    if let Some(gw) = gateway {
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    let dev = CString::new(device)
        .map_err(|_| Error::InvalidArgument("device name contains NUL".into()))?;
    if !device.is_empty() {
        rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    }
    match ioctl(
        &fd,
        libc::SIOCADDRT,
        &mut rt as *mut _ as *mut _,
        "add route",
    ) {
        Err(Error::Sys {
            source: nix::errno::Errno::EEXIST,
            ..
        }) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(
            Ipv4Net::parse("10.0.0.2", "24").unwrap().netmask(),
            Ipv4Addr::new(255, 255, 255, 0)
        );
        assert_eq!(
            Ipv4Net::parse_cidr("default").unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        assert!(Ipv4Net::parse("fe80::1", "64").is_err());
        assert!(Ipv4Net::parse("10.0.0.1", "33").is_err());
    }
}

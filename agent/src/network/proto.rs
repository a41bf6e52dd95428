//! The network messages of the agent protocol <-> typed values. Everything
//! that can be checked without the kernel is checked here, and every error is
//! INVALID_ARGUMENT naming the field (`interface.ip_addresses[1].mask`,
//! `routes[0].gateway`, ...).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podbox_protocol::agent::{
    IPAddress, Interface, Route, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};

use crate::container::Error;

use super::apply::Configured;

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Six two-digit hex octets separated by colons ("aa:bb:cc:dd:ee:ff",
    /// either case).
    pub fn parse(s: &str) -> Option<Mac> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in mac.iter_mut() {
            let part = parts.next()?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *octet = u8::from_str_radix(part, 16).ok()?;
        }
        match parts.next() {
            None => Some(Mac(mac)),
            Some(_) => None,
        }
    }

    /// The MAC of an interface as netlink reports it (None unless 6 bytes).
    pub fn from_bytes(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An address with its prefix length (an interface address or a network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// The network part (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.ip {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// How UpdateInterface finds the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkSelector {
    /// `interface.hw_addr`.
    Mac(Mac),
    /// `interface.device`, else `interface.name` (`field` says which).
    Name { name: String, field: &'static str },
}

/// An UpdateInterface request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub select: LinkSelector,
    /// The name the interface must have (renamed if it differs).
    pub name: Option<String>,
    /// None: leave the MTU as it is.
    pub mtu: Option<u32>,
    /// Added (an address already there is replaced); addresses the request
    /// does not name are left alone.
    pub addresses: Vec<IpNet>,
}

/// One route of an UpdateRoutes request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Its position in the request (`routes[index]` in messages).
    pub index: usize,
    /// None: the default route.
    pub destination: Option<IpNet>,
    /// None: the destination is on the link (a link-scope route).
    pub gateway: Option<IpAddr>,
    /// The output interface by name; None only with a gateway.
    pub device: Option<String>,
    pub ipv6: bool,
}

impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "routes[{}] (", self.index)?;
        match &self.destination {
            Some(d) => write!(f, "{d}")?,
            None if self.ipv6 => write!(f, "default (IPv6)")?,
            None => write!(f, "default")?,
        }
        if let Some(g) = &self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(d) = &self.device {
            write!(f, " dev {d}")?;
        }
        write!(f, ")")
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

fn family(field: &str, s: &str) -> Result<Family, Error> {
    match s {
        "" | "inet" | "4" => Ok(Family::V4),
        "inet6" | "6" => Ok(Family::V6),
        _ => Err(invalid(format!(
            "{field} {s:?} is not \"inet\" (IPv4) or \"inet6\" (IPv6)"
        ))),
    }
}

fn prefix(field: &str, s: &str, family: Family) -> Result<u8, Error> {
    let max = family.max_prefix();
    match s.parse::<u8>() {
        // parse::<u8> takes a leading '+'; a prefix length is digits only.
        Ok(p) if p <= max && s.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(invalid(format!(
            "{field} {s:?} is not a prefix length 0-{max} ({family})"
        ))),
    }
}

/// An interface's own address: unicast, of `family`.
fn interface_address(
    field: &str,
    s: &str,
    family: Family,
    family_field: &str,
) -> Result<IpAddr, Error> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| invalid(format!("{field} {s:?} is not an {family} address")))?;
    if Family::of(&ip) != family {
        return Err(invalid(format!(
            "{field} {ip} is not an {family} address ({family_field} says {family})"
        )));
    }
    let unicast = match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    };
    if !unicast {
        return Err(invalid(format!("{field} {ip} is not a unicast address")));
    }
    Ok(ip)
}

/// An interface name the kernel would take (dev_valid_name).
fn interface_name(field: &str, s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() < libc::IFNAMSIZ
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if !ok {
        return Err(invalid(format!(
            "{field} {s:?} is not an interface name (1-{} characters, no '/', ':' or spaces)",
            libc::IFNAMSIZ - 1
        )));
    }
    Ok(s.to_string())
}

/// Checks an UpdateInterface request.
pub fn parse_interface(r: &UpdateInterfaceRequest) -> Result<InterfaceConfig, Error> {
    let i = r
        .interface
        .as_ref()
        .ok_or_else(|| invalid("interface is missing".into()))?;
    let device = match i.device.as_str() {
        "" => None,
        d => Some(interface_name("interface.device", d)?),
    };
    let name = match i.name.as_str() {
        "" => None,
        n => Some(interface_name("interface.name", n)?),
    };
    let select = if !i.hw_addr.is_empty() {
        LinkSelector::Mac(Mac::parse(&i.hw_addr).ok_or_else(|| {
            invalid(format!(
                "interface.hw_addr {:?} is not a MAC address like aa:bb:cc:dd:ee:ff",
                i.hw_addr
            ))
        })?)
    } else if let Some(device) = device {
        LinkSelector::Name {
            name: device,
            field: "interface.device",
        }
    } else if let Some(name) = &name {
        LinkSelector::Name {
            name: name.clone(),
            field: "interface.name",
        }
    } else {
        return Err(invalid(
            "interface: none of hw_addr, device and name is set".into(),
        ));
    };
    let mtu = match i.mtu {
        0 => None,
        m => Some(
            u32::try_from(m)
                .map_err(|_| invalid(format!("interface.mtu {m} is above {}", u32::MAX)))?,
        ),
    };
    let mut addresses = Vec::with_capacity(i.ip_addresses.len());
    for (n, a) in i.ip_addresses.iter().enumerate() {
        let field = |f: &str| format!("interface.ip_addresses[{n}].{f}");
        let fam = family(&field("family"), &a.family)?;
        let ip = interface_address(&field("address"), &a.address, fam, &field("family"))?;
        let prefix = prefix(&field("mask"), &a.mask, fam)?;
        addresses.push(IpNet { ip, prefix });
    }
    Ok(InterfaceConfig {
        select,
        name,
        mtu,
        addresses,
    })
}

/// "default" (or empty), "a.b.c.d/len", "x::/len", or a bare address (a
/// host route, /32 or /128).
fn destination(field: &str, s: &str) -> Result<Option<IpNet>, Error> {
    if s.is_empty() || s == "default" {
        return Ok(None);
    }
    let (address, length) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = address.parse().map_err(|_| {
        invalid(format!(
            "{field} {s:?} is not \"default\" or a network such as 10.0.0.0/8 or fd00::/64"
        ))
    })?;
    let fam = Family::of(&ip);
    let prefix = match length {
        None => fam.max_prefix(),
        Some(l) => prefix(field, l, fam)?,
    };
    let net = IpNet { ip, prefix };
    if net.network() != ip {
        return Err(invalid(format!(
            "{field} {s:?} has host bits set (the network is {}/{prefix})",
            net.network()
        )));
    }
    Ok(Some(net))
}

/// Checks an UpdateRoutes request (no `routes` at all is an empty list).
pub fn parse_routes(r: &UpdateRoutesRequest) -> Result<Vec<RouteConfig>, Error> {
    let Some(routes) = r.routes.as_ref() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(routes.routes.len());
    for (n, route) in routes.routes.iter().enumerate() {
        let field = |f: &str| format!("routes[{n}].{f}");
        let destination = destination(&field("dest"), &route.dest)?;
        let gateway = match route.gateway.as_str() {
            "" => None,
            g => {
                let ip: IpAddr = g.parse().map_err(|_| {
                    invalid(format!("{} {g:?} is not an IP address", field("gateway")))
                })?;
                if ip.is_unspecified() || ip.is_multicast() {
                    return Err(invalid(format!(
                        "{} {ip} is not a unicast address",
                        field("gateway")
                    )));
                }
                Some(ip)
            }
        };
        if let (Some(d), Some(g)) = (&destination, &gateway) {
            if Family::of(&d.ip) != Family::of(g) {
                return Err(invalid(format!(
                    "{} {g} is {} but {} {d} is {}",
                    field("gateway"),
                    Family::of(g),
                    field("dest"),
                    Family::of(&d.ip)
                )));
            }
        }
        let device = match route.device.as_str() {
            "" => None,
            d => Some(interface_name(&field("device"), d)?),
        };
        if device.is_none() && gateway.is_none() {
            return Err(invalid(format!(
                "routes[{n}]: a route without a gateway needs a device"
            )));
        }
        // "default" takes its family from the gateway; without one it is
        // IPv4 (an IPv6 default route on the link is "::/0").
        let ipv6 = destination
            .map(|d| d.ip.is_ipv6())
            .or(gateway.map(|g| g.is_ipv6()))
            .unwrap_or(false);
        out.push(RouteConfig {
            index: n,
            destination,
            gateway,
            device,
            ipv6,
        });
    }
    Ok(out)
}

/// The reply to UpdateInterface: the interface as the kernel now has it.
pub fn to_interface(c: &Configured) -> Interface {
    Interface {
        device: c.name.clone(),
        name: c.name.clone(),
        ip_addresses: c
            .addresses
            .iter()
            .map(|a| IPAddress::from_ip(a.ip, a.prefix))
            .collect(),
        mtu: u64::from(c.mtu),
        hw_addr: c.mac.map(|m| m.to_string()).unwrap_or_default(),
        ..Default::default()
    }
}

/// The reply to UpdateRoutes: the routes in the order they were applied.
pub fn to_routes(applied: &[RouteConfig]) -> Routes {
    Routes {
        routes: applied
            .iter()
            .map(|r| Route {
                dest: r
                    .destination
                    .map(|d| d.to_string())
                    .unwrap_or_else(|| "default".into()),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: r.device.clone().unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

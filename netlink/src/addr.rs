//! Interface addresses (IPv4 and IPv6).

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::{Error, Netlink};

/// One address of an interface with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
    /// Link-local (fe80::/10, 169.254/16 by scope): the kernel makes those
    /// itself on each side, so podbox never copies them.
    pub link_local: bool,
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Every address of the socket's network namespace.
pub fn addresses(nl: &mut Netlink) -> Result<Vec<Address>, Error> {
    let replies = nl.dump(
        "list addresses",
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
    )?;
    let mut out = Vec::new();
    for reply in &replies {
        let RouteNetlinkMessage::NewAddress(m) = reply else {
            continue;
        };
        // IFA_LOCAL is the interface's own address on point-to-point links;
        // IFA_ADDRESS is it everywhere else.
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            out.push(Address {
                index: m.header.index,
                ip,
                prefix: m.header.prefix_len,
                link_local: m.header.scope == AddressScope::Link,
            });
        }
    }
    Ok(out)
}

/// Adds `ip/prefix` to interface `index`; the same address already there is
/// replaced, not an error.
pub fn add_address(nl: &mut Netlink, index: u32, ip: IpAddr, prefix: u8) -> Result<(), Error> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(Error::Unexpected {
            what: format!("add address {ip}/{prefix}"),
            detail: format!("the prefix length is above {max}"),
        });
    }
    let mut request = AddressMessage::default();
    request.header.family = family(&ip);
    request.header.prefix_len = prefix;
    request.header.index = index;
    request.attributes.push(AddressAttribute::Local(ip));
    request.attributes.push(AddressAttribute::Address(ip));
    // IPv4 subnets get their broadcast address (as `ip addr add ... brd +`
    // does): the CNI side has one, so broadcasts in the pod's subnet work.
    if let IpAddr::V4(v4) = ip {
        if prefix < 31 {
            let host_bits = u32::MAX >> prefix;
            let broadcast = std::net::Ipv4Addr::from(u32::from(v4) | host_bits);
            request
                .attributes
                .push(AddressAttribute::Broadcast(broadcast));
        }
    }
    nl.change(
        &format!("add address {ip}/{prefix} to interface {index}"),
        RouteNetlinkMessage::NewAddress(request),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

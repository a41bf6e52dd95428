//! Routes of the main table (IPv4 and IPv6).

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::{Error, Netlink};

/// A unicast route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network; `None` is the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub device: Option<u32>,
    /// Link scope: the destination is on the link (no gateway).
    pub link_scope: bool,
    pub ipv6: bool,
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn from_message(m: &RouteMessage) -> Option<Route> {
    let main = u32::from(RouteHeader::RT_TABLE_MAIN);
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != main || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut route = Route {
        destination: None,
        gateway: None,
        device: None,
        link_scope: m.header.scope == RouteScope::Link,
        ipv6: m.header.address_family == AddressFamily::Inet6,
    };
    for attribute in &m.attributes {
        match attribute {
            RouteAttribute::Destination(d) => {
                route.destination = ip(d).map(|a| (a, m.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => route.gateway = ip(g),
            RouteAttribute::Oif(i) => route.device = Some(*i),
            _ => {}
        }
    }
    Some(route)
}

/// The unicast routes of the main table, IPv4 and IPv6.
pub fn routes(nl: &mut Netlink) -> Result<Vec<Route>, Error> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        let replies = nl.dump("list routes", RouteNetlinkMessage::GetRoute(request))?;
        out.extend(replies.iter().filter_map(|r| match r {
            RouteNetlinkMessage::NewRoute(m) => from_message(m),
            _ => None,
        }));
    }
    Ok(out)
}

/// Adds (or replaces) `route` in the main table.
pub fn add_route(nl: &mut Netlink, route: &Route) -> Result<(), Error> {
    let what = format!("add route {route:?}");
    let family_of = |a: &IpAddr| {
        if a.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        }
    };
    let family = route
        .destination
        .map(|(a, _)| family_of(&a))
        .or(route.gateway.as_ref().map(family_of))
        .unwrap_or(if route.ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        });
    let mut request = RouteMessage::default();
    request.header.address_family = family;
    request.header.table = RouteHeader::RT_TABLE_MAIN;
    request.header.protocol = RouteProtocol::Boot;
    request.header.kind = RouteType::Unicast;
    request.header.scope = if route.link_scope {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    if let Some((destination, prefix)) = route.destination {
        if family_of(&destination) != family {
            return Err(Error::Unexpected {
                what,
                detail: "destination and gateway are of different families".into(),
            });
        }
        request.header.destination_prefix_length = prefix;
        request
            .attributes
            .push(RouteAttribute::Destination(destination.into()));
    }
    if let Some(gateway) = route.gateway {
        if family_of(&gateway) != family {
            return Err(Error::Unexpected {
                what,
                detail: "destination and gateway are of different families".into(),
            });
        }
        request
            .attributes
            .push(RouteAttribute::Gateway(gateway.into()));
    }
    if let Some(device) = route.device {
        request.attributes.push(RouteAttribute::Oif(device));
    }
    nl.change(
        &what,
        RouteNetlinkMessage::NewRoute(request),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

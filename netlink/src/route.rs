//! Routes of the main table (IPv4 and IPv6).

use std::fmt;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RoutePreference,
    RouteProtocol, RouteScope, RouteType,
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

/// The local table (`ip route show table local`): the kernel's own routes
/// to the netns' addresses, made and removed with them.
const RT_TABLE_LOCAL: u32 = 255;

/// A route of the netns as the kernel lists it: the [`Route`] podbox can
/// copy, and what that copy would leave out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRoute {
    /// Destination, gateway, device and scope. For a multipath route,
    /// `device` and `gateway` are None: see `nexthops`.
    pub route: Route,
    /// In the main table, of type unicast: the routes [`routes`] returns.
    pub main_unicast: bool,
    /// Made by the kernel for an address (`proto kernel`): whoever adds the
    /// address gets it again, with its metric and source.
    pub kernel: bool,
    /// The next hops of a multipath route: gateway, interface index.
    pub nexthops: Vec<(Option<IpAddr>, u32)>,
    /// What `route` leaves out, as `ip route` words it ("table 100", "type
    /// blackhole", "metric 100", "src 10.0.0.5", "mtu 1400", "encap ...");
    /// the default metric, and a kernel route's metric and source, are not
    /// counted. Empty: `route` is all of it (multipath aside).
    pub lost: Vec<String>,
}

impl ListedRoute {
    /// Roughly `ip route`'s form, with `name` naming the interfaces:
    /// "10.1.0.0/16 via 10.0.0.1 dev eth0 metric 100".
    pub fn describe(&self, name: impl Fn(u32) -> String) -> String {
        let r = &self.route;
        let mut out = match r.destination {
            Some((ip, prefix)) => format!("{ip}/{prefix}"),
            None if r.ipv6 => "default (IPv6)".to_string(),
            None => "default".to_string(),
        };
        if let Some(g) = r.gateway {
            out += &format!(" via {g}");
        }
        if let Some(d) = r.device {
            out += &format!(" dev {}", name(d));
        }
        for (gateway, device) in &self.nexthops {
            out += " nexthop";
            if let Some(g) = gateway {
                out += &format!(" via {g}");
            }
            out += &format!(" dev {}", name(*device));
        }
        for lost in &self.lost {
            out += &format!(" {lost}");
        }
        out
    }
}

impl fmt::Display for ListedRoute {
    /// [`ListedRoute::describe`] with interfaces by index.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(|index| index.to_string()))
    }
}

fn metric(m: &RouteMetric) -> String {
    match m {
        RouteMetric::Mtu(v) => format!("mtu {v}"),
        RouteMetric::Advmss(v) => format!("advmss {v}"),
        RouteMetric::Hoplimit(v) => format!("hoplimit {v}"),
        RouteMetric::InitCwnd(v) => format!("initcwnd {v}"),
        RouteMetric::InitRwnd(v) => format!("initrwnd {v}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn from_message(m: &RouteMessage) -> Option<ListedRoute> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table == RT_TABLE_LOCAL {
        return None;
    }
    let ipv6 = m.header.address_family == AddressFamily::Inet6;
    let kernel = m.header.protocol == RouteProtocol::Kernel;
    let mut listed = ListedRoute {
        route: Route {
            destination: None,
            gateway: None,
            device: None,
            link_scope: m.header.scope == RouteScope::Link,
            ipv6,
        },
        main_unicast: table == u32::from(RouteHeader::RT_TABLE_MAIN)
            && m.header.kind == RouteType::Unicast,
        kernel,
        nexthops: Vec::new(),
        lost: Vec::new(),
    };
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        listed.lost.push(format!("table {table}"));
    }
    if m.header.kind != RouteType::Unicast {
        listed
            .lost
            .push(format!("type {:?}", m.header.kind).to_lowercase());
    }
    // IPv6 routes always carry a metric: 1024 unless set (ip6_route_add).
    let default_metric = if ipv6 { 1024 } else { 0 };
    for attribute in &m.attributes {
        match attribute {
            RouteAttribute::Destination(d) => {
                listed.route.destination = ip(d).map(|a| (a, m.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => listed.route.gateway = ip(g),
            RouteAttribute::Oif(i) => listed.route.device = Some(*i),
            RouteAttribute::MultiPath(hops) => {
                listed.nexthops = hops
                    .iter()
                    .map(|hop| {
                        let gateway = hop.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => ip(g),
                            _ => None,
                        });
                        (gateway, hop.interface_index)
                    })
                    .collect()
            }
            RouteAttribute::Priority(p) if !kernel && *p != default_metric => {
                listed.lost.push(format!("metric {p}"))
            }
            RouteAttribute::PrefSource(a) if !kernel => {
                if let Some(a) = ip(a) {
                    listed.lost.push(format!("src {a}"));
                }
            }
            RouteAttribute::Source(a) => {
                if let Some(a) = ip(a) {
                    listed
                        .lost
                        .push(format!("from {a}/{}", m.header.source_prefix_length));
                }
            }
            RouteAttribute::Metrics(metrics) => {
                listed.lost.extend(metrics.iter().map(metric));
            }
            RouteAttribute::Preference(p)
                if !matches!(p, RoutePreference::Medium | RoutePreference::Invalid) =>
            {
                listed.lost.push(format!("pref {p:?}").to_lowercase())
            }
            RouteAttribute::EncapType(t) => listed.lost.push(format!("encap {t}")),
            RouteAttribute::Via(_) => listed.lost.push("via (another family)".into()),
            RouteAttribute::Realm(_) => listed.lost.push("realm".into()),
            _ => {}
        }
    }
    Some(listed)
}

/// Every route of the netns but the local table's (the kernel's own, for
/// its addresses), IPv4 and IPv6, with what [`Route`] cannot carry.
pub fn list_routes(nl: &mut Netlink) -> Result<Vec<ListedRoute>, Error> {
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

/// The unicast routes of the main table, IPv4 and IPv6, as [`Route`]s
/// (metrics, sources and multipath next hops left out: see [`list_routes`]).
pub fn routes(nl: &mut Netlink) -> Result<Vec<Route>, Error> {
    Ok(list_routes(nl)?
        .into_iter()
        .filter(|r| r.main_unicast)
        .map(|r| r.route)
        .collect())
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

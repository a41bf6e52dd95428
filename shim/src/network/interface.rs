//! What CNI set up in the pod's netns, and the guest's copy of it: which
//! interface is the pod's, its MAC, MTU, addresses and routes, and the
//! agent's UpdateInterface / UpdateRoutes messages built from them. Pure:
//! the netlink reads are in the caller.

use std::net::IpAddr;

use podbox_netlink::addr::Address;
use podbox_netlink::link::Link;
use podbox_netlink::route::{ListedRoute, Route};
use podbox_protocol::agent::{
    IPAddress, Interface, Route as AgentRoute, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use podbox_vmm_config::MacAddr;

use super::tap::TAP_NAME;
use super::NetworkError;

/// The guest's NIC: the name the pod's containers see, as under runc.
pub const GUEST_NIC: &str = "eth0";
/// The interface CNI makes, preferred where there are several.
const CNI_NAME: &str = "eth0";

/// The pod's interface in its netns, as CNI left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInterface {
    pub index: u32,
    pub name: String,
    pub mac: MacAddr,
    pub mtu: u32,
    /// Not link-local (the guest's kernel makes those itself).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes through it, in the kernel's order. The agent owns their order
    /// and scope (on-link routes first, so a gateway is reachable when the
    /// route through it is added; link scope for IPv4 routes without a
    /// gateway): UpdateRoutes must work in any order from any client, so
    /// the agent has to do it anyway, and doing it here as well would be two
    /// places to keep in step.
    pub routes: Vec<Route>,
    /// The netns' routes the guest does not get, or gets without some of
    /// their attributes, one sentence each (the caller logs them).
    pub route_warnings: Vec<String>,
}

/// The pod's interface among the netns' interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice<'a> {
    pub link: &'a Link,
    /// The other interfaces that could have been the pod's (Multus' net1,
    /// ...): they do not reach the VM.
    pub ignored: Vec<&'a str>,
}

/// The pod's interface among `links`: the one Ethernet interface other than
/// loopback (and podbox's own tap), `eth0` if there are several. None: the
/// pod has loopback only. An interface without an Ethernet address
/// (wireguard, tun, ipip) that is up, where there is no Ethernet one, is an
/// error: the VM's NIC cannot stand in for it, and booting the pod without
/// its network would fail it silently. MAC-less interfaces that are down are
/// passed over: the kernel makes fallback tunnels (tunl0, sit0, ip6tnl0,
/// gre0) down in every netns while their modules are loaded, and CNI brings
/// the pod's interface up.
pub fn choose(links: &[Link]) -> Result<Option<Choice<'_>>, NetworkError> {
    let others: Vec<&Link> = links
        .iter()
        .filter(|l| !l.loopback && l.name != TAP_NAME)
        .collect();
    let (ethernet, macless): (Vec<&Link>, Vec<&Link>) =
        others.iter().partition(|l| l.mac.len() == 6);
    let macless_up: Vec<&Link> = macless.into_iter().filter(|l| l.up).collect();
    let chosen = match ethernet.as_slice() {
        [] => {
            return match macless_up.first() {
                None => Ok(None),
                Some(l) => Err(NetworkError::NoMac {
                    name: l.name.clone(),
                    kind: kind(l),
                }),
            }
        }
        [one] => *one,
        several => several
            .iter()
            .find(|l| l.name == CNI_NAME)
            .copied()
            .ok_or_else(|| NetworkError::AmbiguousInterface {
                names: several.iter().map(|l| l.name.clone()).collect(),
            })?,
    };
    let ignored = ethernet
        .iter()
        .chain(&macless_up)
        .filter(|l| l.index != chosen.index)
        .map(|l| l.name.as_str())
        .collect();
    Ok(Some(Choice {
        link: chosen,
        ignored,
    }))
}

/// "wireguard", or what podbox knows of an interface without a kind.
fn kind(link: &Link) -> String {
    link.kind
        .clone()
        .unwrap_or_else(|| "no rtnetlink kind".into())
}

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// `link` with its addresses and the routes through it, from the netns'
/// full lists (`links` names the interfaces in warnings).
pub fn describe(
    link: &Link,
    links: &[Link],
    addresses: &[Address],
    routes: &[ListedRoute],
) -> Result<CniInterface, NetworkError> {
    let mac = <[u8; 6]>::try_from(link.mac.as_slice())
        .map(MacAddr)
        .map_err(|_| NetworkError::NoMac {
            name: link.name.clone(),
            kind: kind(link),
        })?;
    let addresses = addresses
        .iter()
        .filter(|a| a.index == link.index && !a.link_local && !is_link_local_v6(&a.ip))
        .map(|a| (a.ip, a.prefix))
        .collect();
    let name = |index: u32| {
        links
            .iter()
            .find(|l| l.index == index)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("interface {index}"))
    };
    let mut copied = Vec::new();
    let mut route_warnings = Vec::new();
    for r in routes {
        // The guest's kernel makes fe80::/64 on its NIC itself.
        if r.route
            .destination
            .is_some_and(|(ip, _)| is_link_local_v6(&ip))
        {
            continue;
        }
        let shown = r.describe(name);
        if r.route.device != Some(link.index) && !r.nexthops.iter().any(|(_, d)| *d == link.index) {
            let loopback = |index| links.iter().any(|l| l.index == index && l.loopback);
            match r.route.device {
                // The guest has its own lo (and ::1's route); the kernel's
                // routes for another interface's addresses go with that
                // interface, which choose() names.
                Some(d) if loopback(d) || r.kernel => {}
                Some(d) => route_warnings.push(format!(
                    "route {shown} is not copied to the guest: it goes through {}, which the VM does not get (only {}'s routes are copied)",
                    name(d),
                    link.name
                )),
                None => route_warnings.push(format!(
                    "route {shown} is not copied to the guest (only unicast routes through {} are)",
                    link.name
                )),
            }
            continue;
        }
        if !r.nexthops.is_empty() {
            route_warnings.push(format!(
                "multipath route {shown} is not copied to the guest (podbox copies single-path routes through {})",
                link.name
            ));
        } else if !r.main_unicast {
            route_warnings.push(format!(
                "route {shown} is not copied to the guest (podbox copies the main table's unicast routes)"
            ));
        } else {
            if !r.lost.is_empty() {
                route_warnings.push(format!(
                    "route {shown} is copied to the guest without {} (podbox copies destination, gateway and device)",
                    r.lost.join(", ")
                ));
            }
            copied.push(r.route.clone());
        }
    }
    Ok(CniInterface {
        index: link.index,
        name: link.name.clone(),
        mac,
        mtu: link.mtu,
        addresses,
        routes: copied,
        route_warnings,
    })
}

impl CniInterface {
    /// The guest's NIC as the pod's interface: same MAC, MTU and addresses
    /// (the agent finds the NIC by the MAC).
    pub fn update_interface(&self) -> UpdateInterfaceRequest {
        let ip_addresses = self
            .addresses
            .iter()
            .map(|(ip, prefix)| IPAddress::from_ip(*ip, *prefix))
            .collect();
        UpdateInterfaceRequest {
            interface: Some(Interface {
                device: GUEST_NIC.into(),
                name: GUEST_NIC.into(),
                ip_addresses,
                mtu: u64::from(self.mtu),
                hw_addr: self.mac.to_string(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }

    /// The routes through the pod's interface, through the guest's NIC.
    pub fn update_routes(&self) -> UpdateRoutesRequest {
        let routes = self
            .routes
            .iter()
            .map(|r| AgentRoute {
                dest: match r.destination {
                    Some((ip, prefix)) => format!("{ip}/{prefix}"),
                    None => "default".into(),
                },
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: GUEST_NIC.into(),
                ..Default::default()
            })
            .collect();
        UpdateRoutesRequest {
            routes: Some(Routes {
                routes,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        }
    }
}

//! What CNI set up in the pod's netns, and the guest's copy of it: which
//! interface is the pod's, its MAC, MTU, addresses and routes, and the
//! agent's UpdateInterface / UpdateRoutes messages built from them. Pure:
//! the netlink reads are in the caller.

use std::net::IpAddr;

use podbox_netlink::addr::Address;
use podbox_netlink::link::Link;
use podbox_netlink::route::Route;
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
    /// Routes through it, on-link ones first (a gateway must be reachable
    /// before a route through it can be added).
    pub routes: Vec<Route>,
}

/// The pod's interface among `links`: the one Ethernet interface other than
/// loopback (and podbox's own tap), `eth0` if there are several. None: the
/// pod has loopback only.
pub fn choose(links: &[Link]) -> Result<Option<&Link>, NetworkError> {
    let candidates: Vec<&Link> = links
        .iter()
        .filter(|l| !l.loopback && l.name != TAP_NAME && l.mac.len() == 6)
        .collect();
    match candidates.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        several => several
            .iter()
            .find(|l| l.name == CNI_NAME)
            .copied()
            .map(Some)
            .ok_or_else(|| NetworkError::AmbiguousInterface {
                names: several.iter().map(|l| l.name.clone()).collect(),
            }),
    }
}

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// `link` with its addresses and the routes through it, from the netns'
/// full lists.
pub fn describe(
    link: &Link,
    addresses: &[Address],
    routes: &[Route],
) -> Result<CniInterface, NetworkError> {
    let mac = <[u8; 6]>::try_from(link.mac.as_slice())
        .map(MacAddr)
        .map_err(|_| NetworkError::NoMac(link.name.clone()))?;
    let addresses = addresses
        .iter()
        .filter(|a| a.index == link.index && !a.link_local && !is_link_local_v6(&a.ip))
        .map(|a| (a.ip, a.prefix))
        .collect();
    let mut routes: Vec<Route> = routes
        .iter()
        .filter(|r| r.device == Some(link.index))
        .filter(|r| !r.destination.is_some_and(|(ip, _)| is_link_local_v6(&ip)))
        .cloned()
        .collect();
    // Stable: on-link routes first, each group in the kernel's order.
    routes.sort_by_key(|r| r.gateway.is_some());
    Ok(CniInterface {
        index: link.index,
        name: link.name.clone(),
        mac,
        mtu: link.mtu,
        addresses,
        routes,
    })
}

impl CniInterface {
    /// The guest's NIC as the pod's interface: same MAC, MTU and addresses
    /// (the agent finds the NIC by the MAC).
    pub fn update_interface(&self) -> UpdateInterfaceRequest {
        let ip_addresses = self
            .addresses
            .iter()
            .map(|(ip, prefix)| IPAddress {
                family: if ip.is_ipv4() { "inet" } else { "inet6" }.into(),
                address: ip.to_string(),
                mask: prefix.to_string(),
                ..Default::default()
            })
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

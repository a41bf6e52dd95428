//! The netlink work of UpdateInterface / UpdateRoutes, on the values `proto`
//! checked. Everything that can be known before the first change (the
//! interface, a name clash, the devices of the routes, IPv6 support) is
//! looked up first, so a request that cannot work changes nothing; a change
//! the kernel then refuses fails the call with the step and field named and
//! leaves the earlier steps in place (the shim fails the pod on any error).

use std::path::Path;

use podbox_netlink::addr;
use podbox_netlink::link::{self, Link, LinkChange};
use podbox_netlink::route;
use podbox_netlink::Netlink;

use crate::container::Error;

use super::proto::{InterfaceConfig, IpNet, LinkSelector, Mac, RouteConfig};

/// What the guest kernel says when it was built without IPv6.
const NO_IPV6: &str = "the guest kernel has no IPv6";

/// An interface after UpdateInterface, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Its addresses, less the link-local ones the kernel made itself.
    pub addresses: Vec<IpNet>,
}

/// A netlink error as an agent error with `context` (the step, and the
/// request field it comes from).
fn kernel(context: impl Into<String>, e: podbox_netlink::Error) -> Error {
    let context = context.into();
    if e.errno() == Some(libc::EAFNOSUPPORT) {
        return Error::Unsupported(format!("{context}: {NO_IPV6} ({e})"));
    }
    match e {
        podbox_netlink::Error::Kernel { what, source } => {
            Error::io(format!("{context} (netlink {what})"), source)
        }
        other => Error::io(context, std::io::Error::other(other.to_string())),
    }
}

/// "lo, eth0 (aa:bb:cc:dd:ee:ff)": the interfaces, for NotFound messages.
fn present(all: &[Link]) -> String {
    let names: Vec<String> = all
        .iter()
        .map(|l| match Mac::from_bytes(&l.mac).filter(|_| !l.loopback) {
            Some(mac) => format!("{} ({mac})", l.name),
            None => l.name.clone(),
        })
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn find<'a>(all: &'a [Link], select: &LinkSelector) -> Result<&'a Link, Error> {
    match select {
        LinkSelector::Mac(mac) => {
            let hits: Vec<&Link> = all
                .iter()
                .filter(|l| !l.loopback && l.mac == mac.0)
                .collect();
            match hits.as_slice() {
                [one] => Ok(one),
                [] => Err(Error::NotFound(format!(
                    "interface with MAC {mac} (interface.hw_addr; the guest has: {})",
                    present(all)
                ))),
                several => Err(Error::FailedPrecondition(format!(
                    "interface.hw_addr {mac}: {} interfaces have that MAC ({})",
                    several.len(),
                    several
                        .iter()
                        .map(|l| l.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
        LinkSelector::Name { name, field } => {
            all.iter().find(|l| l.name == *name).ok_or_else(|| {
                Error::NotFound(format!(
                    "interface {name:?} ({field}; the guest has: {})",
                    present(all)
                ))
            })
        }
    }
}

/// Whether the kernel has IPv6: /proc/sys/net/ipv6 exists when it is built
/// in (or loaded). Where /proc/sys/net is not there to ask, the kernel
/// answers instead (EAFNOSUPPORT, mapped to the same error).
fn kernel_has_ipv6() -> bool {
    Path::new("/proc/sys/net/ipv6").exists() || !Path::new("/proc/sys/net").exists()
}

/// A netlink socket in the agent's network namespace (the guest's NICs).
pub struct Nic {
    nl: Netlink,
    ipv6: bool,
}

impl Nic {
    pub fn open() -> Result<Nic, Error> {
        let nl = Netlink::open().map_err(|e| kernel("open a netlink socket", e))?;
        Ok(Nic {
            nl,
            ipv6: kernel_has_ipv6(),
        })
    }

    /// For tests: act as on a kernel with or without IPv6.
    #[cfg(test)]
    pub(crate) fn assume_ipv6(mut self, ipv6: bool) -> Nic {
        self.ipv6 = ipv6;
        self
    }

    fn links(&mut self) -> Result<Vec<Link>, Error> {
        link::links(&mut self.nl).map_err(|e| kernel("list the guest's interfaces", e))
    }

    fn set(&mut self, index: u32, change: LinkChange, context: String) -> Result<(), Error> {
        link::set_link(&mut self.nl, index, &change).map_err(|e| kernel(context, e))
    }

    /// UpdateInterface: finds the interface, renames it (down while it is
    /// renamed), sets the MTU, adds the addresses and brings it up.
    pub fn configure_interface(&mut self, c: &InterfaceConfig) -> Result<Configured, Error> {
        if !self.ipv6 {
            if let Some((n, a)) = c.addresses.iter().enumerate().find(|(_, a)| a.ip.is_ipv6()) {
                return Err(Error::Unsupported(format!(
                    "interface.ip_addresses[{n}] {a}: {NO_IPV6}"
                )));
            }
        }
        let all = self.links()?;
        let found = find(&all, &c.select)?.clone();
        let index = found.index;
        let mut name = found.name.clone();
        if let Some(new) = c.name.as_ref().filter(|n| **n != found.name) {
            if all.iter().any(|l| l.name == *new) {
                return Err(Error::AlreadyExists(format!(
                    "interface {new:?} (interface.name: {} cannot be renamed to it)",
                    found.name
                )));
            }
            if found.up {
                let down = LinkChange {
                    up: Some(false),
                    ..Default::default()
                };
                self.set(index, down, format!("bring {name} down to rename it"))?;
            }
            link::rename_link(&mut self.nl, index, new)
                .map_err(|e| kernel(format!("rename {name} to {new:?} (interface.name)"), e))?;
            name = new.clone();
        }
        if let Some(mtu) = c.mtu.filter(|m| *m != found.mtu) {
            let change = LinkChange {
                mtu: Some(mtu),
                ..Default::default()
            };
            self.set(index, change, format!("set interface.mtu {mtu} on {name}"))?;
        }
        for (n, a) in c.addresses.iter().enumerate() {
            addr::add_address(&mut self.nl, index, a.ip, a.prefix)
                .map_err(|e| kernel(format!("add interface.ip_addresses[{n}] {a} to {name}"), e))?;
        }
        let up = LinkChange {
            up: Some(true),
            ..Default::default()
        };
        self.set(index, up, format!("bring {name} up"))?;
        self.read_back(index)
    }

    fn read_back(&mut self, index: u32) -> Result<Configured, Error> {
        let link = self
            .links()?
            .into_iter()
            .find(|l| l.index == index)
            .ok_or_else(|| Error::NotFound(format!("interface {index} after configuring it")))?;
        let addresses = addr::addresses(&mut self.nl)
            .map_err(|e| kernel(format!("list the addresses of {}", link.name), e))?
            .into_iter()
            .filter(|a| a.index == index && !a.link_local)
            .map(|a| IpNet {
                ip: a.ip,
                prefix: a.prefix,
            })
            .collect();
        Ok(Configured {
            mac: Mac::from_bytes(&link.mac).filter(|_| !link.loopback),
            name: link.name,
            mtu: link.mtu,
            addresses,
        })
    }

    /// UpdateRoutes: adds each route, replacing a route to the same
    /// destination, those without a gateway first (a gateway must be on a
    /// link route when its route is added). Returns them in that order.
    pub fn apply_routes(&mut self, routes: &[RouteConfig]) -> Result<Vec<RouteConfig>, Error> {
        if !self.ipv6 {
            if let Some(r) = routes.iter().find(|r| r.ipv6) {
                return Err(Error::Unsupported(format!("{r}: {NO_IPV6}")));
            }
        }
        let all = if routes.iter().any(|r| r.device.is_some()) {
            self.links()?
        } else {
            Vec::new()
        };
        let mut resolved = Vec::with_capacity(routes.len());
        for r in routes {
            let device = match &r.device {
                None => None,
                Some(d) => Some(
                    all.iter()
                        .find(|l| l.name == *d)
                        .ok_or_else(|| {
                            Error::NotFound(format!(
                                "interface {d:?} (routes[{}].device; the guest has: {})",
                                r.index,
                                present(&all)
                            ))
                        })?
                        .index,
                ),
            };
            resolved.push((r, device));
        }
        // The one place route order and scope are decided (the shim sends
        // the netns' routes in the kernel's order, without scopes): any
        // client may send any order, so the agent must be robust to it.
        // Stable: the request's order within each group.
        resolved.sort_by_key(|(r, _)| r.gateway.is_some());
        for (r, device) in &resolved {
            let netlink_route = route::Route {
                destination: r.destination.map(|d| (d.ip, d.prefix)),
                gateway: r.gateway,
                device: *device,
                // iproute2's rule: IPv4 routes without a gateway are on the
                // link; IPv6 routes are universe scope.
                link_scope: r.gateway.is_none() && !r.ipv6,
                ipv6: r.ipv6,
            };
            route::add_route(&mut self.nl, &netlink_route)
                .map_err(|e| kernel(format!("add {r}"), e))?;
        }
        Ok(resolved.into_iter().map(|(r, _)| r.clone()).collect())
    }
}

/// Brings `lo` up (PID 1 setup: the kernel gives it 127.0.0.1/8 and ::1
/// then). Nothing to do where it is up already.
pub fn bring_up_loopback() -> Result<(), Error> {
    let mut nl = Netlink::open().map_err(|e| kernel("open a netlink socket", e))?;
    let lo = link::link_by_name(&mut nl, "lo")
        .map_err(|e| kernel("find lo", e))?
        .ok_or_else(|| Error::NotFound("interface lo".into()))?;
    if !lo.up {
        let up = LinkChange {
            up: Some(true),
            ..Default::default()
        };
        link::set_link(&mut nl, lo.index, &up).map_err(|e| kernel("bring lo up", e))?;
    }
    Ok(())
}

//! UpdateInterface / UpdateRoutes against the real kernel, each test in a
//! network namespace of its own with a veth pair standing in for the guest's
//! virtio NIC. Needs root (without it each test says SKIPPING and passes).

use std::net::IpAddr;
use std::path::Path;

use podbox_netlink::link::{self, LinkChange};
use podbox_netlink::route::{self, Route as NetlinkRoute};
use podbox_netlink::testing::in_new_netns;
use podbox_netlink::{addr, Netlink};
use podbox_protocol::agent::{
    Interface, Route, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use protobuf::MessageField;

use crate::container::Error;
use crate::network::*;

use super::address;

const GUEST_MAC: &str = "02:00:00:00:00:01";

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPING: network tests need root (a network namespace of their own)");
    false
}

/// The guest's NIC: veth `vguest` with GUEST_MAC, up, its peer `vpeer` up
/// (so that it has a carrier). Returns vguest's index.
fn guest_nic(nl: &mut Netlink) -> u32 {
    link::add_veth(nl, "vguest", "vpeer").expect("create veth pair");
    let guest = link::link_by_name(nl, "vguest").unwrap().expect("vguest");
    let peer = link::link_by_name(nl, "vpeer").unwrap().expect("vpeer");
    let mac = Mac::parse(GUEST_MAC).unwrap();
    let change = LinkChange {
        up: Some(true),
        mac: Some(mac.0),
        ..Default::default()
    };
    link::set_link(nl, guest.index, &change).expect("set vguest's MAC, up");
    let up = LinkChange {
        up: Some(true),
        ..Default::default()
    };
    link::set_link(nl, peer.index, &up).expect("vpeer up");
    guest.index
}

fn ipv6() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

fn update_interface(nic: &mut Nic, i: Interface) -> Result<Interface, Error> {
    let request = UpdateInterfaceRequest {
        interface: MessageField::some(i),
        ..Default::default()
    };
    let config = parse_interface(&request)?;
    Ok(to_interface(&nic.configure_interface(&config)?))
}

fn update_routes(nic: &mut Nic, routes: &[(&str, &str, &str)]) -> Result<Routes, Error> {
    let request = UpdateRoutesRequest {
        routes: MessageField::some(Routes {
            routes: routes
                .iter()
                .map(|(dest, gateway, device)| Route {
                    dest: dest.to_string(),
                    gateway: gateway.to_string(),
                    device: device.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let routes = parse_routes(&request)?;
    Ok(to_routes(&nic.apply_routes(&routes)?))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What the shim sends: the NIC by MAC, renamed to eth0, an MTU, two IPv4
/// addresses and (where the kernel has IPv6) one IPv6 address.
fn pod_interface(v6: bool) -> Interface {
    let mut addresses = vec![
        address("inet", "10.88.0.2", "16"),
        address("", "10.89.0.2", "24"),
    ];
    if v6 {
        addresses.push(address("inet6", "fd00::2", "64"));
    }
    Interface {
        device: "eth0".into(),
        name: "eth0".into(),
        hw_addr: GUEST_MAC.to_uppercase(),
        mtu: 1400,
        ip_addresses: addresses,
        ..Default::default()
    }
}

#[test]
fn configures_the_nic_by_mac_then_its_routes() {
    if !root() {
        return;
    }
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink");
        let index = guest_nic(&mut nl);
        let v6 = ipv6();
        let mut nic = Nic::open().expect("nic");

        let reply = update_interface(&mut nic, pod_interface(v6)).expect("UpdateInterface");
        assert_eq!(reply.name, "eth0");
        assert_eq!(reply.device, "eth0");
        assert_eq!(reply.hw_addr, GUEST_MAC);
        assert_eq!(reply.mtu, 1400);
        let mut want = vec![
            address("inet", "10.88.0.2", "16"),
            address("inet", "10.89.0.2", "24"),
        ];
        if v6 {
            want.push(address("inet6", "fd00::2", "64"));
        }
        for a in &want {
            assert!(
                reply.ip_addresses.contains(a),
                "{a:?} not in {:?}",
                reply.ip_addresses
            );
        }
        assert_eq!(
            reply.ip_addresses.len(),
            want.len(),
            "{:?}",
            reply.ip_addresses
        );

        // What the kernel has: the same interface, renamed, up.
        assert_eq!(link::link_by_name(&mut nl, "vguest").unwrap(), None);
        let eth0 = link::link_by_name(&mut nl, "eth0").unwrap().expect("eth0");
        assert_eq!(eth0.index, index);
        assert!(eth0.up);
        assert_eq!(eth0.mtu, 1400);
        let addresses = addr::addresses(&mut nl).unwrap();
        assert!(
            addresses
                .iter()
                .any(|a| a.index == index && a.ip == ip("10.89.0.2") && a.prefix == 24),
            "{addresses:?}"
        );

        // The same request again changes nothing and is no error.
        let again = update_interface(&mut nic, pod_interface(v6)).expect("UpdateInterface again");
        assert_eq!(again, reply);

        // Gateway routes first: the agent adds the link routes before them.
        // The gateways are on no address's network, so this only works in
        // that order.
        let mut request = vec![
            ("default", "10.99.0.1", "eth0"),
            ("10.99.0.0/24", "", "eth0"),
        ];
        if v6 {
            request.insert(1, ("default", "fd99::1", "eth0"));
            request.push(("fd99::/64", "", "eth0"));
        }
        let applied = update_routes(&mut nic, &request).expect("UpdateRoutes");
        let order: Vec<(&str, &str)> = applied
            .routes
            .iter()
            .map(|r| (r.dest.as_str(), r.gateway.as_str()))
            .collect();
        let want_order = if v6 {
            vec![
                ("10.99.0.0/24", ""),
                ("fd99::/64", ""),
                ("default", "10.99.0.1"),
                ("default", "fd99::1"),
            ]
        } else {
            vec![("10.99.0.0/24", ""), ("default", "10.99.0.1")]
        };
        assert_eq!(order, want_order);

        let table = route::routes(&mut nl).unwrap();
        let mut expected = vec![
            NetlinkRoute {
                destination: Some((ip("10.99.0.0"), 24)),
                gateway: None,
                device: Some(index),
                link_scope: true,
                ipv6: false,
            },
            NetlinkRoute {
                destination: None,
                gateway: Some(ip("10.99.0.1")),
                device: Some(index),
                link_scope: false,
                ipv6: false,
            },
        ];
        if v6 {
            expected.push(NetlinkRoute {
                destination: Some((ip("fd99::"), 64)),
                gateway: None,
                device: Some(index),
                link_scope: false,
                ipv6: true,
            });
            expected.push(NetlinkRoute {
                destination: None,
                gateway: Some(ip("fd99::1")),
                device: Some(index),
                link_scope: false,
                ipv6: true,
            });
        }
        for r in &expected {
            assert!(table.contains(r), "{r:?} not in {table:?}");
        }

        // Identical routes again: replaced, no error.
        update_routes(&mut nic, &request).expect("UpdateRoutes again");
    });
}

#[test]
fn loopback_as_the_shim_sends_it() {
    if !root() {
        return;
    }
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink");
        let mut nic = Nic::open().expect("nic");
        let lo = Interface {
            name: "lo".into(),
            ip_addresses: vec![address("inet", "127.0.0.1", "8")],
            ..Default::default()
        };
        let reply = update_interface(&mut nic, lo).expect("UpdateInterface lo");
        assert_eq!(reply.name, "lo");
        assert_eq!(reply.hw_addr, "", "lo has no MAC to report");
        assert!(
            reply
                .ip_addresses
                .contains(&address("inet", "127.0.0.1", "8")),
            "{reply:?}"
        );
        assert!(link::link_by_name(&mut nl, "lo").unwrap().unwrap().up);
    });
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink");
        assert!(!link::link_by_name(&mut nl, "lo").unwrap().unwrap().up);
        bring_up_loopback().expect("lo up");
        bring_up_loopback().expect("lo up again");
        assert!(link::link_by_name(&mut nl, "lo").unwrap().unwrap().up);
        let addresses = addr::addresses(&mut nl).unwrap();
        assert!(
            addresses.iter().any(|a| a.ip == ip("127.0.0.1")),
            "{addresses:?}"
        );
    });
}

/// The message of an error of the kind `matches` accepts.
fn message(r: Result<impl std::fmt::Debug, Error>, matches: fn(&Error) -> bool) -> String {
    match r {
        Err(e) if matches(&e) => e.to_string(),
        other => panic!("unexpected result {other:?}"),
    }
}

#[test]
fn errors_name_the_field_and_change_nothing() {
    if !root() {
        return;
    }
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink");
        let index = guest_nic(&mut nl);
        let mut nic = Nic::open().expect("nic");
        let not_found = |e: &Error| matches!(e, Error::NotFound(_));

        let unknown_mac = Interface {
            hw_addr: "02:00:00:00:00:99".into(),
            name: "eth0".into(),
            ..Default::default()
        };
        let m = message(update_interface(&mut nic, unknown_mac), not_found);
        for part in [
            "02:00:00:00:00:99",
            "interface.hw_addr",
            "vguest (02:00:00:00:00:01)",
            "vpeer (",
            "lo",
        ] {
            assert!(m.contains(part), "{m:?} should contain {part:?}");
        }

        let unknown_device = Interface {
            device: "eth7".into(),
            ..Default::default()
        };
        let m = message(update_interface(&mut nic, unknown_device), not_found);
        assert!(m.contains("\"eth7\" (interface.device"), "{m}");

        let clash = Interface {
            hw_addr: GUEST_MAC.into(),
            name: "vpeer".into(),
            ..Default::default()
        };
        let m = message(update_interface(&mut nic, clash), |e| {
            matches!(e, Error::AlreadyExists(_))
        });
        assert!(m.contains("interface.name"), "{m}");

        // A kernel refusal names the step and the field.
        let tiny_mtu = Interface {
            hw_addr: GUEST_MAC.into(),
            mtu: 10,
            ..Default::default()
        };
        let m = message(update_interface(&mut nic, tiny_mtu), |e| {
            matches!(e, Error::Io { .. })
        });
        assert!(m.contains("interface.mtu 10 on vguest"), "{m}");

        // An unknown device fails the request before any route is added.
        let m = message(
            update_routes(
                &mut nic,
                &[
                    ("10.99.0.0/24", "", "vguest"),
                    ("default", "10.99.0.1", "eth9"),
                ],
            ),
            not_found,
        );
        assert!(m.contains("\"eth9\" (routes[1].device"), "{m}");
        let table = route::routes(&mut nl).unwrap();
        assert!(
            !table
                .iter()
                .any(|r| r.destination == Some((ip("10.99.0.0"), 24))),
            "{table:?}"
        );

        // A gateway on no link route: the kernel refuses, the route is named.
        let m = message(
            update_routes(&mut nic, &[("default", "10.123.0.1", "vguest")]),
            |e| matches!(e, Error::Io { .. }),
        );
        assert!(
            m.contains("routes[0] (default via 10.123.0.1 dev vguest)"),
            "{m}"
        );

        // A guest kernel without IPv6: refused up front, nothing changed.
        let mut no_v6 = Nic::open().expect("nic").assume_ipv6(false);
        let unsupported = |e: &Error| matches!(e, Error::Unsupported(_));
        let with_v6 = Interface {
            hw_addr: GUEST_MAC.into(),
            ip_addresses: vec![
                address("inet", "10.77.0.2", "24"),
                address("inet6", "fd00::2", "64"),
            ],
            ..Default::default()
        };
        let m = message(update_interface(&mut no_v6, with_v6), unsupported);
        assert!(
            m.contains("interface.ip_addresses[1] fd00::2/64: the guest kernel has no IPv6"),
            "{m}"
        );
        let addresses = addr::addresses(&mut nl).unwrap();
        assert!(
            !addresses
                .iter()
                .any(|a| a.index == index && a.ip == ip("10.77.0.2")),
            "{addresses:?}"
        );
        let m = message(
            update_routes(&mut no_v6, &[("fd99::/64", "", "vguest")]),
            unsupported,
        );
        assert!(
            m.contains("routes[0] (fd99::/64 dev vguest): the guest kernel has no IPv6"),
            "{m}"
        );
    });
}

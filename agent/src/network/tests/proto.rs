//! The protocol messages <-> typed values (`proto`): the checks that need no
//! kernel, each error naming its field, and the replies formatted back.

use std::fmt;
use std::net::IpAddr;

use podbox_protocol::agent::{
    IPAddress, Interface, Route, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use protobuf::MessageField;

use crate::container::Error;
use crate::network::*;

use super::address;

fn interface(i: Interface) -> Result<InterfaceConfig, Error> {
    parse_interface(&UpdateInterfaceRequest {
        interface: MessageField::some(i),
        ..Default::default()
    })
}

fn with_addresses(addresses: Vec<IPAddress>) -> Result<InterfaceConfig, Error> {
    interface(Interface {
        name: "eth0".into(),
        ip_addresses: addresses,
        ..Default::default()
    })
}

fn route(dest: &str, gateway: &str, device: &str) -> Route {
    Route {
        dest: dest.into(),
        gateway: gateway.into(),
        device: device.into(),
        ..Default::default()
    }
}

fn routes(routes: Vec<Route>) -> Result<Vec<RouteConfig>, Error> {
    parse_routes(&UpdateRoutesRequest {
        routes: MessageField::some(Routes {
            routes,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The error's message, which must be INVALID_ARGUMENT.
fn invalid_message<T: fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn macs() {
    let mac = Mac::parse("AA:bb:0c:dd:ee:FF").unwrap();
    assert_eq!(mac.0, [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0xff]);
    assert_eq!(mac.to_string(), "aa:bb:0c:dd:ee:ff");
    for bad in [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "a:bb:cc:dd:ee:fff",
        "+a:bb:cc:dd:ee:ff",
        "aa-bb-cc-dd-ee-ff",
        "gg:bb:cc:dd:ee:ff",
    ] {
        assert_eq!(Mac::parse(bad), None, "{bad}");
    }
}

#[test]
fn networks() {
    let n = IpNet {
        ip: "10.1.2.3".parse().unwrap(),
        prefix: 16,
    };
    assert_eq!(n.network(), "10.1.0.0".parse::<IpAddr>().unwrap());
    let n = IpNet {
        ip: "10.1.2.3".parse().unwrap(),
        prefix: 0,
    };
    assert_eq!(n.network(), "0.0.0.0".parse::<IpAddr>().unwrap());
    let n = IpNet {
        ip: "fd00::1:2".parse().unwrap(),
        prefix: 112,
    };
    assert_eq!(n.network(), "fd00::1:0".parse::<IpAddr>().unwrap());
    let n = IpNet {
        ip: "fd00::1".parse().unwrap(),
        prefix: 128,
    };
    assert_eq!(n.network(), n.ip);
}

#[test]
fn interface_with_both_families() {
    let c = interface(Interface {
        device: "eth0".into(),
        name: "eth1".into(),
        hw_addr: "aa:bb:cc:dd:ee:ff".into(),
        mtu: 1450,
        ip_addresses: vec![
            address("inet", "10.88.0.2", "16"),
            address("", "10.89.0.2", "32"),
            address("4", "10.90.0.2", "0"),
            address("inet6", "fd00::2", "64"),
            address("6", "fd01::2", "128"),
        ],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        c.select,
        LinkSelector::Mac(Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]))
    );
    assert_eq!(c.name.as_deref(), Some("eth1"));
    assert_eq!(c.mtu, Some(1450));
    let got: Vec<String> = c.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        got,
        [
            "10.88.0.2/16",
            "10.89.0.2/32",
            "10.90.0.2/0",
            "fd00::2/64",
            "fd01::2/128"
        ]
    );
}

#[test]
fn interface_selection() {
    let by_device = interface(Interface {
        device: "eth0".into(),
        name: "net0".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        by_device.select,
        LinkSelector::Name {
            name: "eth0".into(),
            field: "interface.device"
        }
    );
    assert_eq!(by_device.name.as_deref(), Some("net0"));
    assert_eq!(by_device.mtu, None);
    let by_name = interface(Interface {
        name: "lo".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        by_name.select,
        LinkSelector::Name {
            name: "lo".into(),
            field: "interface.name"
        }
    );
    let m = invalid_message(interface(Interface::default()));
    assert!(m.contains("hw_addr, device and name"), "{m}");
    let m = invalid_message(parse_interface(&UpdateInterfaceRequest::default()));
    assert!(m.contains("interface is missing"), "{m}");
}

#[test]
fn interface_errors_name_the_field() {
    let cases: Vec<(Result<InterfaceConfig, Error>, &str)> = vec![
        (
            interface(Interface {
                hw_addr: "aa:bb:cc".into(),
                ..Default::default()
            }),
            "interface.hw_addr \"aa:bb:cc\"",
        ),
        (
            interface(Interface {
                name: "eth0/x".into(),
                ..Default::default()
            }),
            "interface.name \"eth0/x\"",
        ),
        (
            interface(Interface {
                device: "a-very-long-interface".into(),
                ..Default::default()
            }),
            "interface.device",
        ),
        (
            interface(Interface {
                name: "eth0".into(),
                mtu: 1 << 40,
                ..Default::default()
            }),
            "interface.mtu",
        ),
        (
            with_addresses(vec![
                address("inet", "10.0.0.2", "24"),
                address("ipx", "10.0.0.3", "24"),
            ]),
            "interface.ip_addresses[1].family \"ipx\"",
        ),
        (
            with_addresses(vec![address("inet", "fd00::2", "64")]),
            "interface.ip_addresses[0].address fd00::2 is not an IPv4 address",
        ),
        (
            with_addresses(vec![address("inet6", "10.0.0.2", "24")]),
            "interface.ip_addresses[0].address 10.0.0.2 is not an IPv6 address",
        ),
        (
            with_addresses(vec![address("inet", "10.0.0.x", "24")]),
            "interface.ip_addresses[0].address \"10.0.0.x\"",
        ),
        (
            with_addresses(vec![address("inet", "224.0.0.1", "24")]),
            "not a unicast address",
        ),
        (
            with_addresses(vec![address("inet", "10.0.0.2", "33")]),
            "interface.ip_addresses[0].mask \"33\" is not a prefix length 0-32",
        ),
        (
            with_addresses(vec![address("inet6", "fd00::2", "129")]),
            "interface.ip_addresses[0].mask \"129\" is not a prefix length 0-128",
        ),
        (
            with_addresses(vec![address("inet", "10.0.0.2", "")]),
            "interface.ip_addresses[0].mask \"\"",
        ),
        (
            with_addresses(vec![address("inet", "10.0.0.2", "+8")]),
            "interface.ip_addresses[0].mask \"+8\"",
        ),
        (
            with_addresses(vec![address("inet", "10.0.0.2", "255.255.255.0")]),
            "interface.ip_addresses[0].mask",
        ),
    ];
    for (result, expected) in cases {
        let m = invalid_message(result);
        assert!(m.contains(expected), "{m:?} should contain {expected:?}");
    }
}

#[test]
fn routes_of_both_families() {
    let r = routes(vec![
        route("default", "10.88.0.1", "eth0"),
        route("10.88.0.0/16", "", "eth0"),
        route("", "10.88.0.1", ""),
        route("10.1.2.3", "", "eth0"),
        route("fd00::/64", "", "eth0"),
        route("default", "fd00::1", "eth0"),
        route("::/0", "", "eth0"),
        route("default", "", "eth0"),
    ])
    .unwrap();
    let shown: Vec<String> = r.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        shown,
        [
            "routes[0] (default via 10.88.0.1 dev eth0)",
            "routes[1] (10.88.0.0/16 dev eth0)",
            "routes[2] (default via 10.88.0.1)",
            "routes[3] (10.1.2.3/32 dev eth0)",
            "routes[4] (fd00::/64 dev eth0)",
            "routes[5] (default (IPv6) via fd00::1 dev eth0)",
            "routes[6] (::/0 dev eth0)",
            "routes[7] (default dev eth0)",
        ]
    );
    let v6: Vec<bool> = r.iter().map(|r| r.ipv6).collect();
    assert_eq!(v6, [false, false, false, false, true, true, true, false]);
    let back = to_routes(&r);
    assert_eq!(back.routes[0].dest, "default");
    assert_eq!(back.routes[3].dest, "10.1.2.3/32");
    assert_eq!(back.routes[5].gateway, "fd00::1");
    assert!(routes(vec![]).unwrap().is_empty());
    assert!(parse_routes(&UpdateRoutesRequest::default())
        .unwrap()
        .is_empty());
}

#[test]
fn route_errors_name_the_field() {
    let cases = [
        (
            route("10.0.0.0/33", "", "eth0"),
            "routes[0].dest \"33\" is not a prefix length 0-32",
        ),
        (route("fd00::/129", "", "eth0"), "routes[0].dest \"129\""),
        (
            route("10.0.0.1/8", "", "eth0"),
            "routes[0].dest \"10.0.0.1/8\" has host bits set (the network is 10.0.0.0/8)",
        ),
        (
            route("somewhere", "", "eth0"),
            "routes[0].dest \"somewhere\"",
        ),
        (
            route("10.0.0.0/8", "fd00::1", "eth0"),
            "routes[0].gateway fd00::1 is IPv6 but routes[0].dest 10.0.0.0/8 is IPv4",
        ),
        (
            route("fd00::/64", "10.0.0.1", "eth0"),
            "routes[0].gateway 10.0.0.1 is IPv4 but routes[0].dest fd00::/64 is IPv6",
        ),
        (
            route("default", "10.0.0.x", "eth0"),
            "routes[0].gateway \"10.0.0.x\"",
        ),
        (
            route("default", "0.0.0.0", "eth0"),
            "routes[0].gateway 0.0.0.0 is not a unicast address",
        ),
        (
            route("10.0.0.0/8", "", ""),
            "routes[0]: a route without a gateway needs a device",
        ),
        (
            route("10.0.0.0/8", "", "eth 0"),
            "routes[0].device \"eth 0\"",
        ),
    ];
    for (r, expected) in cases {
        let m = invalid_message(routes(vec![r]));
        assert!(m.contains(expected), "{m:?} should contain {expected:?}");
    }
    // The index is the route's position.
    let m = invalid_message(routes(vec![
        route("default", "10.0.0.1", "eth0"),
        route("x", "", "eth0"),
    ]));
    assert!(m.contains("routes[1].dest"), "{m}");
}

#[test]
fn configured_interface_reply() {
    let reply = to_interface(&Configured {
        name: "eth0".into(),
        mac: Some(Mac([2, 0, 0, 0, 0, 1])),
        mtu: 1400,
        addresses: vec![
            IpNet {
                ip: "10.88.0.2".parse().unwrap(),
                prefix: 16,
            },
            IpNet {
                ip: "fd00::2".parse().unwrap(),
                prefix: 64,
            },
        ],
    });
    assert_eq!(reply.name, "eth0");
    assert_eq!(reply.device, "eth0");
    assert_eq!(reply.hw_addr, "02:00:00:00:00:01");
    assert_eq!(reply.mtu, 1400);
    assert_eq!(reply.ip_addresses[0], address("inet", "10.88.0.2", "16"));
    assert_eq!(reply.ip_addresses[1], address("inet6", "fd00::2", "64"));
}

//! The pure parts (choosing the interface, the agent's messages, the spec's
//! netns) and the wiring against the real kernel in netns of their own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podbox_netlink::addr::Address;
use podbox_netlink::link::Link;
use podbox_netlink::route::{ListedRoute, Route};

use super::interface::{choose, describe};
use super::testnet::{TestNetns, CNI_MAC, CNI_MTU};
use super::*;

fn link(index: u32, name: &str, mac: &[u8]) -> Link {
    Link {
        index,
        name: name.into(),
        mac: mac.to_vec(),
        mtu: 1500,
        up: true,
        loopback: name == "lo",
        kind: None,
    }
}

const MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x58, 0, 5];

#[test]
fn the_pods_interface_is_the_one_ethernet_one_or_eth0() {
    let lo = link(1, "lo", &[0; 6]);
    let tunl = Link {
        up: false,
        kind: Some("ipip".into()),
        ..link(2, "tunl0", &[0; 4])
    };
    let eth0 = link(3, "eth0", &MAC);
    let net1 = link(4, "net1", &MAC);
    let tap = link(5, tap::TAP_NAME, &MAC);
    let chosen = |links: &[Link]| {
        choose(links).unwrap().map(|c| {
            (
                c.link.clone(),
                c.ignored.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            )
        })
    };
    assert_eq!(
        chosen(&[lo.clone(), tunl.clone()]),
        None,
        "a fallback tunnel, down"
    );
    assert_eq!(
        chosen(&[lo.clone(), net1.clone(), tap, tunl.clone()]),
        Some((net1.clone(), vec![]))
    );
    let several = [lo.clone(), net1.clone(), eth0.clone()];
    assert_eq!(
        chosen(&several),
        Some((eth0.clone(), vec!["net1".to_string()]))
    );
    let other = link(6, "net2", &MAC);
    let err = choose(&[lo.clone(), net1, other]).expect_err("two, neither eth0");
    assert!(err.to_string().contains("\"net1\", \"net2\""), "{err}");
    assert_eq!(err.code(), Code::FAILED_PRECONDITION);

    // A MAC-less interface that is up, with no Ethernet one: the pod's
    // network cannot reach the VM, and the pod must not boot without it.
    let wg = Link {
        kind: Some("wireguard".into()),
        ..link(7, "wg0", &[])
    };
    let err = choose(&[lo.clone(), tunl, wg.clone()]).expect_err("wireguard");
    assert!(matches!(&err, NetworkError::NoMac { name, .. } if name == "wg0"));
    assert!(err.to_string().contains("wg0 (wireguard)"), "{err}");
    assert_eq!(err.code(), Code::FAILED_PRECONDITION);
    // Beside an Ethernet one it is passed over, and named.
    assert_eq!(
        chosen(&[lo, eth0.clone(), wg]),
        Some((eth0, vec!["wg0".to_string()]))
    );
}

fn listed(route: Route) -> ListedRoute {
    ListedRoute {
        route,
        main_unicast: true,
        kernel: false,
        nexthops: Vec::new(),
        lost: Vec::new(),
    }
}

#[test]
fn the_guest_gets_the_interfaces_identity_and_its_routes_and_warnings_for_the_rest() {
    let eth0 = link(3, "eth0", &MAC);
    let links = [link(1, "lo", &[0; 6]), eth0.clone(), link(9, "net1", &MAC)];
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 88, 0, 5));
    let v6: IpAddr = "fd00::5".parse().unwrap();
    let address = |index, ip, prefix, link_local| Address {
        index,
        ip,
        prefix,
        link_local,
    };
    let addresses = [
        address(3, v4, 16, false),
        address(3, "fe80::858:aff:fe58:5".parse().unwrap(), 64, true),
        address(3, v6, 64, false),
        address(1, IpAddr::V4(Ipv4Addr::LOCALHOST), 8, false),
    ];
    let route = |destination, gateway, device, link_scope| Route {
        destination,
        gateway,
        device: Some(device),
        link_scope,
        ipv6: false,
    };
    let gateway = IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1));
    let net = |a, b, prefix| Some((IpAddr::V4(Ipv4Addr::new(10, a, b, 0)), prefix));
    let routes = [
        listed(route(None, Some(gateway), 3, false)),
        listed(route(net(88, 0, 16), None, 3, true)),
        listed(route(Some(("fe80::".parse().unwrap(), 64)), None, 3, true)),
        listed(route(
            Some((IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)), 64)),
            None,
            3,
            true,
        )),
        listed(route(
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 128)),
            None,
            1,
            false,
        )),
        listed(route(
            Some((IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 24)),
            None,
            9,
            true,
        )),
        ListedRoute {
            lost: vec!["metric 50".into(), "src 10.88.0.5".into()],
            ..listed(route(net(1, 0, 16), Some(gateway), 3, false))
        },
        ListedRoute {
            route: Route {
                device: None,
                ..route(net(2, 0, 16), None, 3, false)
            },
            nexthops: vec![(Some(gateway), 3), (None, 9)],
            ..listed(route(net(2, 0, 16), None, 3, false))
        },
        ListedRoute {
            main_unicast: false,
            lost: vec!["table 100".into()],
            ..listed(route(net(3, 0, 16), Some(gateway), 3, false))
        },
    ];
    let cni = describe(&eth0, &links, &addresses, &routes).expect("described");
    let interface = cni.update_interface().interface.unwrap();
    assert_eq!(
        (interface.device.as_str(), interface.name.as_str()),
        ("eth0", "eth0")
    );
    assert_eq!(interface.hw_addr, "0a:58:0a:58:00:05");
    assert_eq!(interface.mtu, 1500);
    let ips: Vec<_> = interface
        .ip_addresses
        .iter()
        .map(|a| format!("{} {}/{}", a.family, a.address, a.mask))
        .collect();
    assert_eq!(ips, ["inet 10.88.0.5/16", "inet6 fd00::5/64"]);
    let routes: Vec<_> = cni
        .update_routes()
        .routes
        .unwrap()
        .routes
        .iter()
        .map(|r| format!("{} via {:?} dev {}", r.dest, r.gateway, r.device))
        .collect();
    // In the kernel's order: the agent puts on-link routes first.
    assert_eq!(
        routes,
        [
            "default via \"10.88.0.1\" dev eth0",
            "10.88.0.0/16 via \"\" dev eth0",
            "fd00::/64 via \"\" dev eth0",
            "10.1.0.0/16 via \"10.88.0.1\" dev eth0",
        ]
    );
    assert_eq!(
        cni.route_warnings,
        [
            "route 192.168.0.0/24 dev net1 is not copied to the guest: it goes through net1, which the VM does not get (only eth0's routes are copied)",
            "route 10.1.0.0/16 via 10.88.0.1 dev eth0 metric 50 src 10.88.0.5 is copied to the guest without metric 50, src 10.88.0.5 (podbox copies destination, gateway and device)",
            "multipath route 10.2.0.0/16 nexthop via 10.88.0.1 dev eth0 nexthop dev net1 is not copied to the guest (podbox copies single-path routes through eth0)",
            "route 10.3.0.0/16 via 10.88.0.1 dev eth0 table 100 is not copied to the guest (podbox copies the main table's unicast routes)",
        ]
    );
    let no_mac = link(3, "eth0", &[]);
    assert!(matches!(
        describe(&no_mac, &[], &[], &[]),
        Err(NetworkError::NoMac { .. })
    ));
}

fn spec(linux: serde_json::Value) -> oci_spec::runtime::Spec {
    let mut spec = serde_json::json!({"ociVersion": "1.0.2"});
    if !linux.is_null() {
        spec["linux"] = linux;
    }
    serde_json::from_value(spec).expect("a spec")
}

#[test]
fn the_spec_names_the_netns_asks_for_one_or_is_refused_as_host_network() {
    let path = spec(serde_json::json!({"namespaces": [
        {"type": "mount"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}));
    assert_eq!(
        NetnsSource::from_spec(&path).unwrap(),
        NetnsSource::Path("/var/run/netns/cni-1".into())
    );
    let new = spec(serde_json::json!({"namespaces": [{"type": "network"}]}));
    assert_eq!(NetnsSource::from_spec(&new).unwrap(), NetnsSource::New);
    let empty_path = spec(serde_json::json!({"namespaces": [{"type": "network", "path": ""}]}));
    assert_eq!(
        NetnsSource::from_spec(&empty_path).unwrap(),
        NetnsSource::New
    );
    for host in [
        spec(serde_json::Value::Null),
        spec(serde_json::json!({})),
        spec(serde_json::json!({"namespaces": [{"type": "pid"}, {"type": "mount"}]})),
    ] {
        let err = NetnsSource::from_spec(&host).expect_err("host network");
        assert!(
            err.to_string()
                .starts_with("host network is not supported for sandboxed pods: "),
            "{err}"
        );
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
    }
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: network namespaces need root");
    false
}

#[test]
fn a_cni_interface_is_redirected_to_a_tap_and_the_netns_is_left_as_it_was() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    let network = PodNetwork::set_up(&NetnsSource::Path(net.netns.path())).expect("wired");
    let nic = network.nic().expect("a NIC for eth0");
    assert_eq!(nic.cni.name, "eth0");
    assert_eq!(nic.cni.mac.to_string(), CNI_MAC);
    assert!(nic
        .cni
        .addresses
        .contains(&("10.88.0.5".parse().unwrap(), 16)));
    assert!(nic
        .cni
        .addresses
        .contains(&("fd00::5".parse().unwrap(), 64)));
    let default = nic.cni.routes.iter().find(|r| r.destination.is_none());
    assert_eq!(
        default.expect("a default route").gateway,
        Some("10.88.0.1".parse().unwrap())
    );
    assert!(
        nic.cni.route_warnings.is_empty(),
        "{:?}",
        nic.cni.route_warnings
    );
    let eth0 = net.link("eth0").unwrap();
    let tap = net.link(tap::TAP_NAME).expect("the tap exists");
    assert!(tap.up);
    assert_eq!(tap.mtu, CNI_MTU);
    assert!(net
        .ingress_filters("eth0")
        .iter()
        .any(|f| f.redirect_to == Some(tap.index)));
    assert!(net
        .ingress_filters(tap::TAP_NAME)
        .iter()
        .any(|f| f.redirect_to == Some(eth0.index)));
    // The VMM takes the tap; it is the last holder.
    let (fd, mac) = network.take_tap().expect("the tap's descriptor");
    assert_eq!(mac.to_string(), CNI_MAC);
    assert!(network.take_tap().is_none(), "taken once");
    drop(fd); // the VMM exits
    assert_eq!(
        net.link(tap::TAP_NAME),
        None,
        "the tap goes with its last descriptor"
    );
    assert_eq!(net.ingress_qdiscs(), ["eth0"]);
    network.tear_down();
    network.tear_down();
    assert!(
        net.ingress_qdiscs().is_empty(),
        "{:?}",
        net.ingress_qdiscs()
    );
    assert_eq!(net.link("eth0"), Some(eth0), "eth0 is as CNI left it");
}

#[test]
fn tear_down_removes_a_tap_still_held_and_later_containers_must_share_the_netns() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    let network = PodNetwork::set_up(&NetnsSource::Path(net.netns.path())).expect("wired");
    let held = network.take_tap();
    assert!(network
        .check_same(&NetnsSource::Path(net.netns.path()))
        .is_ok());
    let other = TestNetns::empty();
    let err = network
        .check_same(&NetnsSource::Path(other.netns.path()))
        .expect_err("another netns");
    assert_eq!(err.code(), Code::INVALID_ARGUMENT);
    assert!(network.check_same(&NetnsSource::New).is_err());
    drop(network);
    assert_eq!(
        net.link(tap::TAP_NAME),
        None,
        "deleted though a descriptor is open"
    );
    assert!(net.ingress_qdiscs().is_empty());
    drop(held);
}

#[test]
fn a_failed_wiring_leaves_nothing_and_foreign_qdiscs_alone() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    net.add_ingress_qdisc("eth0").expect("someone else's qdisc");
    let err = PodNetwork::set_up(&NetnsSource::Path(net.netns.path())).expect_err("EEXIST");
    assert!(
        matches!(&err, NetworkError::IngressTaken { interface } if interface == "eth0"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("eth0 already has an ingress qdisc"),
        "{err}"
    );
    assert_eq!(err.code(), Code::FAILED_PRECONDITION);
    assert_eq!(net.link(tap::TAP_NAME), None, "no tap left");
    assert_eq!(net.ingress_qdiscs(), ["eth0"], "the other qdisc stays");

    let missing = PodNetwork::set_up(&NetnsSource::Path("/nonexistent/netns".into()))
        .expect_err("no such netns");
    assert_eq!(missing.code(), Code::FAILED_PRECONDITION);
    assert!(
        missing.to_string().contains("/nonexistent/netns"),
        "{missing}"
    );
    let not_netns = PodNetwork::set_up(&NetnsSource::Path("/proc/self/ns/mnt".into()))
        .expect_err("a mount namespace");
    assert!(
        matches!(not_netns, NetworkError::OpenNetns { .. }),
        "{not_netns}"
    );
}

#[test]
fn a_netns_with_loopback_only_gives_the_vm_no_nic() {
    if !is_root() {
        return;
    }
    let network = PodNetwork::set_up(&NetnsSource::New).expect("a netns of its own");
    assert!(network.nic().is_none());
    assert!(network.take_tap().is_none());
    network.check_no_late_interface().expect("nothing late yet");
    // What `ctr run --cni` does once the task exists: CNI adds eth0.
    network
        .netns
        .run(|| {
            Ok(podbox_netlink::link::add_veth(
                &mut Netlink::open()?,
                "eth0",
                "peer0",
            )?)
        })
        .expect("a late veth");
    let late = network
        .check_no_late_interface()
        .expect_err("a late eth0 is refused");
    assert!(late.to_string().contains("--cni"), "{late}");
    assert_eq!(late.code(), Code::FAILED_PRECONDITION);
}

#[test]
fn tear_down_leaves_alone_a_tap_of_the_same_name_that_is_not_the_pods() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    let network = PodNetwork::set_up(&NetnsSource::Path(net.netns.path())).expect("wired");
    drop(network.take_tap()); // the VMM exits: the pod's tap goes
    net.ip(&format!("tuntap add dev {} mode tap", tap::TAP_NAME));
    let stranger = net.link(tap::TAP_NAME).expect("another tap by that name");
    assert_ne!(Some(stranger.index), network.nic().map(|n| n.tap_index));
    network.tear_down();
    assert_eq!(net.link(tap::TAP_NAME), Some(stranger), "not the shim's");
    assert!(net.ingress_qdiscs().is_empty());
}

#[test]
fn a_pod_interface_without_a_mac_fails_the_pod_instead_of_leaving_it_offline() {
    if !is_root() {
        return;
    }
    let net = TestNetns::empty();
    net.ip("tuntap add dev tun0 mode tun");
    net.ip("link set tun0 up");
    let err = PodNetwork::set_up(&NetnsSource::Path(net.netns.path())).expect_err("tun0");
    assert!(
        matches!(&err, NetworkError::NoMac { name, kind } if name == "tun0" && kind == "tun"),
        "{err:?}"
    );
    assert_eq!(err.code(), Code::FAILED_PRECONDITION);
    assert_eq!(net.link(tap::TAP_NAME), None);
}

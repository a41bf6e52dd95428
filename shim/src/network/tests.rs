//! The pure parts (choosing the interface, the agent's messages, the spec's
//! netns) and the wiring against the real kernel in netns of their own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use podbox_netlink::addr::Address;
use podbox_netlink::link::Link;
use podbox_netlink::route::Route;

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
    let tunl = link(2, "tunl0", &[0; 4]);
    let eth0 = link(3, "eth0", &MAC);
    let net1 = link(4, "net1", &MAC);
    let tap = link(5, tap::TAP_NAME, &MAC);
    assert_eq!(choose(&[lo.clone(), tunl.clone()]).unwrap(), None);
    assert_eq!(
        choose(&[lo.clone(), net1.clone(), tap]).unwrap(),
        Some(&net1)
    );
    let several = [lo.clone(), net1.clone(), eth0.clone()];
    assert_eq!(choose(&several).unwrap(), Some(&eth0));
    let other = link(6, "net2", &MAC);
    let err = choose(&[lo, net1, other]).expect_err("two, neither eth0");
    assert!(err.to_string().contains("\"net1\", \"net2\""), "{err}");
    assert_eq!(err.code(), Code::FAILED_PRECONDITION);
}

#[test]
fn the_guest_gets_the_interfaces_identity_and_its_routes_on_link_first() {
    let eth0 = link(3, "eth0", &MAC);
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
    let routes = [
        route(None, Some(gateway), 3, false),
        route(
            Some((IpAddr::V4(Ipv4Addr::new(10, 88, 0, 0)), 16)),
            None,
            3,
            true,
        ),
        route(Some(("fe80::".parse().unwrap(), 64)), None, 3, true),
        route(
            Some((IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)), 64)),
            None,
            3,
            true,
        ),
        route(
            Some((IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 24)),
            None,
            9,
            true,
        ),
    ];
    let cni = describe(&eth0, &addresses, &routes).expect("described");
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
    assert_eq!(
        routes,
        [
            "10.88.0.0/16 via \"\" dev eth0",
            "fd00::/64 via \"\" dev eth0",
            "default via \"10.88.0.1\" dev eth0",
        ]
    );
    let no_mac = link(3, "eth0", &[]);
    assert!(matches!(
        describe(&no_mac, &[], &[]),
        Err(NetworkError::NoMac(_))
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
    let last = nic.cni.routes.last().expect("routes");
    assert_eq!(
        (last.destination, last.gateway),
        (None, Some("10.88.0.1".parse().unwrap()))
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
    assert!(err.to_string().contains("ingress qdisc"), "{err}");
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
    network.warn_unwired();
}

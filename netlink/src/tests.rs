//! Against the real kernel, in a network namespace of the test's own (needs
//! root, as the whole test suite does).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::link::{link_by_name, links, set_link, LinkChange};
use crate::route::{add_route, routes, Route};
use crate::testing::in_new_netns;
use crate::{addr, Netlink};

#[test]
fn loopback_is_configured_and_read_back() {
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink socket");
        let all = links(&mut nl).expect("list");
        assert_eq!(all.len(), 1, "a new netns has only lo: {all:?}");
        let lo = link_by_name(&mut nl, "lo")
            .expect("find")
            .expect("lo exists");
        assert!(lo.loopback && !lo.up);
        assert_eq!(link_by_name(&mut nl, "eth9").expect("find"), None);

        set_link(
            &mut nl,
            lo.index,
            &LinkChange {
                up: Some(true),
                mtu: Some(9000),
                mac: None,
            },
        )
        .expect("set lo up");
        let lo = link_by_name(&mut nl, "lo").unwrap().unwrap();
        assert!(lo.up);
        assert_eq!(lo.mtu, 9000);

        let v4 = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));
        addr::add_address(&mut nl, lo.index, v4, 24).expect("add v4");
        // Adding it again replaces it.
        addr::add_address(&mut nl, lo.index, v4, 24).expect("add v4 again");
        let found = addr::addresses(&mut nl).expect("addresses");
        assert!(
            found
                .iter()
                .any(|a| a.ip == v4 && a.prefix == 24 && a.index == lo.index),
            "{found:?}"
        );
        assert!(addr::add_address(&mut nl, lo.index, v4, 33).is_err());

        let route = Route {
            destination: Some((IpAddr::V4(Ipv4Addr::new(10, 88, 0, 0)), 16)),
            gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1))),
            device: Some(lo.index),
            link_scope: false,
            ipv6: false,
        };
        add_route(&mut nl, &route).expect("add route");
        let table = routes(&mut nl).expect("routes");
        assert!(table.contains(&route), "{table:?}");

        // A gateway of the other family is refused before the kernel sees it.
        let mixed = Route {
            gateway: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ..route
        };
        assert!(add_route(&mut nl, &mixed).is_err());
    });
}

#[test]
fn kernel_errors_name_the_request() {
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink socket");
        let err = set_link(
            &mut nl,
            4242,
            &LinkChange {
                up: Some(true),
                ..Default::default()
            },
        )
        .expect_err("no interface 4242");
        assert_eq!(err.errno(), Some(libc::ENODEV));
        assert!(err.to_string().contains("interface 4242"), "{err}");
    });
}

/// Runs `ip ARGS` in this thread's netns (a fixture).
fn ip(args: &str) {
    let status = std::process::Command::new("nsenter")
        .arg("--net=/proc/thread-self/ns/net")
        .arg("ip")
        .args(args.split_whitespace())
        .status()
        .expect("running nsenter ip");
    assert!(status.success(), "ip {args}");
}

#[test]
fn listed_routes_say_what_a_copy_of_them_would_lose() {
    in_new_netns(|| {
        let mut nl = Netlink::open().expect("netlink socket");
        crate::link::add_veth(&mut nl, "va", "vb").expect("veth pair");
        ip("link set va up");
        ip("link set vb up");
        ip("addr add 10.77.0.2/24 dev va");
        ip("addr add 10.77.0.3/24 dev va");
        ip("addr add 10.78.0.2/24 dev vb");
        ip("route add 10.1.0.0/16 via 10.77.0.1 metric 50 src 10.77.0.3");
        ip("route add 10.2.0.0/16 nexthop via 10.77.0.1 dev va nexthop via 10.78.0.1 dev vb");
        ip("route add 10.3.0.0/16 via 10.77.0.1 mtu 1300");
        ip("route add 10.4.0.0/16 via 10.77.0.1 table 100");
        ip("route add blackhole 10.5.0.0/16");
        ip("route add default via 10.77.0.1");
        let va = link_by_name(&mut nl, "va").unwrap().unwrap().index;
        let listed = crate::route::list_routes(&mut nl).expect("list");
        let find = |prefix: &str| {
            listed
                .iter()
                .find(|r| r.to_string().starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} in {listed:#?}"))
        };
        let metric = find("10.1.0.0/16");
        assert_eq!(metric.lost, ["metric 50", "src 10.77.0.3"], "{metric}");
        let multipath = find("10.2.0.0/16");
        assert_eq!(multipath.route.device, None);
        assert_eq!(multipath.nexthops.len(), 2, "{multipath}");
        assert!(multipath.lost.is_empty() && multipath.main_unicast);
        assert_eq!(find("10.3.0.0/16").lost, ["mtu 1300"]);
        let table = find("10.4.0.0/16");
        assert!(
            !table.main_unicast && table.lost == ["table 100"],
            "{table}"
        );
        let blackhole = find("10.5.0.0/16");
        assert!(!blackhole.main_unicast && blackhole.lost == ["type blackhole"]);
        // The kernel's route for the addresses: its source is not a loss.
        let kernel = find("10.77.0.0/24");
        assert!(kernel.kernel && kernel.lost.is_empty(), "{kernel}");
        assert!(find("default via 10.77.0.1").lost.is_empty());
        assert!(
            listed
                .iter()
                .all(|r| !r.to_string().starts_with("10.77.0.2/32")),
            "no local-table routes: {listed:#?}"
        );
        let copied = routes(&mut nl).expect("routes");
        assert!(copied
            .iter()
            .all(|r| r.destination != Some((IpAddr::V4(Ipv4Addr::new(10, 4, 0, 0)), 16))));
        assert!(copied
            .iter()
            .any(|r| r.device == Some(va) && r.gateway.is_none()));
    });
}

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

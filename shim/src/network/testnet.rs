//! Test fixture: a network namespace set up as CNI's bridge plugin leaves a
//! pod's (a veth `eth0` with addresses and a default route), made with `ip`
//! through nsenter. Needs root.

use std::process::Command;

use podbox_netlink::link::{self, Link};
use podbox_netlink::tc::{self, Filter};
use podbox_netlink::Netlink;

use super::netns::Netns;
use super::NetworkError;

pub const CNI_MAC: &str = "0a:58:0a:58:00:05";
pub const CNI_MTU: u32 = 1400;

pub struct TestNetns {
    pub netns: Netns,
}

impl TestNetns {
    /// An empty one (loopback only).
    pub fn empty() -> TestNetns {
        TestNetns {
            netns: Netns::create().expect("a test netns"),
        }
    }

    /// `eth0` (veth, peer `peer0` in the same netns) with 10.88.0.5/16,
    /// fd00::5/64, MTU 1400, the CNI MAC, and a default route via 10.88.0.1.
    pub fn cni_like() -> TestNetns {
        let net = TestNetns::empty();
        net.ip("link add eth0 type veth peer name peer0");
        net.ip(&format!("link set eth0 address {CNI_MAC} mtu {CNI_MTU} up"));
        net.ip("link set peer0 up");
        net.ip("addr add 10.88.0.5/16 dev eth0");
        net.ip("-6 addr add fd00::5/64 dev eth0 nodad");
        net.ip("route add default via 10.88.0.1");
        net
    }

    /// Runs `ip ARGS` in the netns (a fixture: podbox itself never runs ip).
    pub fn ip(&self, args: &str) {
        let status = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.path().display()))
            .arg("ip")
            .args(args.split_whitespace())
            .status()
            .expect("running nsenter ip");
        assert!(status.success(), "ip {args}");
    }

    pub fn links(&self) -> Vec<Link> {
        self.netns
            .run(|| Ok(link::links(&mut Netlink::open()?)?))
            .expect("links")
    }

    pub fn link(&self, name: &str) -> Option<Link> {
        self.links().into_iter().find(|l| l.name == name)
    }

    pub fn ingress_filters(&self, name: &str) -> Vec<Filter> {
        let Some(link) = self.link(name) else {
            return Vec::new();
        };
        self.netns
            .run(|| Ok(tc::ingress_filters(&mut Netlink::open()?, link.index)?))
            .expect("filters")
    }

    /// Names of the interfaces with an ingress qdisc.
    pub fn ingress_qdiscs(&self) -> Vec<String> {
        let links = self.links();
        let qdiscs = self
            .netns
            .run(|| Ok(tc::qdiscs(&mut Netlink::open()?)?))
            .expect("qdiscs");
        qdiscs
            .iter()
            .filter(|q| q.is_ingress())
            .filter_map(|q| links.iter().find(|l| l.index == q.index))
            .map(|l| l.name.clone())
            .collect()
    }

    pub fn add_ingress_qdisc(&self, name: &str) -> Result<(), NetworkError> {
        let link = self.link(name).expect(name);
        self.netns
            .run(|| Ok(tc::add_ingress_qdisc(&mut Netlink::open()?, link.index)?))
    }
}

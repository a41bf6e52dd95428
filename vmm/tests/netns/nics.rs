//! Two NICs for the shared test VM, in a namespace of the test's own:
//! eth0 on a tap podbox-vmm opens by name (`tap=pbx0`), eth1 on a tap the
//! test opens and passes in (`fd=N`), and the checks run against them once
//! the agent answers.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use podbox_agent_client::{ctx, AgentClient};
use podbox_protocol::agent::{
    IPAddress, Interface, Route, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use podbox_vmm::config::{MacAddr, NetBackend, NetConfig};

use super::{open_tap_fd, ping, NetNs, Ping};

const RPC: Duration = Duration::from_secs(30);
/// The guest's network stack runs in emulated kernel code on PVM hosts;
/// the first reply also waits for ARP.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
pub const MAC0: MacAddr = MacAddr([0x02, 0x50, 0x42, 0x58, 0x00, 0x01]);
pub const MAC1: MacAddr = MacAddr([0x02, 0x50, 0x42, 0x58, 0x00, 0x02]);
const HOST0: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST0: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// A host address outside eth0's subnet: replies to it need the guest's
/// default route (from UpdateRoutes).
const HOST0_FAR: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 1);
const HOST1: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const GUEST1: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// eth1's MTU: an 8000-byte ping then travels as one frame each way,
/// which spans several guest RX buffers (MRG_RXBUF).
const JUMBO_MTU: u64 = 9000;

pub struct TestNics {
    pub ns: NetNs,
    /// Our copy of eth1's tap, held until the VMM has its own.
    fd: Option<OwnedFd>,
}

impl TestNics {
    /// The namespace with `pbx0` (persistent, addressed, up) in it; None,
    /// saying why, where this host cannot make one.
    pub fn setup() -> Option<TestNics> {
        let make = || -> Result<TestNics, String> {
            let ns = NetNs::create(&format!("podbox-net-{}", std::process::id()))?;
            ns.ip(&["tuntap", "add", "dev", "pbx0", "mode", "tap", "vnet_hdr"])?;
            ns.ip(&["addr", "add", &format!("{HOST0}/24"), "dev", "pbx0"])?;
            ns.ip(&["addr", "add", &format!("{HOST0_FAR}/32"), "dev", "pbx0"])?;
            ns.ip(&["link", "set", "pbx0", "up"])?;
            let fd = ns
                .run_in(|| open_tap_fd("pbx1"))
                .map_err(|e| format!("tap pbx1: {e}"))?;
            ns.ip(&["addr", "add", &format!("{HOST1}/24"), "dev", "pbx1"])?;
            ns.ip(&["link", "set", "pbx1", "mtu", &JUMBO_MTU.to_string(), "up"])?;
            Ok(TestNics { ns, fd: Some(fd) })
        };
        match make() {
            Ok(nics) => Some(nics),
            Err(e) => {
                eprintln!("skipping the virtio-net checks: {e}");
                None
            }
        }
    }

    /// The `--net` flags for the VM; the VMM must start inside the
    /// namespace ([`NetNs::run_in`]) and inherit our fd.
    pub fn configs(&self) -> Vec<NetConfig> {
        let fd = self.fd.as_ref().expect("configs before the VM starts");
        vec![
            NetConfig {
                backend: NetBackend::Tap("pbx0".into()),
                mac: MAC0,
            },
            NetConfig {
                backend: NetBackend::Fd(fd.as_raw_fd()),
                mac: MAC1,
            },
        ]
    }

    /// Once the VMM runs, it holds the tap: closing ours keeps it to one
    /// owner.
    pub fn vm_started(&mut self) {
        self.fd = None;
    }

    /// Addresses and routes through the agent, then pings: small and
    /// fragmented on eth0, through the default route, and single large
    /// frames on eth1; the guest's MACs on the wire must be the --net ones.
    pub fn check(&self, agent: &AgentClient) {
        configure(agent, "eth0", GUEST0, 1500);
        configure(agent, "eth1", GUEST1, JUMBO_MTU);
        let routes = Routes {
            routes: vec![Route {
                dest: "default".into(),
                gateway: HOST0.to_string(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        agent
            .agent
            .update_routes(
                ctx(RPC),
                &UpdateRoutesRequest {
                    routes: Some(routes).into(),
                    ..Default::default()
                },
            )
            .expect("UpdateRoutes");

        let cases = [
            (
                "eth0 56 B",
                Ping {
                    dst: GUEST0,
                    src: None,
                    payload: 56,
                    fragment: false,
                },
                10,
            ),
            (
                "eth0 8000 B fragmented",
                Ping {
                    dst: GUEST0,
                    src: None,
                    payload: 8000,
                    fragment: true,
                },
                5,
            ),
            (
                "eth0 via default route",
                Ping {
                    dst: GUEST0,
                    src: Some(HOST0_FAR),
                    payload: 56,
                    fragment: false,
                },
                3,
            ),
            (
                "eth1 8000 B one frame",
                Ping {
                    dst: GUEST1,
                    src: None,
                    payload: 8000,
                    fragment: false,
                },
                5,
            ),
            (
                "eth1 56 B",
                Ping {
                    dst: GUEST1,
                    src: None,
                    payload: 56,
                    fragment: false,
                },
                5,
            ),
        ];
        for (what, p, count) in &cases {
            let rtts = self
                .ns
                .run_in(|| ping(p, *count, REPLY_TIMEOUT))
                .unwrap_or_else(|e| panic!("ping {what}: {e}"));
            eprintln!("ping {what}: {}", summary(&rtts));
        }
        for (dev, guest, mac) in [("pbx0", GUEST0, MAC0), ("pbx1", GUEST1, MAC1)] {
            let neigh = self.ns.ip(&["neigh", "show", "dev", dev]).unwrap();
            let line = neigh.lines().find(|l| l.starts_with(&format!("{guest} ")));
            assert!(
                line.is_some_and(|l| l.contains(&mac.to_string())),
                "{dev}: the guest {guest} should answer ARP as {mac}; neighbours:\n{neigh}"
            );
        }
    }
}

fn configure(agent: &AgentClient, dev: &str, addr: Ipv4Addr, mtu: u64) {
    let iface = Interface {
        device: dev.into(),
        name: dev.into(),
        ip_addresses: vec![IPAddress {
            family: "inet".into(),
            address: addr.to_string(),
            mask: "24".into(),
            ..Default::default()
        }],
        mtu,
        ..Default::default()
    };
    agent
        .agent
        .update_interface(
            ctx(RPC),
            &UpdateInterfaceRequest {
                interface: Some(iface).into(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("UpdateInterface {dev}: {e}"));
}

fn summary(rtts: &[Duration]) -> String {
    let ms: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let min = ms.iter().copied().fold(f64::MAX, f64::min);
    let max = ms.iter().copied().fold(0.0, f64::max);
    let avg = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    format!(
        "{} replies, rtt min/avg/max {min:.1}/{avg:.1}/{max:.1} ms",
        ms.len()
    )
}

//! The pod's network: the guest's NIC takes the place of the interface CNI
//! made in the pod's network namespace, as Kata's "tcfilter" model does.
//!
//! podbox-vmm runs in the pod's netns (so `/proc/<vmm pid>/ns/net`, the
//! "task pid" containerd sees, is the pod's). There the shim makes a tap
//! and joins it to the CNI interface with tc: an ingress qdisc on each and
//! a filter that redirects every frame to the other's egress. The VMM
//! inherits the tap; the guest NIC gets the CNI interface's MAC, and the
//! agent gives it the interface's addresses and routes, so the pod keeps
//! the identity CNI gave it (IPAM, routes, the peer's ARP/ND entries).
//!
//! Security: the redirect matches every ethertype (ETH_P_ALL) and does not
//! look at the frames, so the guest's kernel (root in the VM, whatever the
//! containers' capabilities) can put any frame on the pod's veth: another
//! source MAC or IP, ARP/ND for addresses that are not the pod's, any
//! ethertype. A runc container without CAP_NET_RAW cannot. Anti-spoofing
//! belongs to the CNI (its MAC/IP spoof checks on the host side of the
//! veth) or, in podbox, to a future source-MAC check in the tap's filter;
//! the redirect itself is no security boundary.
//!
//! - [`netns`]: which netns (the OCI spec's), held by a descriptor;
//! - [`interface`]: choosing the CNI interface, the agent's messages;
//! - [`tap`]: the tap device.
//!
//! Not yet: `ctr run --cni` runs CNI in a netns the shim made only after
//! the VM booted (so the VM has no NIC for it); the first container's Start
//! is then refused naming the interface
//! ([`PodNetwork::check_no_late_interface`]). Wiring a late interface to a
//! NIC the VM got at boot is the next step.

pub mod interface;
pub mod netns;
pub mod tap;

#[cfg(test)]
pub(crate) mod testnet;
#[cfg(test)]
mod tests;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use containerd_shim::protos::ttrpc::Code;
use podbox_netlink::link::{self, LinkChange};
use podbox_netlink::tc::{self, Classifier};
use podbox_netlink::{addr, route, Netlink};
use podbox_vmm_config::MacAddr;

use interface::CniInterface;
pub use netns::{Netns, NetnsSource};
use tap::TAP_NAME;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("host network is not supported for sandboxed pods: the spec has no network namespace (linux.namespaces type \"network\"), and a podbox pod's VM cannot share the host's interfaces")]
    HostNetwork,
    #[error("the pod's network namespace {path}: {source}")]
    OpenNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating a network namespace for the pod: {0}")]
    CreateNetns(#[source] std::io::Error),
    #[error("entering the pod's network namespace: {0}")]
    EnterNetns(#[source] std::io::Error),
    #[error("in the pod's network namespace: {0}")]
    Netlink(#[from] podbox_netlink::Error),
    /// A netlink request about one interface, which `interface` names.
    #[error("{interface}: {source}")]
    Interface {
        interface: String,
        #[source]
        source: podbox_netlink::Error,
    },
    #[error("the pod's network namespace has several interfaces and none is eth0: {names:?}; podbox gives the VM one NIC")]
    AmbiguousInterface { names: Vec<String> },
    #[error("the pod's interface {name} ({kind}) has no Ethernet address: podbox passes the pod's frames to the VM's Ethernet NIC unchanged, which needs an Ethernet interface (veth, macvlan, ipvlan L2); MAC-less ones such as wireguard, tun or ipip are not supported")]
    NoMac { name: String, kind: String },
    #[error("{interface} already has an ingress qdisc (someone else's tc setup: an ingress or clsact qdisc); podbox needs it for the VM's redirect")]
    IngressTaken { interface: String },
    #[error("{interface} appeared in the pod's network namespace after its VM booted (CNI run after the task was created, as `ctr run --cni` does): podbox gives the VM the pod's CNI interface at boot only (CRI pods); run it without --cni, or as a CRI pod")]
    LateInterface { interface: String },
    #[error("creating the pod's tap {name} (/dev/net/tun): {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("the pod's tap {0} vanished while being set up")]
    TapGone(String),
    #[error("joining the pod's interface {interface} to its tap {TAP_NAME}: {source}")]
    NoClassifier {
        interface: String,
        /// Boxed: two netlink errors, which would make every
        /// Result<_, NetworkError> that large.
        #[source]
        source: Box<tc::NoClassifier>,
    },
    #[error("a container of this pod names network namespace {path}, not the pod's ({pod}); the containers of a podbox pod share its VM's network")]
    OtherNetns { path: PathBuf, pod: String },
    #[error("a container of this pod asks for a network namespace of its own; the containers of a podbox pod share its VM's network ({pod})")]
    OwnNetns { pod: String },
}

impl NetworkError {
    /// The ttrpc code containerd gets: the pod's spec, the node's or CNI's
    /// set-up, or podbox's own failure.
    pub fn code(&self) -> Code {
        match self {
            NetworkError::HostNetwork
            | NetworkError::OtherNetns { .. }
            | NetworkError::OwnNetns { .. } => Code::INVALID_ARGUMENT,
            NetworkError::OpenNetns { .. }
            | NetworkError::AmbiguousInterface { .. }
            | NetworkError::NoMac { .. }
            | NetworkError::IngressTaken { .. }
            | NetworkError::LateInterface { .. }
            | NetworkError::NoClassifier { .. } => Code::FAILED_PRECONDITION,
            _ => Code::INTERNAL,
        }
    }
}

/// The CNI interface joined to the tap.
#[derive(Debug)]
pub struct Nic {
    pub cni: CniInterface,
    pub tap_index: u32,
    pub classifier: Classifier,
}

/// The pod's network namespace and, if CNI gave the pod an interface, its
/// wiring to the VM's NIC. [`PodNetwork::tear_down`] (also on drop) leaves
/// the netns as CNI made it.
#[derive(Debug)]
pub struct PodNetwork {
    netns: Netns,
    nic: Option<Nic>,
    /// The shim's copy of the tap until the VMM's spawn takes it.
    tap: Mutex<Option<OwnedFd>>,
    /// Held for the whole tear-down: a second caller (the VM watcher and a
    /// stop at once) returns only once it is done.
    torn_down: Mutex<bool>,
}

impl PodNetwork {
    /// Opens (or makes) the pod's netns and wires its interface to a new
    /// tap. Blocking (netlink on a thread in the netns). On error nothing is
    /// left: no tap, no qdisc, no netns descriptor.
    pub fn set_up(source: &NetnsSource) -> Result<PodNetwork, NetworkError> {
        let netns = Netns::open_or_create(source)?;
        let wired = netns.run(wire)?;
        let (nic, tap) = match wired {
            Some((nic, tap)) => {
                tracing::info!(
                    interface = %nic.cni.name,
                    mac = %nic.cni.mac,
                    classifier = %nic.classifier,
                    "the pod's interface is redirected to {TAP_NAME} for the VM's NIC"
                );
                (Some(nic), Some(tap))
            }
            None => {
                tracing::info!(
                    netns = %netns.origin,
                    "the pod's network namespace has no interface but loopback: the VM gets no NIC"
                );
                (None, None)
            }
        };
        Ok(PodNetwork {
            netns,
            nic,
            tap: Mutex::new(tap),
            torn_down: Mutex::new(false),
        })
    }

    pub fn netns_fd(&self) -> BorrowedFd<'_> {
        self.netns.fd()
    }

    /// A path naming the pod's netns while the shim lives (tests name it
    /// in specs).
    #[cfg(test)]
    pub(crate) fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    pub fn nic(&self) -> Option<&Nic> {
        self.nic.as_ref()
    }

    /// The tap's descriptor and the MAC the guest's NIC must have, once:
    /// the VMM's spawn takes it, and the shim's copy must be closed right
    /// after, so the VMM's exit removes the tap.
    pub fn take_tap(&self) -> Option<(OwnedFd, MacAddr)> {
        let tap = self.tap.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some((tap, self.nic.as_ref()?.cni.mac))
    }

    /// A later container of the pod must name the pod's netns.
    pub fn check_same(&self, source: &NetnsSource) -> Result<(), NetworkError> {
        let pod = self.netns.origin.clone();
        match source {
            NetnsSource::New => Err(NetworkError::OwnNetns { pod }),
            NetnsSource::Path(path) => match self.netns.is(path) {
                Ok(true) => Ok(()),
                Ok(false) => Err(NetworkError::OtherNetns {
                    path: path.clone(),
                    pod,
                }),
                Err(source) => Err(NetworkError::OpenNetns {
                    path: path.clone(),
                    source,
                }),
            },
        }
    }

    /// Removes what [`PodNetwork::set_up`] added (the ingress qdisc on the
    /// CNI interface, with its filter; the tap if it is still there), so CNI
    /// DEL finds the netns as CNI left it. Idempotent; problems are logged.
    /// Blocking.
    pub fn tear_down(&self) {
        let mut torn_down = self.torn_down.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::replace(&mut *torn_down, true) {
            return;
        }
        drop(self.take_tap());
        let Some(nic) = &self.nic else { return };
        let (index, name) = (nic.cni.index, &nic.cni.name);
        let undone = self.netns.run(|| {
            let mut nl = Netlink::open()?;
            let mut problems = Vec::new();
            if let Err(e) = tc::delete_ingress_qdisc(&mut nl, index) {
                problems.push(format!("{name}: {e}"));
            }
            // Gone with the VMM's descriptor, normally. An interface of that
            // name with another index is not the shim's: left alone.
            match link::link_by_name(&mut nl, TAP_NAME) {
                Ok(Some(tap)) if tap.index == nic.tap_index => {
                    if let Err(e) = link::delete_link(&mut nl, tap.index) {
                        problems.push(format!("{TAP_NAME}: {e}"));
                    }
                }
                Ok(Some(other)) => problems.push(format!(
                    "{TAP_NAME} is interface {} now, not the pod's tap (interface {}): left alone",
                    other.index, nic.tap_index
                )),
                Ok(None) => {}
                Err(e) => problems.push(format!("{TAP_NAME}: {e}")),
            }
            Ok(problems)
        });
        match undone {
            Ok(problems) => {
                for problem in problems {
                    tracing::warn!("cleaning up the pod's network: {problem}");
                }
            }
            Err(e) => tracing::warn!("cleaning up the pod's network: {e}"),
        }
    }

    /// Refuses a pod whose netns (one the shim made) gained an interface
    /// after the VM booted: CNI run after the task was created, as `ctr run
    /// --cni` does. podbox wires the CNI interface at boot only, and the pod
    /// must not start believing it has a network it does not.
    pub fn check_no_late_interface(&self) -> Result<(), NetworkError> {
        if !self.netns.created || self.nic.is_some() {
            return Ok(());
        }
        let links = self.netns.run(|| Ok(link::links(&mut Netlink::open()?)?))?;
        // An interface podbox could not take is as late: named either way.
        let late = match interface::choose(&links) {
            Ok(Some(late)) => late.link.name.clone(),
            Ok(None) => return Ok(()),
            Err(e) => e.to_string(),
        };
        Err(NetworkError::LateInterface { interface: late })
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.tear_down();
    }
}

/// In the pod's netns: finds the CNI interface and joins it to a new tap.
fn wire() -> Result<Option<(Nic, OwnedFd)>, NetworkError> {
    let mut nl = Netlink::open()?;
    let links = link::links(&mut nl)?;
    let Some(choice) = interface::choose(&links)? else {
        return Ok(None);
    };
    if !choice.ignored.is_empty() {
        tracing::warn!(
            interface = %choice.link.name,
            ignored = ?choice.ignored,
            "the pod's network namespace has several interfaces; the VM gets {} only, the others do not reach it",
            choice.link.name
        );
    }
    let cni = interface::describe(
        choice.link,
        &links,
        &addr::addresses(&mut nl)?,
        &route::list_routes(&mut nl)?,
    )?;
    for warning in &cni.route_warnings {
        tracing::warn!(interface = %cni.name, "{warning}");
    }
    let on_cni = |source| NetworkError::Interface {
        interface: format!("the pod's interface {} (index {})", cni.name, cni.index),
        source,
    };
    // On error below, dropping the descriptor removes the tap and its qdisc.
    let tap = tap::create(TAP_NAME)?;
    let tap_link = link::link_by_name(&mut nl, TAP_NAME)?
        .ok_or_else(|| NetworkError::TapGone(TAP_NAME.into()))?;
    let on_tap = |source| NetworkError::Interface {
        interface: format!("the pod's tap {TAP_NAME} (index {})", tap_link.index),
        source,
    };
    let up = LinkChange {
        up: Some(true),
        mtu: Some(cni.mtu),
        mac: None,
    };
    link::set_link(&mut nl, tap_link.index, &up).map_err(on_tap)?;
    tc::add_ingress_qdisc(&mut nl, tap_link.index).map_err(on_tap)?;
    // EEXIST here is someone else's qdisc: it is left alone.
    tc::add_ingress_qdisc(&mut nl, cni.index).map_err(|e| match e.errno() {
        Some(libc::EEXIST) => NetworkError::IngressTaken {
            interface: cni.name.clone(),
        },
        _ => on_cni(e),
    })?;
    let redirected = redirect(&mut nl, &cni, tap_link.index);
    match redirected {
        Ok(classifier) => Ok(Some((
            Nic {
                cni,
                tap_index: tap_link.index,
                classifier,
            },
            tap,
        ))),
        Err(e) => {
            if let Err(undo) = tc::delete_ingress_qdisc(&mut nl, cni.index) {
                tracing::warn!("undoing the pod's network: {}: {undo}", cni.name);
            }
            Err(e)
        }
    }
}

/// Both directions, with the first classifier the kernel has.
fn redirect(nl: &mut Netlink, cni: &CniInterface, tap: u32) -> Result<Classifier, NetworkError> {
    let classifier =
        tc::add_redirect_any(nl, cni.index, tap).map_err(|source| NetworkError::NoClassifier {
            interface: cni.name.clone(),
            source: Box::new(source),
        })?;
    tc::add_redirect(nl, tap, cni.index, classifier).map_err(|source| NetworkError::Interface {
        interface: format!("the pod's tap {TAP_NAME} (index {tap})"),
        source,
    })?;
    Ok(classifier)
}

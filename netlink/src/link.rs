//! Network interfaces: find them, read what matters to podbox, set them up.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{Error, Netlink};

/// What podbox reads of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address; empty for interfaces without one (lo has zeros).
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    /// The rtnetlink kind ("veth", "tun", "bridge", ...), if it has one.
    pub kind: Option<String>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Link {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            kind: None,
        };
        for attribute in &m.attributes {
            match attribute {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => link.mac = a.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// Every interface of the socket's network namespace.
pub fn links(nl: &mut Netlink) -> Result<Vec<Link>, Error> {
    let replies = nl.dump(
        "list interfaces",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )?;
    Ok(replies
        .iter()
        .filter_map(|r| match r {
            RouteNetlinkMessage::NewLink(m) => Some(Link::from_message(m)),
            _ => None,
        })
        .collect())
}

/// The interface called `name`, if there is one.
pub fn link_by_name(nl: &mut Netlink, name: &str) -> Result<Option<Link>, Error> {
    let mut request = LinkMessage::default();
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    match nl.request(
        &format!("find interface {name}"),
        RouteNetlinkMessage::GetLink(request),
        0,
    ) {
        Ok(replies) => Ok(replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewLink(m) => Some(Link::from_message(m)),
            _ => None,
        })),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What `set_link` changes; `None` leaves a property as it is.
#[derive(Debug, Default, Clone)]
pub struct LinkChange {
    pub up: Option<bool>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
}

/// Changes interface `index` (RTM_SETLINK).
pub fn set_link(nl: &mut Netlink, index: u32, change: &LinkChange) -> Result<(), Error> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    if let Some(up) = change.up {
        request.header.change_mask = LinkFlags::Up;
        if up {
            request.header.flags = LinkFlags::Up;
        }
    }
    if let Some(mtu) = change.mtu {
        request.attributes.push(LinkAttribute::Mtu(mtu));
    }
    if let Some(mac) = change.mac {
        request
            .attributes
            .push(LinkAttribute::Address(mac.to_vec()));
    }
    nl.change(
        &format!("change interface {index} ({change:?})"),
        RouteNetlinkMessage::SetLink(request),
        0,
    )
}

/// Renames interface `index` to `name` (RTM_SETLINK with IFLA_IFNAME). The
/// kernel refuses to rename an interface that is up (EBUSY): bring it down
/// first.
pub fn rename_link(nl: &mut Netlink, index: u32, name: &str) -> Result<(), Error> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    nl.change(
        &format!("rename interface {index} to {name}"),
        RouteNetlinkMessage::SetLink(request),
        0,
    )
}

/// Creates a veth pair `name` <-> `peer` (both down) in the socket's network
/// namespace; an interface of either name already there is an error (EEXIST).
pub fn add_veth(nl: &mut Netlink, name: &str, peer: &str) -> Result<(), Error> {
    let mut peer_message = LinkMessage::default();
    peer_message
        .attributes
        .push(LinkAttribute::IfName(peer.to_string()));
    let mut request = LinkMessage::default();
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_string()));
    request.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
    ]));
    nl.change(
        &format!("create veth pair {name} <-> {peer}"),
        RouteNetlinkMessage::NewLink(request),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Removes interface `index` (RTM_DELLINK); its addresses, routes, qdiscs and
/// filters go with it.
pub fn delete_link(nl: &mut Netlink, index: u32) -> Result<(), Error> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    nl.change(
        &format!("delete interface {index}"),
        RouteNetlinkMessage::DelLink(request),
        0,
    )
}

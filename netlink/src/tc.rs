//! Traffic control: the ingress qdisc and the redirect filters that join a
//! pod's tap to its CNI interface (Kata's "tcfilter" model). Every frame that
//! arrives on one device is sent out of the other unchanged, both ways, so
//! the guest's NIC takes the CNI interface's place on the pod's network
//! without a bridge, NAT or any address on the host side.
//!
//! The classifier that matches every frame is `matchall` where the kernel
//! has it; kernels built without it (this project's test hosts among them)
//! often still have `bpf`, which does the same with a one-instruction
//! classic BPF program. [`add_redirect_any`] tries them in that order.

use std::fmt;

use netlink_packet_core::{
    DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable, NLA_F_NESTED,
    NLA_F_NET_BYTEORDER, NLM_F_CREATE, NLM_F_EXCL,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterBpfOption, TcFilterMatchAllOption, TcHandle, TcMessage, TcMirror, TcMirrorActionType,
    TcOption,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{Error, Netlink};

/// Every protocol (`protocol all`), as the filter header carries it: in
/// network byte order.
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle, `ffff:`; its filters hang off it.
const INGRESS: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
// cls_bpf attributes netlink-packet-route does not model (linux/pkt_cls.h).
const TCA_BPF_ACT: u16 = 1;
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;
/// Classic BPF `ret #0xffffffff` (BPF_RET | BPF_K): for cls_bpf, -1 means
/// "matched, use the filter's default class", after which its actions run.
const BPF_RET_K: u16 = 0x06;
const BPF_MATCH_ALL: u32 = 0xffff_ffff;

/// How a redirect filter matches every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classifier {
    MatchAll,
    /// cls_bpf with a classic BPF program that accepts every packet.
    Bpf,
}

impl Classifier {
    /// The kernel's name for it (TCA_KIND).
    pub fn kind(self) -> &'static str {
        match self {
            Classifier::MatchAll => "matchall",
            Classifier::Bpf => "bpf",
        }
    }
}

impl fmt::Display for Classifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Neither classifier could be used: the kernel lacks both, or the request
/// failed for another reason (each error says which).
#[derive(Debug, thiserror::Error)]
#[error("no tc classifier can redirect interface {from} to {to} (the kernel needs cls_matchall or cls_bpf, and act_mirred): matchall: {matchall}; bpf: {bpf}")]
pub struct NoClassifier {
    pub from: u32,
    pub to: u32,
    #[source]
    pub matchall: Error,
    pub bpf: Error,
}

/// Adds the ingress qdisc (`ffff:`) to interface `index`; one already there
/// is an error (EEXIST): podbox does not share an interface's ingress.
pub fn add_ingress_qdisc(nl: &mut Netlink, index: u32) -> Result<(), Error> {
    let mut request = message(index)?;
    request.header.handle = INGRESS;
    request.header.parent = TcHandle::INGRESS;
    request
        .attributes
        .push(TcAttribute::Kind("ingress".to_string()));
    nl.change(
        &format!("add the ingress qdisc to interface {index}"),
        RouteNetlinkMessage::NewQueueDiscipline(request),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Removes interface `index`'s ingress qdisc and with it every filter on it.
/// Returns false when there was none (or no such interface): removing twice
/// is not an error.
pub fn delete_ingress_qdisc(nl: &mut Netlink, index: u32) -> Result<bool, Error> {
    let mut request = message(index)?;
    request.header.handle = INGRESS;
    request.header.parent = TcHandle::INGRESS;
    match nl.change(
        &format!("delete the ingress qdisc of interface {index}"),
        RouteNetlinkMessage::DelQueueDiscipline(request),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Adds a filter to interface `from`'s ingress qdisc that sends every frame
/// out of interface `to` (`mirred egress redirect`).
pub fn add_redirect(
    nl: &mut Netlink,
    from: u32,
    to: u32,
    classifier: Classifier,
) -> Result<(), Error> {
    let mut request = message(from)?;
    request.header.parent = INGRESS;
    // tcm_info: priority (0: the kernel picks one) << 16 | protocol.
    request.header.info = u32::from(ETH_P_ALL.to_be());
    let actions = vec![redirect_action(to)];
    let options = match classifier {
        Classifier::MatchAll => vec![TcOption::MatchAll(TcFilterMatchAllOption::Action(actions))],
        Classifier::Bpf => bpf_options(actions),
    };
    request
        .attributes
        .push(TcAttribute::Kind(classifier.kind().to_string()));
    request.attributes.push(TcAttribute::Options(options));
    nl.change(
        &format!("redirect interface {from} to {to} with a {classifier} filter"),
        RouteNetlinkMessage::NewTrafficFilter(request),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// [`add_redirect`] with the first classifier the kernel has, matchall then
/// bpf; returns the one used.
pub fn add_redirect_any(nl: &mut Netlink, from: u32, to: u32) -> Result<Classifier, NoClassifier> {
    let matchall = match add_redirect(nl, from, to, Classifier::MatchAll) {
        Ok(()) => return Ok(Classifier::MatchAll),
        Err(e) => e,
    };
    match add_redirect(nl, from, to, Classifier::Bpf) {
        Ok(()) => Ok(Classifier::Bpf),
        Err(bpf) => Err(NoClassifier {
            from,
            to,
            matchall,
            bpf,
        }),
    }
}

fn message(index: u32) -> Result<TcMessage, Error> {
    let index = i32::try_from(index).map_err(|_| Error::Unexpected {
        what: "tc request".into(),
        detail: format!("interface index {index} is out of range"),
    })?;
    Ok(TcMessage::with_index(index))
}

fn redirect_action(to: u32) -> TcAction {
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    action
}

/// cls_bpf options: the program (`ret #-1`) and the actions, as raw
/// attributes (netlink-packet-route has neither TCA_BPF_OPS nor TCA_BPF_ACT).
fn bpf_options(actions: Vec<TcAction>) -> Vec<TcOption> {
    let mut instruction = Vec::with_capacity(8);
    instruction.extend_from_slice(&BPF_RET_K.to_ne_bytes()); // code
    instruction.extend_from_slice(&[0, 0]); // jt, jf
    instruction.extend_from_slice(&BPF_MATCH_ALL.to_ne_bytes()); // k
    let mut encoded = vec![0; actions.as_slice().buffer_len()];
    actions.as_slice().emit(&mut encoded);
    [
        DefaultNla::new(TCA_BPF_OPS_LEN, 1u16.to_ne_bytes().to_vec()),
        DefaultNla::new(TCA_BPF_OPS, instruction),
        DefaultNla::new(TCA_BPF_ACT | NLA_F_NESTED, encoded),
    ]
    .into_iter()
    .map(|nla| TcOption::Bpf(TcFilterBpfOption::Other(nla)))
    .collect()
}

/// A filter on an ingress qdisc, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub index: u32,
    /// The classifier's kind ("matchall", "bpf", ...).
    pub kind: String,
    /// Where its `mirred` action redirects or mirrors to, if it has one.
    pub redirect_to: Option<u32>,
}

/// The filters on interface `index`'s ingress qdisc (none if it has none).
pub fn ingress_filters(nl: &mut Netlink, index: u32) -> Result<Vec<Filter>, Error> {
    let mut request = message(index)?;
    request.header.parent = INGRESS;
    let replies = match nl.dump(
        &format!("list the ingress filters of interface {index}"),
        RouteNetlinkMessage::GetTrafficFilter(request),
    ) {
        Ok(replies) => replies,
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(replies
        .iter()
        .filter_map(|r| match r {
            RouteNetlinkMessage::NewTrafficFilter(m) => filter_from_message(m),
            _ => None,
        })
        .collect())
}

fn filter_from_message(m: &TcMessage) -> Option<Filter> {
    let kind = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.clone()),
        _ => None,
    })?;
    // A dump lists each filter's chain head too (no options): skip it.
    let options = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(o) => Some(o),
        _ => None,
    })?;
    let mut actions = Vec::new();
    for option in options {
        match option {
            TcOption::MatchAll(TcFilterMatchAllOption::Action(a)) => actions.extend(a.clone()),
            TcOption::Bpf(TcFilterBpfOption::Other(nla))
                if nla.kind() & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER) == TCA_BPF_ACT =>
            {
                actions.extend(parse_actions(nla));
            }
            _ => {}
        }
    }
    Some(Filter {
        index: u32::try_from(m.header.index).unwrap_or_default(),
        kind,
        redirect_to: actions.iter().find_map(mirred_target),
    })
}

/// The actions nested in a raw attribute (cls_bpf's TCA_BPF_ACT).
fn parse_actions(nla: &DefaultNla) -> Vec<TcAction> {
    let mut bytes = vec![0; nla.buffer_len()];
    nla.emit(&mut bytes);
    let outer = NlaBuffer::new(&bytes[..]);
    NlasIterator::new(outer.value())
        .filter_map(|inner| TcAction::parse(&inner.ok()?).ok())
        .collect()
}

fn mirred_target(action: &TcAction) -> Option<u32> {
    action.attributes.iter().find_map(|a| match a {
        TcActionAttribute::Options(options) => options.iter().find_map(|o| match o {
            TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) => Some(p.ifindex),
            _ => None,
        }),
        _ => None,
    })
}

/// A qdisc, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qdisc {
    pub index: u32,
    pub kind: String,
    pub handle: TcHandle,
    pub parent: TcHandle,
}

impl Qdisc {
    pub fn is_ingress(&self) -> bool {
        self.kind == "ingress" || self.parent == TcHandle::INGRESS
    }
}

/// Every qdisc of the socket's network namespace.
pub fn qdiscs(nl: &mut Netlink) -> Result<Vec<Qdisc>, Error> {
    let replies = nl.dump(
        "list qdiscs",
        RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
    )?;
    Ok(replies
        .iter()
        .filter_map(|r| match r {
            RouteNetlinkMessage::NewQueueDiscipline(m) => Some(Qdisc {
                index: u32::try_from(m.header.index).unwrap_or_default(),
                kind: m.attributes.iter().find_map(|a| match a {
                    TcAttribute::Kind(k) => Some(k.clone()),
                    _ => None,
                })?,
                handle: m.header.handle,
                parent: m.header.parent,
            }),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests;

//! The virtio-net header (virtio 1.2, 5.1.6), the device's feature bits,
//! and how negotiated features map to the tap's offloads.
//!
//! With VIRTIO_F_VERSION_1 the header is always the 12-byte
//! `virtio_net_hdr_v1` (with `num_buffers`), whether or not MRG_RXBUF is
//! negotiated, and the tap is told to use the same size (TUNSETVNETHDRSZ),
//! so frames pass between guest and tap with their header unchanged except
//! `num_buffers`, which only the device knows.

use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// Size of `struct virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
const ETH_HLEN: usize = 14;
/// The largest frame (Ethernet header and payload, after the virtio
/// header) the guest may send: a 64 KiB GSO super-frame.
pub const MAX_TX_FRAME: usize = 64 * 1024;
/// The largest frame the tap may hand us: 64 KiB of IP packet plus the
/// Ethernet and a VLAN header, with room to spare so that a read that
/// fills the buffer means truncation.
pub const MAX_RX_FRAME: usize = 65_535 + ETH_HLEN + 4 + 8;

// Feature bits (virtio 1.2, 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;

/// Header flags and GSO types (virtio 1.2, 5.1.6).
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// Where the guest's TCP checksum goes: `check` in the TCP header.
const TCP_CSUM_OFFSET: u16 = 16;
/// A TCP header without options.
const TCP_HLEN: usize = 20;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
/// The smallest segment size a TSO frame may ask for: Linux's floor for
/// the MSS it sends with (TCP_MIN_SND_MSS, the least `tcp_min_snd_mss`
/// takes). Smaller would let one 64 KiB frame become thousands of
/// segments on a host path without TSO.
pub const MIN_GSO_SIZE: u16 = 48;

/// Config space `status`: the link is up (with VIRTIO_NET_F_STATUS).
pub const S_LINK_UP: u16 = 1;

/// What the device offers whatever the tap does: the TX direction
/// (CSUM, HOST_TSO*) only needs the tap to accept GSO frames written with a
/// vnet header, which every IFF_VNET_HDR tap does.
pub const BASE_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6;

/// Guest features (RX direction) and the tap offload that must be on for the
/// tap to hand us such frames. Guest UFO/USO stay off: Linux guests do not
/// need them and not every host kernel has them.
const GUEST_OFFLOADS: [(u64, libc::c_uint); 3] = [
    (F_GUEST_CSUM, libc::TUN_F_CSUM),
    (F_GUEST_TSO4, libc::TUN_F_TSO4),
    (F_GUEST_TSO6, libc::TUN_F_TSO6),
];

/// The TUNSETOFFLOAD sets to try on a new tap, best first (the kernel
/// refuses a set with any flag it does not know, so fall back in steps).
pub const TAP_OFFLOAD_CANDIDATES: [libc::c_uint; 3] = [
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
    libc::TUN_F_CSUM | libc::TUN_F_TSO4,
    libc::TUN_F_CSUM,
];

/// The guest features to offer given the tap offloads the tap accepted.
pub fn guest_features_for(tap_offloads: libc::c_uint) -> u64 {
    let mut features = 0;
    for &(feature, tun) in &GUEST_OFFLOADS {
        if tap_offloads & tun == tun {
            features |= feature;
        }
    }
    // TSO frames come with partial checksums: never offer TSO without CSUM.
    if features & F_GUEST_CSUM == 0 {
        features = 0;
    }
    features
}

/// The TUNSETOFFLOAD flags for the features the guest accepted: exactly
/// what it can take, so the tap never sends it a frame it did not ask for.
pub fn tap_offloads_for(acked: u64) -> libc::c_uint {
    if acked & F_GUEST_CSUM == 0 {
        return 0;
    }
    GUEST_OFFLOADS
        .iter()
        .filter(|&&(feature, _)| acked & feature != 0)
        .fold(0, |acc, &(_, t)| acc | t)
}

/// Why a guest frame's header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Undersize(usize),
    #[error("flags {0:#x} not allowed")]
    Flags(u8),
    #[error("partial checksum without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    CsumOutside { start: u16, offset: u16, len: usize },
    #[error("checksum starting at {0}, inside the Ethernet header")]
    CsumInEthernetHeader(u16),
    #[error("GSO type {0:#x} not negotiated")]
    GsoType(u8),
    #[error(
        "TSO frame without a partial TCP checksum (NEEDS_CSUM, csum_offset {TCP_CSUM_OFFSET})"
    )]
    GsoNoTcpCsum,
    #[error("TSO frame with gso_size {0}, below {MIN_GSO_SIZE}")]
    GsoSize(u16),
    #[error("TSO frame with hdr_len {hdr_len} beyond its {len} bytes")]
    GsoHdrLen { hdr_len: u16, len: usize },
    #[error(
        "TSO frame's TCP header at {start} does not fit a {len}-byte frame after its IP header"
    )]
    GsoTcpOutside { start: u16, len: usize },
    #[error("GSO type {gso_type:#x} on a frame of ethertype {ethertype:#06x}")]
    GsoProtocol { gso_type: u8, ethertype: u16 },
}

/// The frame's ethertype and where its network header starts, past one
/// 802.1Q tag if there is one; None when the frame is too short for them.
fn network_header(frame: &[u8]) -> Option<(u16, usize)> {
    let at = |i: usize| Some(u16::from_be_bytes([*frame.get(i)?, *frame.get(i + 1)?]));
    match at(12)? {
        ETH_P_8021Q => Some((at(16)?, ETH_HLEN + 4)),
        ethertype => Some((ethertype, ETH_HLEN)),
    }
}

/// Checks the header of a TX frame (`hdr` then `frame`, the Ethernet frame)
/// against the negotiated features and the spec's rules for the driver.
/// The tap checks again; this keeps frames the guest was not allowed to
/// send out of the host's stack and counts them as the guest's fault.
pub fn check_tx_header(hdr: &[u8; HDR_LEN], frame: &[u8], acked: u64) -> Result<(), HeaderError> {
    let flags = hdr[0];
    let gso_type = hdr[1];
    let hdr_len = u16::from_le_bytes([hdr[2], hdr[3]]);
    let gso_size = u16::from_le_bytes([hdr[4], hdr[5]]);
    let csum_start = u16::from_le_bytes([hdr[6], hdr[7]]);
    let csum_offset = u16::from_le_bytes([hdr[8], hdr[9]]);
    let frame_len = frame.len();
    if frame_len < ETH_HLEN {
        return Err(HeaderError::Undersize(frame_len));
    }
    // DATA_VALID is for the device to set (5.1.6.2.1: the driver MUST NOT).
    if flags & !HDR_F_NEEDS_CSUM != 0 {
        return Err(HeaderError::Flags(flags));
    }
    let needs_csum = flags & HDR_F_NEEDS_CSUM != 0;
    if needs_csum {
        if acked & F_CSUM == 0 {
            return Err(HeaderError::CsumNotNegotiated);
        }
        // A checksum written over the MAC header is no L4 checksum; the
        // host stack's software fallback must never be handed one.
        if usize::from(csum_start) < ETH_HLEN {
            return Err(HeaderError::CsumInEthernetHeader(csum_start));
        }
        let end = usize::from(csum_start) + usize::from(csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::CsumOutside {
                start: csum_start,
                offset: csum_offset,
                len: frame_len,
            });
        }
    }
    let (allowed, ethertype, ip_hlen) = match gso_type {
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => (acked & F_HOST_TSO4 != 0, ETH_P_IPV4, IPV4_HLEN),
        GSO_TCPV6 => (acked & F_HOST_TSO6 != 0, ETH_P_IPV6, IPV6_HLEN),
        _ => (false, 0, 0),
    };
    if !allowed {
        return Err(HeaderError::GsoType(gso_type));
    }
    if !needs_csum || csum_offset != TCP_CSUM_OFFSET {
        return Err(HeaderError::GsoNoTcpCsum);
    }
    if gso_size < MIN_GSO_SIZE {
        return Err(HeaderError::GsoSize(gso_size));
    }
    if usize::from(hdr_len) > frame_len {
        return Err(HeaderError::GsoHdrLen {
            hdr_len,
            len: frame_len,
        });
    }
    let (found, l3) = network_header(frame).unwrap_or((0, ETH_HLEN));
    if found != ethertype {
        return Err(HeaderError::GsoProtocol {
            gso_type,
            ethertype: found,
        });
    }
    let start = usize::from(csum_start);
    if start < l3 + ip_hlen || start + TCP_HLEN > frame_len {
        return Err(HeaderError::GsoTcpOutside {
            start: csum_start,
            len: frame_len,
        });
    }
    Ok(())
}

/// Makes the tap's header of an RX frame say only what the guest
/// negotiated: without GUEST_CSUM the flags must be 0 (5.1.6.4.1), and a
/// GSO type the guest did not accept cannot be delivered (Err: the frame
/// is dropped). The tap's offloads (TUNSETOFFLOAD) already follow the
/// guest's features; this keeps a tap that disagrees from reaching it.
pub fn fix_rx_header(hdr: &mut [u8], acked: u64) -> Result<(), HeaderError> {
    if acked & F_GUEST_CSUM == 0 {
        hdr[0] = 0;
    }
    let allowed = match hdr[1] {
        GSO_NONE => true,
        GSO_TCPV4 => acked & F_GUEST_TSO4 != 0,
        GSO_TCPV6 => acked & F_GUEST_TSO6 != 0,
        _ => false,
    };
    // (TSO frames come with partial checksums: never without GUEST_CSUM.)
    if !allowed || (hdr[1] != GSO_NONE && acked & F_GUEST_CSUM == 0) {
        return Err(HeaderError::GsoType(hdr[1]));
    }
    Ok(())
}

//! The virtio-net header's rules and the offloads they follow from.

use super::*;
use crate::devices::virtio::VirtioDevice;
use podbox_vmm_config::MacAddr;

/// A TSO header: NEEDS_CSUM with the TCP checksum (csum_offset 16) of a TCP
/// header at `csum_start`, and `gso_size`.
fn tso(gso_type: u8, gso_size: u16, csum_start: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = HDR_F_NEEDS_CSUM;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&(csum_start + 20).to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

/// An Ethernet frame of `len` bytes with `ethertype`, behind `vlan` 802.1Q
/// tags.
fn eth(len: usize, ethertype: u16, vlan: bool) -> Vec<u8> {
    let mut f = vec![0u8; len];
    let at = if vlan {
        f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        16
    } else {
        12
    };
    f[at..at + 2].copy_from_slice(&ethertype.to_be_bytes());
    f
}

const V4: u16 = 0x0800;
const V6: u16 = 0x86dd;
/// Where the TCP header starts after Ethernet and IPv4 / IPv6 headers.
const TCP4: u16 = 14 + 20;
const TCP6: u16 = 14 + 40;

#[test]
fn net_tx_tso_frames_follow_the_rules() {
    let all = TX_OFFLOADS;
    let big4 = eth(65000, V4, false);
    let big6 = eth(65000, V6, false);
    let check = |h: &[u8; HDR_LEN], f: &[u8]| check_tx_header(h, f, all);
    assert_eq!(check(&tso(GSO_TCPV4, 1448, TCP4), &big4), Ok(()));
    assert_eq!(check(&tso(GSO_TCPV6, 1428, TCP6), &big6), Ok(()));
    assert_eq!(
        check(&tso(GSO_TCPV4, 1448, TCP4 + 4), &eth(65000, V4, true)),
        Ok(()),
        "one 802.1Q tag"
    );
    assert_eq!(
        check(&tso(GSO_TCPV4, MIN_GSO_SIZE, TCP4), &big4),
        Ok(()),
        "the smallest MSS Linux sends with"
    );
    // Not negotiated, or never offered.
    assert_eq!(
        check_tx_header(&tso(GSO_TCPV4, 1448, TCP4), &big4, all & !F_HOST_TSO4),
        Err(HeaderError::GsoType(1))
    );
    assert_eq!(
        check_tx_header(&tso(GSO_TCPV6, 1448, TCP6), &big6, all & !F_HOST_TSO6),
        Err(HeaderError::GsoType(4))
    );
    assert_eq!(
        check(&tso(3, 1448, TCP4), &big4),
        Err(HeaderError::GsoType(3)),
        "UFO is never offered"
    );
    assert_eq!(
        check(&tso(0x81, 1448, TCP4), &big4),
        Err(HeaderError::GsoType(0x81)),
        "nor ECN"
    );
    // The TCP checksum: NEEDS_CSUM, at offset 16.
    let mut h = tso(GSO_TCPV4, 1448, TCP4);
    h[0] = 0;
    assert_eq!(check(&h, &big4), Err(HeaderError::GsoNoTcpCsum));
    let mut h = tso(GSO_TCPV4, 1448, TCP4);
    h[8] = 6; // UDP's checksum field
    assert_eq!(check(&h, &big4), Err(HeaderError::GsoNoTcpCsum));
    // Segment size: 0, 1, just below the floor.
    for size in [0, 1, MIN_GSO_SIZE - 1] {
        assert_eq!(
            check(&tso(GSO_TCPV4, size, TCP4), &big4),
            Err(HeaderError::GsoSize(size))
        );
    }
    // hdr_len past the frame.
    let mut h = tso(GSO_TCPV4, 1448, TCP4);
    h[2..4].copy_from_slice(&1000u16.to_le_bytes());
    assert_eq!(
        check(&h, &eth(999, V4, false)),
        Err(HeaderError::GsoHdrLen {
            hdr_len: 1000,
            len: 999
        })
    );
    // Ethertype and GSO type disagree, or no IP at all.
    assert_eq!(
        check(&tso(GSO_TCPV4, 1448, TCP6), &big6),
        Err(HeaderError::GsoProtocol {
            gso_type: GSO_TCPV4,
            ethertype: V6
        })
    );
    assert_eq!(
        check(&tso(GSO_TCPV6, 1448, TCP6), &big4),
        Err(HeaderError::GsoProtocol {
            gso_type: GSO_TCPV6,
            ethertype: V4
        })
    );
    assert!(matches!(
        check(&tso(GSO_TCPV4, 1448, TCP4), &eth(65000, 0x0806, false)),
        Err(HeaderError::GsoProtocol { .. })
    ));
    assert!(matches!(
        check(&tso(GSO_TCPV4, 1448, TCP4 + 4), &eth(65000, 0x0806, true)),
        Err(HeaderError::GsoProtocol { .. })
    ));
    // The TCP header inside the IP header, or not all in the frame.
    assert!(matches!(
        check(&tso(GSO_TCPV4, 1448, TCP4 - 1), &big4),
        Err(HeaderError::GsoTcpOutside { .. })
    ));
    assert!(matches!(
        check(&tso(GSO_TCPV6, 1448, TCP4), &big6),
        Err(HeaderError::GsoTcpOutside { .. })
    ));
    let short = usize::from(TCP4) + 19;
    let mut h = tso(GSO_TCPV4, 1448, TCP4);
    h[2..4].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(
        check(&h, &eth(short, V4, false)),
        Err(HeaderError::GsoTcpOutside { .. })
    ));
    assert_eq!(check(&h, &eth(short + 1, V4, false)), Ok(()));
}

#[test]
fn net_tx_header_flags_and_checksums() {
    let all = TX_OFFLOADS;
    let csum = |flags: u8, start: u16, offset: u16| {
        let mut h = [0u8; HDR_LEN];
        h[0] = flags;
        h[6..8].copy_from_slice(&start.to_le_bytes());
        h[8..10].copy_from_slice(&offset.to_le_bytes());
        h
    };
    let f = |len: usize| eth(len, V4, false);
    assert!(matches!(
        check_tx_header(&csum(HDR_F_NEEDS_CSUM, 34, 16), &f(40), all),
        Err(HeaderError::CsumOutside { .. })
    ));
    assert_eq!(
        check_tx_header(&csum(HDR_F_NEEDS_CSUM, 34, 16), &f(52), all),
        Ok(())
    );
    assert_eq!(
        check_tx_header(&csum(HDR_F_NEEDS_CSUM, 0, 6), &f(52), all),
        Err(HeaderError::CsumInEthernetHeader(0))
    );
    assert_eq!(
        check_tx_header(&csum(HDR_F_NEEDS_CSUM, 13, 16), &f(52), all),
        Err(HeaderError::CsumInEthernetHeader(13))
    );
    assert_eq!(
        check_tx_header(&csum(HDR_F_NEEDS_CSUM, 34, 16), &f(52), VIRTIO_F_VERSION_1),
        Err(HeaderError::CsumNotNegotiated)
    );
    assert_eq!(
        check_tx_header(&csum(HDR_F_DATA_VALID, 0, 0), &f(60), all),
        Err(HeaderError::Flags(HDR_F_DATA_VALID)),
        "DATA_VALID is the device's to set"
    );
    assert_eq!(
        check_tx_header(
            &csum(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID, 34, 16),
            &f(60),
            all
        ),
        Err(HeaderError::Flags(3))
    );
    assert_eq!(
        check_tx_header(&csum(4, 0, 0), &f(60), all),
        Err(HeaderError::Flags(4))
    );
    assert_eq!(
        check_tx_header(&[0; HDR_LEN], &[0; 13], all),
        Err(HeaderError::Undersize(13))
    );
    assert_eq!(check_tx_header(&[0; HDR_LEN], &f(14), all), Ok(()));
}

/// Frames refused by the header rules on the way through the device: each
/// chain goes back, counted as malformed, and only good frames are sent.
#[test]
fn net_tx_refused_headers_are_counted_as_malformed() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, TX_OFFLOADS);
    let with = |h: [u8; HDR_LEN], f: Vec<u8>| {
        let mut v = h.to_vec();
        v.extend(f);
        v
    };
    let frames = [
        with(tso(GSO_TCPV4, 1448, TCP4), eth(3000, V4, false)), // good
        with(tso(GSO_TCPV4, 1, TCP4), eth(3000, V4, false)),    // gso_size 1
        with(tso(GSO_TCPV6, 1448, TCP6), eth(3000, V4, false)), // v6 GSO on v4
        with(
            [HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            eth(60, V4, false),
        ),
    ];
    post_frames(&mem, &txq, &frames);
    w.process_tx();
    assert_eq!(used(&mem, &txq).len(), 4);
    assert_eq!(count(&w.counters.tx_malformed), 3);
    assert_eq!(tap.lock().unwrap().from_guest, vec![frames[0].clone()]);
}

#[test]
fn net_offloads_follow_the_negotiated_features() {
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(
        guest_features_for(all),
        F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
    );
    assert_eq!(guest_features_for(libc::TUN_F_CSUM), F_GUEST_CSUM);
    assert_eq!(guest_features_for(0), 0);
    assert_eq!(
        tap_offloads_for(F_GUEST_CSUM | F_GUEST_TSO4),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4
    );
    assert_eq!(
        tap_offloads_for(F_GUEST_TSO4),
        0,
        "TSO without CSUM is not valid"
    );

    let (tap, state) = fake_tap();
    let mac = MacAddr([0x02, 0, 0, 0, 0, 0x42]);
    let mut dev =
        super::super::Net::new("virtio-net(test)".into(), tap, mac, guest_features_for(all));
    let offered = dev.features();
    assert_eq!(offered & BASE_FEATURES, BASE_FEATURES);
    assert_eq!(offered & F_GUEST_TSO6, F_GUEST_TSO6);
    dev.negotiate(offered & !F_GUEST_TSO6).unwrap();
    dev.negotiate(VIRTIO_F_VERSION_1).unwrap();
    assert_eq!(
        state.lock().unwrap().offloads,
        vec![libc::TUN_F_CSUM | libc::TUN_F_TSO4, 0]
    );
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(
        cfg,
        [0x02, 0, 0, 0, 0, 0x42, 1, 0],
        "MAC, then status LINK_UP"
    );
}

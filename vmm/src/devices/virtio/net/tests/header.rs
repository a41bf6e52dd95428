#[test]
fn net_tx_header_rules() {
    let gso = |t: u8, size: u16, flags: u8| {
        let mut h = [0u8; HDR_LEN];
        h[0] = flags;
        h[1] = t;
        h[4..6].copy_from_slice(&size.to_le_bytes());
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        h
    };
    let all = TX_OFFLOADS;
    assert_eq!(check_tx_header(&gso(1, 1448, 1), 65000, all), Ok(()));
    assert_eq!(check_tx_header(&gso(4, 1448, 1), 65000, all), Ok(()));
    assert_eq!(
        check_tx_header(&gso(1, 1448, 1), 65000, all & !F_HOST_TSO4),
        Err(HeaderError::GsoType(1))
    );
    assert_eq!(
        check_tx_header(&gso(3, 1448, 1), 65000, all),
        Err(HeaderError::GsoType(3)),
        "UFO is never offered"
    );
    assert_eq!(
        check_tx_header(&gso(0x81, 1448, 1), 65000, all),
        Err(HeaderError::GsoType(0x81)),
        "nor ECN"
    );
    assert_eq!(
        check_tx_header(&gso(1, 0, 1), 65000, all),
        Err(HeaderError::GsoIncomplete)
    );
    assert_eq!(
        check_tx_header(&gso(1, 1448, 0), 65000, all),
        Err(HeaderError::GsoIncomplete)
    );
    assert!(matches!(
        check_tx_header(&gso(0, 0, 1), 40, all),
        Err(HeaderError::CsumOutside { .. })
    ));
    assert_eq!(check_tx_header(&gso(0, 0, 1), 52, all), Ok(()));
    assert_eq!(
        check_tx_header(&gso(0, 0, 4), 60, all),
        Err(HeaderError::Flags(4))
    );
    assert_eq!(
        check_tx_header(&[0; HDR_LEN], 13, all),
        Err(HeaderError::Undersize(13))
    );
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
    let mut dev = Net::new("virtio-net(test)".into(), tap, mac, guest_features_for(all));
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


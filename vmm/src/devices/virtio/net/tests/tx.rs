//! Guest → tap.

use super::*;

#[test]
fn net_tx_good_frames_reach_the_tap_byte_exact() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, TX_OFFLOADS);
    let a = frame(60, 1);
    let b = frame(1514, 2);
    mem.write_slice(&a, GuestAddress(DATA)).unwrap();
    mem.write_slice(&b, GuestAddress(DATA + 0x1000)).unwrap();
    // b in three pieces, the header itself split across two.
    let b0 = DATA + 0x1000;
    post(
        &txq,
        0,
        &[
            &[(DATA, a.len() as u32)],
            &[(b0, 5), (b0 + 5, 100), (b0 + 105, b.len() as u32 - 105)],
        ],
        0,
    );
    w.process_tx();
    assert_eq!(tap.lock().unwrap().from_guest, vec![a, b]);
    assert_eq!(used(&mem, &txq), vec![(0, 0), (1, 0)]);
    assert_eq!(count(&w.counters.tx_frames), 2);
    assert_eq!(count(&w.counters.tx_bytes), 60 + 1514);
    assert!(w.need_irq);
}

#[test]
fn net_tx_malformed_chains_are_completed_counted_and_not_sent() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let good = frame(100, 7);
    mem.write_slice(&good, GuestAddress(DATA)).unwrap();
    // A header asking for a checksum offload that was not negotiated.
    let mut csum = frame(100, 8);
    csum[0] = 1;
    mem.write_slice(&csum, GuestAddress(DATA + 0x1000)).unwrap();
    // A header with GSO TCPv4, not negotiated either.
    let mut gso = frame(100, 9);
    gso[1] = 1;
    mem.write_slice(&gso, GuestAddress(DATA + 0x2000)).unwrap();
    let big = (HDR_LEN + MAX_TX_FRAME) as u32;
    let descs = [
        (DATA, 0, 0, 0),                   // 0: zero-length
        (DATA, 8, 0, 0),                   // 1: shorter than the header
        (DATA, 112, F_WRITE, 0),           // 2: write-only in TX
        (0xffff_ffff_0000, 112, 0, 0),     // 3: outside guest memory
        (DATA, 112, F_NEXT, 4),            // 4: loops on itself
        (DATA, 112, F_NEXT, 200),          // 5: next index out of the table
        (DATA, big, F_NEXT, 7),            // 6: 64 KiB + header ...
        (DATA, 1, 0, 0),                   // 7: ... plus one byte: oversize
        (DATA, HDR_LEN as u32 + 10, 0, 0), // 8: a 10-byte frame: undersize
        (DATA + 0x1000, 112, 0, 0),        // 9: checksum offload not negotiated
        (DATA + 0x2000, 112, 0, 0),        // 10: GSO not negotiated
        (DATA, 112, 0, 0),                 // 11: finally a good frame
    ];
    let heads = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11];
    post_raw(&txq, 0, &descs, &heads);
    w.process_tx();
    let returned: Vec<u32> = used(&mem, &txq).iter().map(|&(id, _)| id).collect();
    assert_eq!(
        returned,
        heads.iter().map(|&h| u32::from(h)).collect::<Vec<_>>(),
        "every chain goes back, in order"
    );
    assert_eq!(count(&w.counters.tx_malformed), heads.len() as u64 - 1);
    assert_eq!(
        tap.lock().unwrap().from_guest,
        vec![good],
        "only the good frame is sent"
    );
}

#[test]
fn net_tx_waits_for_a_full_tap_without_losing_frames() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let (a, b) = (frame(64, 1), frame(64, 2));
    mem.write_slice(&a, GuestAddress(DATA)).unwrap();
    mem.write_slice(&b, GuestAddress(DATA + 0x1000)).unwrap();
    post(&txq, 0, &[&[(DATA, 76)], &[(DATA + 0x1000, 76)]], 0);
    tap.lock().unwrap().full = true;
    w.process_tx();
    assert!(w.tx.pending > 0, "the first frame waits in the device");
    assert_eq!(
        used(&mem, &txq).len(),
        1,
        "its chain was returned; the second was not taken"
    );
    w.process_tx();
    assert_eq!(
        used(&mem, &txq).len(),
        1,
        "still full: nothing more is taken"
    );
    tap.lock().unwrap().full = false;
    w.process_tx();
    assert_eq!(
        tap.lock().unwrap().from_guest,
        vec![a, b],
        "in order, none lost"
    );
    assert_eq!(used(&mem, &txq).len(), 2);
    assert_eq!(w.tx.pending, 0);
}

/// The reviewer's case: an avail idx of 100 on a 16-entry ring. virtio-queue
/// refuses to iterate it, so nothing can be taken, yet the ring claims more:
/// the device counts it and returns with notifications on, and serves the
/// ring again once the guest writes a sane index.
#[test]
fn net_tx_avail_idx_far_ahead_returns_and_is_counted() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let good = frame(64, 3);
    mem.write_slice(&good, GuestAddress(DATA)).unwrap();
    post(&txq, 0, &[&[(DATA, good.len() as u32)]], 0);
    txq.avail().idx().store(100);
    let mut w = returns("process_tx on a broken ring", move || {
        let mut w = w;
        w.process_tx();
        w
    });
    assert_eq!(count(&w.counters.ring_errors), 1);
    assert!(used(&mem, &txq).is_empty(), "nothing was taken");
    assert!(!notify_off(&mem, &txq), "the guest's next kick is heard");
    assert!(!kicked(&w, TX), "and nothing else brings us back");
    // Each kick costs one more look, and the count goes up.
    w.process_tx();
    assert_eq!(count(&w.counters.ring_errors), 2);
    // The guest mends its index: the frame goes out.
    txq.avail().idx().store(1);
    w.process_tx();
    assert_eq!(tap.lock().unwrap().from_guest, vec![good]);
    assert_eq!(used(&mem, &txq), vec![(0, 0)]);
    assert_eq!(count(&w.counters.ring_errors), 2);
}

/// A spent budget leaves the rest for the next round, which the device
/// starts itself (the guest was told not to kick).
#[test]
fn net_tx_budget_is_kept_and_the_device_comes_back() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let frames: Vec<_> = (0..6).map(|i| frame(64, i)).collect();
    post_frames(&mem, &txq, &frames);
    w.process_tx_within(4);
    assert_eq!(tap.lock().unwrap().from_guest.len(), 4);
    assert!(notify_off(&mem, &txq));
    assert!(kicked(&w, TX), "the device raised its own TX eventfd");
    w.process_tx_within(4);
    assert_eq!(tap.lock().unwrap().from_guest, frames);
    assert!(!notify_off(&mem, &txq), "drained: the guest kicks again");
    assert!(!kicked(&w, TX));
}

/// A head index past the ring's end cannot be returned: counted as a ring
/// error (virtio-queue would log each at error level), nothing sent or
/// used, and the frame after it still goes out.
#[test]
fn net_tx_head_outside_the_ring_is_counted_not_returned() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    post_raw(&txq, 0, &[], &[QSIZE + 3]);
    let good = frame(60, 1);
    post_frames(&mem, &txq, std::slice::from_ref(&good));
    w.process_tx();
    assert_eq!(count(&w.counters.ring_errors), 1);
    assert_eq!(tap.lock().unwrap().from_guest, vec![good]);
    assert_eq!(used(&mem, &txq), vec![(0, 0)]);
}

//! Tap → guest.

use super::*;

#[test]
fn net_rx_frames_arrive_byte_exact_with_one_buffer_each() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let (a, b) = (frame(60, 3), frame(1514, 4));
    tap.lock().unwrap().to_guest.extend([a.clone(), b.clone()]);
    // Like Linux's "big packets": header and data in separate buffers.
    post(
        &rxq,
        0,
        &[
            &[(DATA, 12), (DATA + 0x100, 2000)],
            &[(DATA + 0x1000, 1526)],
        ],
        F_WRITE,
    );
    w.process_rx();
    assert_eq!(
        used(&mem, &rxq),
        vec![(0, a.len() as u32), (2, b.len() as u32)]
    );
    let mut expect_a = a.clone();
    expect_a[NUM_BUFFERS_OFFSET] = 1;
    let mut got_a = read_mem(&mem, DATA, 12);
    got_a.extend(read_mem(&mem, DATA + 0x100, 60));
    assert_eq!(got_a, expect_a);
    let mut expect_b = b.clone();
    expect_b[NUM_BUFFERS_OFFSET] = 1;
    assert_eq!(read_mem(&mem, DATA + 0x1000, b.len()), expect_b);
    assert_eq!(count(&w.counters.rx_frames), 2);
    assert!(!w.rx.blocked);
}

#[test]
fn net_rx_mergeable_frame_spans_buffers_and_counts_them() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let f = frame(5000, 5);
    tap.lock().unwrap().to_guest.push_back(f.clone());
    let bufs: Vec<[(u64, u32); 1]> = (0..4).map(|i| [(DATA + i * 0x1000, 2048)]).collect();
    let chains: Vec<&[(u64, u32)]> = bufs.iter().map(|b| &b[..]).collect();
    post(&rxq, 0, &chains, F_WRITE);
    w.process_rx();
    let total = f.len() as u32;
    assert_eq!(
        used(&mem, &rxq),
        vec![(0, 2048), (1, 2048), (2, total - 4096)]
    );
    let mut got = Vec::new();
    for (i, &(_, len)) in used(&mem, &rxq).iter().enumerate() {
        got.extend(read_mem(&mem, DATA + i as u64 * 0x1000, len as usize));
    }
    let mut expect = f.clone();
    expect[NUM_BUFFERS_OFFSET] = 3;
    assert_eq!(got, expect);
}

#[test]
fn net_rx_waits_for_buffers_and_resumes_without_dropping() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let (a, b) = (frame(3000, 6), frame(100, 7));
    tap.lock().unwrap().to_guest.extend([a.clone(), b.clone()]);
    w.process_rx();
    assert!(
        w.rx.blocked && w.rx.pending == a.len(),
        "no buffers: the frame waits"
    );
    assert_eq!(
        tap.lock().unwrap().to_guest.len(),
        1,
        "and the tap is not read further"
    );
    // One 2 KiB buffer is not enough for 3 KiB: it is put back untouched.
    let next = post(&rxq, 0, &[&[(DATA, 2048)]], F_WRITE);
    w.rx.blocked = false; // what an RX queue notify does
    w.process_rx();
    assert!(w.rx.blocked);
    assert!(used(&mem, &rxq).is_empty());
    post(
        &rxq,
        next,
        &[&[(DATA + 0x1000, 2048)], &[(DATA + 0x2000, 2048)]],
        F_WRITE,
    );
    w.rx.blocked = false;
    w.process_rx();
    assert_eq!(
        used(&mem, &rxq),
        vec![(0, 2048), (1, a.len() as u32 - 2048), (2, b.len() as u32)]
    );
    assert_eq!(count(&w.counters.rx_frames), 2);
    assert_eq!(count(&w.counters.rx_dropped), 0);
    let mut got_b = read_mem(&mem, DATA + 0x2000, b.len());
    got_b[NUM_BUFFERS_OFFSET] = 0;
    assert_eq!(got_b, b);
}

#[test]
fn net_rx_malformed_chains_are_returned_empty_and_counted() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let f = frame(200, 8);
    tap.lock().unwrap().to_guest.push_back(f.clone());
    let descs = [
        (DATA, 2048, 0, 0),                   // 0: read-only in RX
        (0xffff_ffff_0000, 2048, F_WRITE, 0), // 1: outside guest memory
        (DATA, 8, F_WRITE, 0),                // 2: shorter than the header
        (DATA, 2048, F_WRITE | F_NEXT, 3),    // 3: loops on itself
        (DATA, 0, F_WRITE, 0),                // 4: zero-length
        (DATA + 0x1000, 2048, F_WRITE, 0),    // 5: good
    ];
    post_raw(&rxq, 0, &descs, &[0, 1, 2, 3, 4, 5]);
    w.process_rx();
    assert_eq!(
        used(&mem, &rxq),
        vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, f.len() as u32)]
    );
    assert_eq!(count(&w.counters.rx_malformed), 5);
    assert_eq!(
        count(&w.counters.rx_dropped),
        0,
        "bad chains before a frame cost no frame"
    );
    let mut expect = f;
    expect[NUM_BUFFERS_OFFSET] = 1;
    assert_eq!(read_mem(&mem, DATA + 0x1000, expect.len()), expect);
}

#[test]
fn net_rx_bad_chain_inside_a_mergeable_frame_drops_only_that_frame() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let (a, b) = (frame(3000, 9), frame(100, 10));
    tap.lock().unwrap().to_guest.extend([a, b.clone()]);
    let descs = [
        (DATA, 2048, F_WRITE, 0),          // 0: first part of a
        (DATA + 0x1000, 2048, 0, 0),       // 1: read-only: a is lost
        (DATA + 0x2000, 2048, F_WRITE, 0), // 2: b
    ];
    post_raw(&rxq, 0, &descs, &[0, 1, 2]);
    w.process_rx();
    assert_eq!(used(&mem, &rxq), vec![(0, 0), (1, 0), (2, b.len() as u32)]);
    assert_eq!(
        (
            count(&w.counters.rx_malformed),
            count(&w.counters.rx_dropped)
        ),
        (1, 1)
    );
    assert_eq!(count(&w.counters.rx_frames), 1);
}

#[test]
fn net_rx_frames_that_cannot_fit_are_dropped_and_buffers_kept() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let short = vec![0u8; HDR_LEN + 6];
    let (big, small) = (frame(3000, 11), frame(100, 12));
    tap.lock()
        .unwrap()
        .to_guest
        .extend([short, big, small.clone()]);
    post(&rxq, 0, &[&[(DATA, 1526)]], F_WRITE);
    w.process_rx();
    // The short frame and the one larger than the only buffer are dropped;
    // the buffer is still there for the small one.
    assert_eq!(used(&mem, &rxq), vec![(0, small.len() as u32)]);
    assert_eq!(count(&w.counters.rx_dropped), 2);
    assert_eq!(count(&w.counters.rx_malformed), 0);
}

#[test]
fn net_rx_frame_larger_than_the_whole_ring_is_dropped_not_stalled() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let (big, small) = (frame(4000, 13), frame(100, 14));
    tap.lock().unwrap().to_guest.extend([big, small.clone()]);
    let bufs: Vec<[(u64, u32); 1]> = (0..u64::from(QSIZE))
        .map(|i| [(DATA + i * 0x100, 200)])
        .collect();
    let chains: Vec<&[(u64, u32)]> = bufs.iter().map(|b| &b[..]).collect();
    post(&rxq, 0, &chains, F_WRITE);
    w.process_rx();
    assert_eq!(used(&mem, &rxq), vec![(0, small.len() as u32)]);
    assert_eq!(count(&w.counters.rx_dropped), 1);
}

/// An RX ring whose avail idx is more than a ring ahead: the frame waits,
/// the ring error is counted, and process_rx returns until the guest
/// notifies again.
#[test]
fn net_rx_avail_idx_far_ahead_returns_and_is_counted() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let f = frame(100, 1);
    tap.lock().unwrap().to_guest.push_back(f.clone());
    post(&rxq, 0, &[&[(DATA, 2048)]], F_WRITE);
    rxq.avail().idx().store(100);
    let mut w = returns("process_rx on a broken ring", move || {
        let mut w = w;
        w.process_rx();
        w
    });
    assert_eq!(count(&w.counters.ring_errors), 1);
    assert!(w.rx.blocked && w.rx.pending == f.len(), "the frame waits");
    assert!(used(&mem, &rxq).is_empty());
    rxq.avail().idx().store(1);
    w.rx.blocked = false; // what an RX queue notify does
    w.process_rx();
    assert_eq!(used(&mem, &rxq), vec![(0, f.len() as u32)]);
    assert_eq!(count(&w.counters.rx_frames), 1);
}

/// Bad chains returned one after another each cost a turn of the budget
/// (a guest on another vCPU can refill its ring as fast as they go back):
/// the frame waits and the device comes back for it by itself.
#[test]
fn net_rx_bad_chains_cost_budget_and_the_frame_waits() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let f = frame(100, 2);
    tap.lock().unwrap().to_guest.push_back(f.clone());
    // Eight read-only chains (bad in RX), then a good one.
    let mut descs: Vec<_> = (0..8).map(|_| (DATA, 2048, 0, 0)).collect();
    descs.push((DATA + 0x1000, 2048, F_WRITE, 0));
    let heads: Vec<u16> = (0..9).collect();
    post_raw(&rxq, 0, &descs, &heads);
    w.process_rx_within(4);
    assert_eq!(count(&w.counters.rx_malformed), 4, "one bad chain a turn");
    assert_eq!(w.rx.pending, f.len());
    assert!(!w.rx.blocked);
    assert!(kicked(&w, RX), "the device raised its own RX eventfd");
    w.process_rx_within(8);
    assert_eq!(count(&w.counters.rx_malformed), 8);
    assert_eq!(used(&mem, &rxq).last(), Some(&(8, f.len() as u32)));
    assert_eq!(count(&w.counters.rx_frames), 1);
    assert_eq!(count(&w.counters.rx_dropped), 0);
    assert!(!kicked(&w, RX));
}

/// What the tap's header says reaches the guest only as far as the guest
/// negotiated: flags cleared without GUEST_CSUM (5.1.6.4.1), and a GSO
/// frame it did not accept dropped rather than passed on.
#[test]
fn net_rx_header_says_only_what_the_guest_negotiated() {
    let mem = memory();
    let (rxq, txq) = (
        MockSplitQueue::create(&*mem, GuestAddress(RXQ), QSIZE),
        MockSplitQueue::create(&*mem, GuestAddress(TXQ), QSIZE),
    );
    let (mut w, tap) = worker(&mem, &rxq, &txq, VIRTIO_F_VERSION_1);
    let mut csum = frame(100, 3);
    csum[0] = HDR_F_DATA_VALID;
    let mut gso = frame(3000, 4);
    gso[0] = HDR_F_NEEDS_CSUM;
    gso[1] = GSO_TCPV4;
    let plain = frame(100, 5);
    tap.lock()
        .unwrap()
        .to_guest
        .extend([csum.clone(), gso, plain.clone()]);
    let bufs: Vec<[(u64, u32); 1]> = (0..3).map(|i| [(DATA + i * 0x1000, 4096)]).collect();
    let chains: Vec<&[(u64, u32)]> = bufs.iter().map(|b| &b[..]).collect();
    post(&rxq, 0, &chains, F_WRITE);
    w.process_rx();
    assert_eq!(
        used(&mem, &rxq),
        vec![(0, csum.len() as u32), (1, plain.len() as u32)]
    );
    let got = read_mem(&mem, DATA, HDR_LEN);
    assert_eq!(got[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(count(&w.counters.rx_dropped), 1, "the TSO frame");

    // With GUEST_CSUM and GUEST_TSO4 both come through as they are.
    let acked = VIRTIO_F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4;
    assert_eq!(fix_rx_header(&mut csum.clone()[..HDR_LEN], acked), Ok(()));
    let mut h = [HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(fix_rx_header(&mut h, acked), Ok(()));
    assert_eq!(h[..2], [HDR_F_NEEDS_CSUM, GSO_TCPV4]);
    let mut h6 = [HDR_F_NEEDS_CSUM, GSO_TCPV6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        fix_rx_header(&mut h6, acked),
        Err(HeaderError::GsoType(GSO_TCPV6))
    );
    let mut ecn = [
        HDR_F_NEEDS_CSUM,
        GSO_TCPV4 | 0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    assert!(
        fix_rx_header(&mut ecn, acked).is_err(),
        "ECN is never offered"
    );
}

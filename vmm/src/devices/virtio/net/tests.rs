//! The device's queues driven without KVM: guest memory from vm-memory,
//! rings laid out with virtio-queue's MockSplitQueue, and a fake tap.
//! Every malformed chain must be returned to the guest and counted, and
//! every good frame must arrive byte for byte.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{NetCounters, Worker};
use super::header::*;
use super::tap::Backend;
use super::Net;
use crate::devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use podbox_vmm_config::MacAddr;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: usize = 4 << 20;
const TXQ: u64 = 0x1_0000;
const RXQ: u64 = 0x2_0000;
const QSIZE: u16 = 16;
/// Where test buffers go: well past the rings.
const DATA: u64 = 0x10_0000;

#[derive(Default)]
struct FakeState {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    full: bool,
    offloads: Vec<libc::c_uint>,
}

/// A tap that keeps frames in memory. Its fd (an eventfd) only exists
/// because the device registers its backend with epoll.
struct FakeTap {
    state: Arc<Mutex<FakeState>>,
    fd: EventFd,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Backend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.state.lock().unwrap().to_guest.pop_front();
        let frame = frame.ok_or(io::ErrorKind::WouldBlock)?;
        // Like a tap: a frame larger than the buffer is cut to it.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.state.lock().unwrap();
        if s.full {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        s.from_guest.push(buf.to_vec());
        Ok(buf.len())
    }

    fn set_offloads(&mut self, flags: libc::c_uint) -> io::Result<()> {
        self.state.lock().unwrap().offloads.push(flags);
        Ok(())
    }
}

fn fake_tap() -> (FakeTap, Arc<Mutex<FakeState>>) {
    let state = Arc::new(Mutex::new(FakeState::default()));
    let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (
        FakeTap {
            state: state.clone(),
            fd,
        },
        state,
    )
}

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// Where a mock queue's used ring really is. MockSplitQueue (0.18) puts
/// it `len` bytes after the avail ring's start instead of `2 * len + 6`,
/// over the avail ring's second half, so the queue is given its own.
fn used_ring(q: &MockSplitQueue<GuestMemoryMmap>) -> GuestAddress {
    GuestAddress(q.start().0 + 0x1000)
}

fn queue(q: &MockSplitQueue<GuestMemoryMmap>) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
    let used = used_ring(q).0;
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue
}

/// A worker on the mock queues `rx` and `tx`, with `acked` negotiated.
fn worker(
    mem: &Arc<GuestMemoryMmap>,
    rx: &MockSplitQueue<GuestMemoryMmap>,
    tx: &MockSplitQueue<GuestMemoryMmap>,
    acked: u64,
) -> (Worker<FakeTap>, Arc<Mutex<FakeState>>) {
    let (tap, state) = fake_tap();
    let w = Worker::new(
        "virtio-net(test)".into(),
        mem.clone(),
        [queue(rx), queue(tx)],
        tap,
        acked,
        Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        Arc::new(NetCounters::default()),
    );
    (w, state)
}

/// Lays out raw descriptors `(addr, len, flags, next)` from table index
/// `first` and makes `heads` available after what is already there.
fn post_raw(
    q: &MockSplitQueue<GuestMemoryMmap>,
    first: u16,
    descs: &[(u64, u32, u16, u16)],
    heads: &[u16],
) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        q.desc_table().store(first + i as u16, d).unwrap();
    }
    let idx = q.avail().idx().load();
    for (i, &h) in heads.iter().enumerate() {
        let slot = (usize::from(idx) + i) % usize::from(QSIZE);
        q.avail().ring().ref_at(slot).unwrap().store(h);
    }
    q.avail().idx().store(idx.wrapping_add(heads.len() as u16));
}

/// Posts well-formed chains from table index `first`: each chain a list
/// of `(addr, len)` buffers, all with `flags`. Returns the next free index.
fn post(
    q: &MockSplitQueue<GuestMemoryMmap>,
    mut first: u16,
    chains: &[&[(u64, u32)]],
    flags: u16,
) -> u16 {
    for chain in chains {
        let descs: Vec<_> = chain
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let last = i + 1 == chain.len();
                let next = first + i as u16 + 1;
                (
                    addr,
                    len,
                    flags | if last { 0 } else { F_NEXT },
                    if last { 0 } else { next },
                )
            })
            .collect();
        post_raw(q, first, &descs, &[first]);
        first += chain.len() as u16;
    }
    first
}

/// A frame as the guest or the tap writes it: a header, then an Ethernet
/// frame of `len` bytes of a pattern seeded by `seed`.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

/// The used ring's entries so far: (head, length).
fn used(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let base = used_ring(q).0;
    let n: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let at = base + 4 + (i % u64::from(QSIZE)) * 8;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect()
}

fn read_mem(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    NetCounters::get(c)
}

const TX_OFFLOADS: u64 = VIRTIO_F_VERSION_1 | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6;

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

/// Runs `f` on a thread of its own in a new, empty network namespace, or
/// returns None where this process may not make one (not root).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread, which ends after `f`.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

/// Opens /dev/net/tun as `TUNSETIFF` with `flags` would, for a descriptor
/// to pass to `Tap::from_fd`.
fn raw_tun(name: &str, flags: libc::c_int) -> RawFd {
    // SAFETY: open of a constant path; result checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "/dev/net/tun: {}", io::Error::last_os_error());
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as i16;
    // SAFETY: TUNSETIFF takes a struct ifreq.
    assert_eq!(
        unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) },
        0,
        "{}",
        io::Error::last_os_error()
    );
    fd
}

#[test]
fn net_real_tap_open_by_name_and_inherited_fd_checks() {
    use super::tap::{Tap, TapError};
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: no /dev/net/tun");
        return;
    }
    let Some(()) = in_new_netns(|| {
        let mut tap = Tap::open("pbxtest0").expect("a tap by name");
        assert_eq!(tap.name(), "pbxtest0");
        let offloads = tap.probe_offloads(&TAP_OFFLOAD_CANDIDATES);
        eprintln!("tap offloads accepted: {offloads:#x}");
        assert_ne!(
            offloads & libc::TUN_F_CSUM,
            0,
            "every tap has checksum offload"
        );
        drop(tap);

        let ok = raw_tun(
            "pbxtest1",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        // SAFETY: `ok` is ours and handed over.
        let tap = unsafe { Tap::from_fd(ok) }.expect("a good inherited tap");
        assert_eq!(tap.name(), "pbxtest1");

        // (A tap opened without IFF_NO_PI is not tried: this host's kernel
        // reports IFF_NO_PI for a TAP | VNET_HDR tap anyway.)
        for (flags, missing) in [
            (libc::IFF_TAP | libc::IFF_NO_PI, "IFF_VNET_HDR"),
            (
                libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
                "IFF_TAP",
            ),
        ] {
            let fd = raw_tun("pbxtest2", flags);
            // SAFETY: refused descriptors are not taken over; closed below.
            let err = unsafe { Tap::from_fd(fd) }.unwrap_err();
            assert!(
                matches!(&err, TapError::Flag { flag, .. } if *flag == missing),
                "{err}"
            );
            assert!(err.to_string().contains(missing), "{err}");
            // SAFETY: still ours.
            unsafe { libc::close(fd) };
        }
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: refused, so not taken over; `null` closes it.
        let err = unsafe { Tap::from_fd(null.as_raw_fd()) }.unwrap_err();
        assert!(matches!(err, TapError::GetIff { .. }), "{err}");
    }) else {
        return;
    };
}

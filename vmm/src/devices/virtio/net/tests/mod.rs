//! The device's queues driven without KVM: guest memory from vm-memory,
//! rings laid out with virtio-queue's MockSplitQueue, and a fake tap.
//! Every malformed chain must be returned to the guest and counted, every
//! good frame must arrive byte for byte, and nothing the guest writes into
//! its rings may keep the device from returning.
//!
//! - `tx`, `rx`: the two paths; `header`: the header rules and offloads;
//!   `tap`: a real tap (root only, in a network namespace of its own).

mod header;
mod rx;
mod tap;
mod tx;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{NetCounters, Worker, RX, TX};
use super::header::*;
use super::tap::Backend;
use crate::devices::virtio::{Interrupt, VIRTIO_F_VERSION_1};

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
    let kick = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let w = Worker::new(
        "virtio-net(test)".into(),
        mem.clone(),
        [(queue(rx), kick()), (queue(tx), kick())],
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

/// Writes each frame at its own page from DATA and posts it as a one-buffer
/// TX chain.
fn post_frames(mem: &GuestMemoryMmap, txq: &MockSplitQueue<GuestMemoryMmap>, frames: &[Vec<u8>]) {
    let mut chains = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let at = DATA + i as u64 * 0x1000;
        mem.write_slice(f, GuestAddress(at)).unwrap();
        chains.push([(at, f.len() as u32)]);
    }
    let chains: Vec<&[(u64, u32)]> = chains.iter().map(|c| &c[..]).collect();
    post(txq, 0, &chains, 0);
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

/// Whether the worker raised queue `q`'s eventfd to come back by itself.
fn kicked(w: &Worker<FakeTap>, q: usize) -> bool {
    w.kick[q].read().is_ok()
}

/// Whether the device asks the guest not to notify queue `q`
/// (VRING_USED_F_NO_NOTIFY in the used ring's flags).
fn notify_off(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> bool {
    let flags: u16 = mem.read_obj(used_ring(q)).unwrap();
    flags & 1 != 0
}

/// Runs `f` on a thread and fails the test if it has not returned within
/// 10 s: the device must return whatever the guest wrote, and a test that
/// hangs says less than one that fails.
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    wait.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} did not return"))
}

const TX_OFFLOADS: u64 = VIRTIO_F_VERSION_1 | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6;

//! The virtio-vsock device (type 19): config space, activation, and the
//! event-loop thread that moves packets between the queues and the muxer.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{TxPacket, HDR_SIZE, MAX_PKT_PAYLOAD};
use crate::devices::virtio::{
    pop_chain, read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    TYPE_VSOCK, VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RX: usize = 0;
const TX: usize = 1;
// Queue 2 is the event queue: only used for transport resets, which we never send.
/// epoll tokens for the queue eventfds: above any file descriptor.
const QUEUE_TOKEN: u64 = 1 << 40;

pub struct Vsock {
    cid: u64,
    /// Moves to the event-loop thread at activation.
    muxer: Option<Muxer>,
}

impl Vsock {
    /// A device for guest CID `cid` whose host side is the unix socket the
    /// muxer listens on.
    pub fn new(cid: u64, muxer: Muxer) -> Self {
        Self {
            cid,
            muxer: Some(muxer),
        }
    }
}

impl VirtioDevice for Vsock {
    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let fail = |detail: String| ActivateError::Failed {
            device: "virtio-vsock",
            detail,
        };
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                device: "virtio-vsock",
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        let muxer = self
            .muxer
            .take()
            .ok_or_else(|| fail("activated twice".into()))?;
        let mut queues = Vec::new();
        let mut events = Vec::new();
        for (i, q) in ctx.queues.into_iter().enumerate() {
            muxer
                .epoll()
                .ctl(
                    ControlOperation::Add,
                    q.notify.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, QUEUE_TOKEN + i as u64),
                )
                .map_err(|e| fail(format!("epoll add queue {i}: {e}")))?;
            queues.push(q.queue);
            events.push(q.notify);
        }
        let mut worker = Worker {
            muxer,
            memory: ctx.memory,
            queues,
            events,
            interrupt: ctx.interrupt,
            ring_errors: 0,
        };
        std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || worker.run())
            .map_err(|e| fail(format!("starting its thread: {e}")))?;
        Ok(())
    }
}

/// The device's event loop: everything after activation runs here. Public
/// (with [`Worker::new`], [`Worker::process_tx`] and [`Worker::process_rx`])
/// for the fuzz targets (`fuzz/`), which drive guest rings through it
/// without a thread or KVM.
pub struct Worker {
    muxer: Muxer,
    memory: GuestMemoryMmap,
    queues: Vec<Queue>,
    events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    /// Times a queue could not be read (the guest's avail idx more than a
    /// ring ahead): logged at the 1st, 2nd, 4th... so that a guest that
    /// keeps its ring broken cannot flood the log.
    ring_errors: u64,
}

/// Takes the next chain of `queue`; a ring the guest broke yields None
/// (until it rewrites its avail idx) and is counted in `errors`.
fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    errors: &mut u64,
    name: &str,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
    match pop_chain(queue, mem) {
        Ok(chain) => chain,
        Err(e) => {
            *errors += 1;
            if errors.is_power_of_two() {
                tracing::warn!("virtio-vsock: {name} avail ring unusable: {e} ({errors} so far)");
            }
            None
        }
    }
}

impl Worker {
    /// A worker over `queues` (RX, TX, event) in `memory`, as activation
    /// makes one, without its event loop or queue eventfds.
    pub fn new(
        muxer: Muxer,
        memory: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Worker {
            muxer,
            memory,
            queues,
            events: Vec::new(),
            interrupt,
            ring_errors: 0,
        }
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            if let Err(e) = self.round(-1, &mut events) {
                tracing::error!("virtio-vsock: epoll wait: {e}; device stops");
                return;
            }
        }
    }

    /// One turn of the event loop: waits up to `timeout_ms` (-1: for ever)
    /// for the muxer's sockets or the queues, handles what woke it, then
    /// serves the queues. Only an epoll failure is an error.
    pub fn round(&mut self, timeout_ms: i32, events: &mut [EpollEvent]) -> std::io::Result<()> {
        let n = match self.muxer.epoll().wait(timeout_ms, events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token >= QUEUE_TOKEN {
                if let Some(evt) = self.events.get((token - QUEUE_TOKEN) as usize) {
                    let _ = evt.read();
                }
            } else {
                self.muxer.handle_event(token as RawFd, ev.event_set());
            }
        }
        // Whatever woke us, take the guest's packets first (they may
        // grant credit or open streams), then fill its RX buffers.
        let mut used = self.process_tx();
        used |= self.process_rx();
        if used {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Drains the TX queue; returns whether any buffer was used.
    pub fn process_tx(&mut self) -> bool {
        let mut used = false;
        let mem = &self.memory;
        let queue = &mut self.queues[TX];
        while let Some(chain) = next_chain(queue, mem, &mut self.ring_errors, "TX") {
            let head = chain.head_index();
            match TxPacket::from_chain(mem, chain) {
                Ok(pkt) => self.muxer.on_guest_packet(pkt),
                Err(e) => tracing::debug!("virtio-vsock: dropping TX packet: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::debug!("virtio-vsock: TX add_used: {e}");
            }
            used = true;
        }
        used
    }

    /// Fills RX buffers while the muxer has packets; returns whether any
    /// buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let mut used = false;
        let mem = &self.memory;
        let queue = &mut self.queues[RX];
        let mut scratch = vec![0u8; MAX_PKT_PAYLOAD];
        while self.muxer.has_rx() {
            let Some(chain) = next_chain(queue, mem, &mut self.ring_errors, "RX") else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_SIZE => w,
                Ok(w) => {
                    tracing::debug!(
                        "virtio-vsock: RX buffer of {} bytes is too small; skipped",
                        w.available_bytes()
                    );
                    let _ = queue.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
                Err(e) => {
                    tracing::debug!("virtio-vsock: bad RX chain: {e}; skipped");
                    let _ = queue.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let room = (writer.available_bytes() - HDR_SIZE).min(MAX_PKT_PAYLOAD);
            let Some((mut hdr, n)) = self.muxer.next_rx(&mut scratch[..room]) else {
                // Nothing after all: give the buffer back for next time.
                queue.go_to_previous_position();
                break;
            };
            hdr.len = n as u32;
            use std::io::Write;
            let written = writer
                .write_all(&hdr.to_bytes())
                .and_then(|()| writer.write_all(&scratch[..n]));
            if let Err(e) = written {
                // Writer::new validated the buffers; this is not expected.
                tracing::warn!("virtio-vsock: writing an RX packet: {e}; packet lost");
            }
            if let Err(e) = queue.add_used(mem, head, (HDR_SIZE + n) as u32) {
                tracing::debug!("virtio-vsock: RX add_used: {e}");
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::{Header, OP_REQUEST, OP_RST, TYPE_STREAM};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// Malformed TX chains from the guest, straight through the real queue
    /// code: each is consumed and dropped, the device keeps working, and a
    /// valid packet after them is still served.
    /// A device worker over mock rx/tx/event queues, its muxer's socket in `dir`.
    fn test_worker(
        mem: &GuestMemoryMmap,
        [rx, tx, ev]: [&MockSplitQueue<GuestMemoryMmap>; 3],
        dir: &std::path::Path,
    ) -> Worker {
        Worker {
            muxer: Muxer::new(3, &dir.join("v.sock")).unwrap(),
            memory: mem.clone(),
            queues: vec![
                rx.create_queue().unwrap(),
                tx.create_queue().unwrap(),
                ev.create_queue().unwrap(),
            ],
            events: vec![],
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            ring_errors: 0,
        }
    }

    #[test]
    fn vsock_malformed_tx_chains_are_dropped_without_harm() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
        let hdr = |op, len| Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 9,
            dst_port: 77,
            len,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        };
        mem.write_slice(&hdr(OP_REQUEST, 1000).to_bytes(), GuestAddress(0x9_0000))
            .unwrap();
        mem.write_slice(&hdr(OP_REQUEST, 0).to_bytes(), GuestAddress(0xa_0000))
            .unwrap();
        let descs = [
            (0x8_0000, 10, 0, 0),         // shorter than a header
            (0xffff_ffff_0000, 44, 0, 0), // outside guest memory
            (0x9_0000, 44, 0, 0),         // claims 1000 payload bytes it lacks
            (0xa_0000, 44, F_WRITE, 0),   // write-only: nothing to read
            (0xa_0000, 44, F_NEXT, 4),    // a chain that loops on itself
            (0x8_0000, u32::MAX, 0, 0),   // absurd length
            (0xa_0000, 44, 0, 0),         // finally a valid REQUEST
        ];
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            tx.desc_table().store(i as u16, d).unwrap();
            tx.avail().ring().ref_at(i).unwrap().store(i as u16);
        }
        tx.avail().idx().store(descs.len() as u16);
        // One RX buffer for the answer.
        rx.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(0xb_0000, 4096, F_WRITE, 0)),
            )
            .unwrap();
        rx.avail().ring().ref_at(0).unwrap().store(0);
        rx.avail().idx().store(1);

        let dir = tempfile::tempdir().unwrap();
        let mut worker = test_worker(&mem, [&rx, &tx, &ev], dir.path());
        assert!(worker.process_tx());
        assert_eq!(
            tx.used().idx().load(),
            descs.len() as u16,
            "every chain is returned to the guest"
        );
        // The valid REQUEST (nobody listens on host port 77) gets an RST.
        assert!(worker.process_rx());
        assert_eq!(rx.used().idx().load(), 1);
        let mut raw = [0u8; HDR_SIZE];
        mem.read_slice(&mut raw, GuestAddress(0xb_0000)).unwrap();
        let answer = Header::from_bytes(&raw);
        assert_eq!(
            (answer.op, answer.dst_port, answer.src_port),
            (OP_RST, 9, 77)
        );
    }

    /// Avail idx 100 on 16-entry rings: nothing can be taken, the device
    /// returns at once from both queues and counts it, and serves the ring
    /// again once the guest writes a sane index.
    #[test]
    fn vsock_avail_idx_far_ahead_returns_and_is_counted() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let rx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
        let req = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 9,
            dst_port: 77,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            ..Default::default()
        };
        mem.write_slice(&req.to_bytes(), GuestAddress(0xa_0000))
            .unwrap();
        let d = RawDescriptor::from(SplitDescriptor::new(0xa_0000, 44, 0, 0));
        tx.desc_table().store(0, d).unwrap();
        tx.avail().ring().ref_at(0).unwrap().store(0);
        tx.avail().idx().store(100);
        let d = RawDescriptor::from(SplitDescriptor::new(0xb_0000, 4096, F_WRITE, 0));
        rx.desc_table().store(0, d).unwrap();
        rx.avail().ring().ref_at(0).unwrap().store(0);
        rx.avail().idx().store(100);
        let dir = tempfile::tempdir().unwrap();
        let mut worker = test_worker(&mem, [&rx, &tx, &ev], dir.path());
        assert!(!worker.process_tx());
        assert!(!worker.process_rx());
        assert_eq!(worker.ring_errors, 1, "TX (RX had nothing to send)");
        tx.avail().idx().store(1);
        assert!(worker.process_tx(), "the mended ring is served");
        assert!(!worker.process_rx(), "RX still broken");
        assert_eq!(worker.ring_errors, 2);
        rx.avail().idx().store(1);
        assert!(worker.process_rx());
        assert_eq!(rx.used().idx().load(), 1, "the RST went out");
    }
}

//! The virtio-net device: features, config space, activation, and the
//! event loop that runs on the device's own thread.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use podbox_vmm_config::MacAddr;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Mem, Segment};
use super::header::{
    guest_features_for, tap_offloads_for, BASE_FEATURES, HDR_LEN, MAX_RX_FRAME, MAX_TX_FRAME,
    S_LINK_UP, TAP_OFFLOAD_CANDIDATES,
};
use super::tap::{Backend, Tap};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice, TYPE_NET,
};

const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
// epoll tokens.
const TOKEN_RX_QUEUE: u64 = 0;
const TOKEN_TX_QUEUE: u64 = 1;
const TOKEN_TAP: u64 = 2;

/// What one NIC moved and refused, for logs (and tests). Malformed means
/// the guest broke the rules (the chain was completed and its frame
/// dropped); dropped means a well-formed frame could not be delivered;
/// ring errors count the times a queue could not be read at all (the
/// guest's avail idx more than a ring ahead).
#[derive(Debug, Default)]
pub struct NetCounters {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_malformed: AtomicU64,
    pub rx_malformed: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub ring_errors: AtomicU64,
}

impl NetCounters {
    /// Counts one bad event and logs it: a warning at the 1st, 2nd, 4th,
    /// 8th... of its kind, so a guest that keeps doing it cannot flood the
    /// log, and at debug otherwise.
    pub(super) fn note(
        &self,
        label: &str,
        counter: &AtomicU64,
        what: &str,
        detail: &dyn std::fmt::Display,
    ) {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!("{label}: {what}: {detail} ({n} so far)");
        } else {
            tracing::debug!("{label}: {what}: {detail} ({n} so far)");
        }
    }

    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn summary(&self) -> String {
        let g = Self::get;
        format!(
            "tx {} frames {} B ({} malformed, {} dropped), rx {} frames {} B ({} malformed, {} dropped), {} ring errors",
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.tx_malformed),
            g(&self.tx_dropped),
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.rx_malformed),
            g(&self.rx_dropped),
            g(&self.ring_errors),
        )
    }
}

/// A virtio-net NIC on a [`Backend`] (a [`Tap`] outside tests).
pub struct Net<B: Backend> {
    label: String,
    mac: MacAddr,
    features: u64,
    acked: u64,
    /// Moves to the event-loop thread at activation.
    backend: Option<B>,
    counters: Arc<NetCounters>,
}

impl Net<Tap> {
    /// A NIC on `tap`, offering the guest the receive offloads the tap
    /// accepts.
    pub fn with_tap(mut tap: Tap, mac: MacAddr) -> Self {
        let offloads = tap.probe_offloads(&TAP_OFFLOAD_CANDIDATES);
        let label = format!("virtio-net({})", tap.name());
        Net::new(label, tap, mac, guest_features_for(offloads))
    }
}

impl<B: Backend> Net<B> {
    /// `guest_offloads`: the GUEST_* feature bits the backend can serve.
    pub fn new(label: String, backend: B, mac: MacAddr, guest_offloads: u64) -> Self {
        Self {
            label,
            mac,
            features: BASE_FEATURES | guest_offloads,
            acked: 0,
            backend: Some(backend),
            counters: Arc::default(),
        }
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; 10] {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs; }
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac.0);
        cfg[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg
    }
}

impl<B: Backend> VirtioDevice for Net<B> {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// The tap hands us exactly the offloaded frames the guest accepted.
    fn negotiate(&mut self, acked: u64) -> Result<(), String> {
        let offloads = tap_offloads_for(acked);
        let backend = self.backend.as_mut().ok_or("already activated")?;
        backend
            .set_offloads(offloads)
            .map_err(|e| format!("TUNSETOFFLOAD {offloads:#x}: {e}"))?;
        self.acked = acked;
        tracing::info!(
            "{}: features {acked:#x} negotiated, tap offloads {offloads:#x}",
            self.label
        );
        Ok(())
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let fail = |detail: String| ActivateError::Failed {
            device: "virtio-net",
            detail,
        };
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                device: "virtio-net",
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        let backend = self
            .backend
            .take()
            .ok_or_else(|| fail("activated twice".into()))?;
        let mut queues = ctx.queues.into_iter();
        let (rx, tx) = match (queues.next(), queues.next()) {
            (Some(rx), Some(tx)) => (rx, tx),
            _ => return Err(fail("queues missing".into())),
        };
        // The worker raises its own queue eventfds to come back to a queue
        // it left with work undone: without them a queue could stall.
        let kick = |notify: &EventFd, queue: &str| {
            notify
                .try_clone()
                .map_err(|e| fail(format!("duplicating the {queue} queue eventfd: {e}")))
        };
        let queues = [
            (rx.queue, kick(&rx.notify, "RX")?),
            (tx.queue, kick(&tx.notify, "TX")?),
        ];
        let mut worker = Worker::new(
            self.label.clone(),
            Arc::new(ctx.memory),
            queues,
            backend,
            self.acked,
            ctx.interrupt,
            self.counters.clone(),
        );
        let events = EventLoop::new(&worker, rx.notify, tx.notify)
            .map_err(|e| fail(format!("epoll: {e}")))?;
        std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || events.run(&mut worker))
            .map_err(|e| fail(format!("starting its thread: {e}")))?;
        Ok(())
    }
}

/// Everything the RX path keeps between events.
pub struct RxState {
    /// One frame read from the tap, with its vnet header.
    pub buf: Box<[u8]>,
    /// Length of the frame in `buf` still to be delivered; 0 when none.
    pub pending: usize,
    /// The guest had no buffer for `pending`: the tap is not read until
    /// the guest notifies the RX queue.
    pub blocked: bool,
    /// Chains taken for the frame being delivered: head and used length.
    pub held: Vec<(u16, u32)>,
    /// Buffers of the first held chain (its header gets num_buffers).
    pub first: Vec<Segment>,
}

pub struct TxState {
    pub buf: Box<[u8]>,
    /// A frame the tap would not take yet (EAGAIN); 0 when none.
    pub pending: usize,
}

/// The device state that lives on its thread. Public (with
/// [`Worker::new`] and [`Worker::process`]) for the fuzz targets (`fuzz/`),
/// which drive guest rings through it on a fake backend.
pub struct Worker<B: Backend> {
    pub label: String,
    pub mem: Mem,
    pub queues: [Queue; 2],
    /// Each queue's notify eventfd (RX, TX), raised by the worker itself to
    /// come back to a queue after a spent budget.
    pub kick: [EventFd; 2],
    pub backend: B,
    pub acked: u64,
    pub interrupt: Arc<Interrupt>,
    pub counters: Arc<NetCounters>,
    pub rx: RxState,
    pub tx: TxState,
    /// Scratch list of a chain's buffers.
    pub segs: Vec<Segment>,
    /// Used buffers were added since the last interrupt.
    pub need_irq: bool,
}

impl<B: Backend> Worker<B> {
    pub fn new(
        label: String,
        mem: Mem,
        // RX and TX, each with a duplicate of its notify eventfd.
        queues: [(Queue, EventFd); 2],
        backend: B,
        acked: u64,
        interrupt: Arc<Interrupt>,
        counters: Arc<NetCounters>,
    ) -> Self {
        let [(rx_queue, rx_kick), (tx_queue, tx_kick)] = queues;
        Self {
            label,
            mem,
            queues: [rx_queue, tx_queue],
            kick: [rx_kick, tx_kick],
            backend,
            acked,
            interrupt,
            counters,
            rx: RxState {
                buf: vec![0; HDR_LEN + MAX_RX_FRAME].into_boxed_slice(),
                pending: 0,
                blocked: false,
                held: Vec::new(),
                first: Vec::new(),
            },
            tx: TxState {
                buf: vec![0; HDR_LEN + MAX_TX_FRAME].into_boxed_slice(),
                pending: 0,
            },
            segs: Vec::new(),
            need_irq: false,
        }
    }

    /// With work left on `queue` (a spent budget), the next round must
    /// happen without the guest: raise the queue's own eventfd.
    pub fn come_back_for(&self, queue: usize) {
        if let Err(e) = self.kick[queue].write(1) {
            tracing::warn!("{}: queue {queue} self-notify: {e}", self.label);
        }
    }

    /// The guest broke `queue`'s avail ring (its idx more than a ring
    /// ahead of what was taken): nothing can be taken until it rewrites the
    /// index. Counted and logged (rarely); the caller returns with the
    /// queue's notifications enabled, so each retry costs the guest a kick.
    pub fn ring_broken(&self, queue: usize, e: &virtio_queue::Error) {
        self.note_ring_error(queue, &format!("avail ring unusable: {e}"));
    }

    fn note_ring_error(&self, queue: usize, detail: &dyn std::fmt::Display) {
        let name = if queue == RX { "RX" } else { "TX" };
        let c = &self.counters;
        c.note(&self.label, &c.ring_errors, name, detail);
    }

    /// Returns a chain to the guest. A head out of the ring's range cannot
    /// be returned: counted as a ring error here, because virtio-queue's
    /// add_used would log each one at error level (a guest could flood the
    /// log with them at no cost).
    pub fn complete(&mut self, queue: usize, head: u16, len: u32) {
        if head >= self.queues[queue].size() {
            self.note_ring_error(queue, &format!("head {head} outside the ring"));
            return;
        }
        match self.queues[queue].add_used(&*self.mem, head, len) {
            Ok(()) => self.need_irq = true,
            Err(e) => tracing::debug!("{}: queue {queue}: add_used({head}): {e}", self.label),
        }
    }

    /// One round of work after any event: the guest's frames first, then
    /// the tap's, then one interrupt for both.
    pub fn process(&mut self) {
        self.process_tx();
        self.process_rx();
        if std::mem::take(&mut self.need_irq) {
            self.interrupt.signal_used_queue();
        }
    }
}

/// The epoll set of one device thread and what it waits for on the tap.
struct EventLoop {
    epoll: Epoll,
    rx_notify: EventFd,
    tx_notify: EventFd,
    tap_fd: i32,
    tap_interest: EventSet,
    tap_failed: bool,
}

impl EventLoop {
    fn new<B: Backend>(
        worker: &Worker<B>,
        rx_notify: EventFd,
        tx_notify: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let tap_fd = worker.backend.as_raw_fd();
        for (fd, token, set) in [
            (rx_notify.as_raw_fd(), TOKEN_RX_QUEUE, EventSet::IN),
            (tx_notify.as_raw_fd(), TOKEN_TX_QUEUE, EventSet::IN),
            (tap_fd, TOKEN_TAP, EventSet::IN),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))?;
        }
        Ok(Self {
            epoll,
            rx_notify,
            tx_notify,
            tap_fd,
            tap_interest: EventSet::IN,
            tap_failed: false,
        })
    }

    /// Level-triggered interest in the tap: readable while the guest has
    /// room for frames, writable while a frame waits for the tap.
    fn update_tap_interest<B: Backend>(&mut self, worker: &Worker<B>) {
        if self.tap_failed {
            return;
        }
        let mut want = EventSet::empty();
        if !worker.rx.blocked {
            want |= EventSet::IN;
        }
        if worker.tx.pending > 0 {
            want |= EventSet::OUT;
        }
        if want == self.tap_interest {
            return;
        }
        let ev = EpollEvent::new(want, TOKEN_TAP);
        match self.epoll.ctl(ControlOperation::Modify, self.tap_fd, ev) {
            Ok(()) => self.tap_interest = want,
            Err(e) => tracing::warn!("{}: epoll modify: {e}", worker.label),
        }
    }

    fn run<B: Backend>(mut self, worker: &mut Worker<B>) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            self.update_tap_interest(worker);
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll wait: {e}; device stops", worker.label);
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RX_QUEUE => {
                        let _ = self.rx_notify.read();
                        // New RX buffers: a waiting frame may fit now.
                        worker.rx.blocked = false;
                    }
                    TOKEN_TX_QUEUE => {
                        let _ = self.tx_notify.read();
                    }
                    _ => self.tap_event(worker, ev.event_set()),
                }
            }
            worker.process();
        }
    }

    /// An error or hang-up on the tap (its interface was deleted) would
    /// wake us for ever: stop waiting on it. TX keeps draining the guest's
    /// queue (frames counted as dropped) so the guest does not stall.
    fn tap_event<B: Backend>(&mut self, worker: &Worker<B>, set: EventSet) {
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) && !self.tap_failed {
            tracing::error!(
                "{}: tap reports {set:?}; no more frames to or from it ({})",
                worker.label,
                worker.counters.summary()
            );
            self.tap_failed = true;
            if let Err(e) =
                self.epoll
                    .ctl(ControlOperation::Delete, self.tap_fd, EpollEvent::default())
            {
                tracing::warn!("{}: epoll delete: {e}", worker.label);
            }
        }
    }
}

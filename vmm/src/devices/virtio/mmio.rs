//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register file a driver uses to discover a device, negotiate features,
//! set up queues and start it.
//!
//! Every value here comes from the guest: unknown offsets, bad sizes, queue
//! selectors out of range and out-of-order status writes are ignored (and
//! logged at debug), never trusted.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of one device window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register: KVM ioeventfds are registered here
/// with the queue index as datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5044_4258; // "PDBX"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// One device behind its register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("creating a queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("queue size {0}: not a power of two up to 32768")]
    QueueSize(u16),
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|_| MmioError::QueueSize(max))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(Self {
            device,
            memory,
            interrupt,
            queues,
            queue_events,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The eventfd of each queue, in queue order, for KVM ioeventfd
    /// registration on QueueNotify.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_name(&self) -> &'static str {
        self.device.name()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let (select, count) = (self.queue_select, self.queues.len());
        let q = self.queues.get_mut(select as usize);
        if q.is_none() {
            tracing::debug!("virtio-mmio: queue {select} selected, device has {count}");
        }
        q
    }

    /// Queue setup is only allowed before the driver says DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                "virtio-mmio: {}-byte read of register {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let features = self.device.features();
        let value = match offset {
            0x000 => MAGIC_VALUE,
            0x004 => MMIO_VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write of register {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let setup = self.queue_setup_allowed();
        match offset {
            0x014 => self.device_features_select = v,
            0x020 => {
                if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
                    tracing::debug!("virtio-mmio: feature write after FEATURES_OK ignored");
                    return;
                }
                match self.driver_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    s => tracing::debug!("virtio-mmio: driver features word {s} ignored"),
                }
            }
            0x024 => self.driver_features_select = v,
            0x030 => self.queue_select = v,
            0x038 if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 if setup => {
                let (low, high) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(low, high),
                        0x090 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            QUEUE_NOTIFY_OFFSET => self.notify(v),
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write {v:#x} to register {offset:#x} ignored"),
        }
    }

    /// A QueueNotify that KVM's ioeventfd did not catch (no ioeventfd, or a
    /// queue index without one): forward it to the queue's eventfd.
    fn notify(&self, queue: u32) {
        if !self.activated {
            return;
        }
        match self.queue_events.get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: queue {queue} notify: {e}");
                }
            }
            None => tracing::debug!("virtio-mmio: notify of missing queue {queue}"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2, 3.1.1).
        if v & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: status {v:#x} drops bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 || self.acked_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::debug!(
                    "{}: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.device.name(),
                    self.acked_features
                );
                // FEATURES_OK stays clear: the driver reads it back and fails.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            if let Err(e) = self.device.negotiate(self.acked_features) {
                tracing::warn!(
                    "{}: features {:#x}: {e}; FEATURES_OK refused",
                    self.device.name(),
                    self.acked_features
                );
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let required = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if self.activated || self.status & required != required {
            tracing::debug!(
                "{}: DRIVER_OK without the earlier steps; not started",
                self.device.name()
            );
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.is_valid(&self.memory) {
                tracing::warn!(
                    "{}: queue {i} is not set up validly; device not started",
                    self.device.name()
                );
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
                return;
            }
            let notify = match self.queue_events[i].try_clone() {
                Ok(evt) => evt,
                Err(e) => {
                    tracing::warn!("{}: queue {i} eventfd: {e}", self.device.name());
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    return;
                }
            };
            // The device owns the queue from now on; the transport keeps
            // a fresh one for a reset.
            let fresh = Queue::new(q.max_size()).unwrap_or_default();
            queues.push(ActiveQueue {
                queue: std::mem::replace(q, fresh),
                notify,
            });
        }
        let ctx = ActivateContext {
            memory: self.memory.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                tracing::info!("{}: activated", self.device.name());
            }
            Err(e) => {
                tracing::warn!("activating {}: {e}", self.device.name());
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            tracing::debug!(
                "{}: reset after activation not supported; device keeps running",
                self.device.name()
            );
            return;
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        activated: Arc<Mutex<Option<usize>>>,
    }

    impl VirtioDevice for Dummy {
        fn name(&self) -> &'static str {
            "dummy"
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xab, 0xcd], offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), super::super::ActivateError> {
            *self.activated.lock().unwrap() = Some(ctx.queues.len());
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Option<usize>>>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(
                Box::new(Dummy {
                    activated: activated.clone(),
                }),
                mem,
                irq,
            )
            .unwrap(),
            activated,
        )
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identifies_itself_and_offers_features() {
        let (mut t, _) = transport();
        assert_eq!(r32(&mut t, 0), MAGIC_VALUE);
        assert_eq!(r32(&mut t, 4), 2);
        assert_eq!(r32(&mut t, 8), 42);
        assert_eq!(r32(&mut t, 0x10), 1);
        w32(&mut t, 0x14, 1);
        assert_eq!(r32(&mut t, 0x10), 1, "VERSION_1 is bit 32");
        let mut cfg = [0u8; 4];
        t.read(0x100, &mut cfg);
        assert_eq!(cfg, [0xab, 0xcd, 0, 0]);
    }

    #[test]
    fn full_driver_sequence_activates_the_device() {
        let (mut t, activated) = transport();
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut t, 0x24, 1);
        w32(&mut t, 0x20, 1);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        for q in 0..2u32 {
            w32(&mut t, 0x30, q);
            assert_eq!(r32(&mut t, 0x34), 16);
            w32(&mut t, 0x38, 16);
            let base = 0x1000 * (q + 1) * 4;
            w32(&mut t, 0x80, base);
            w32(&mut t, 0x90, base + 0x1000);
            w32(&mut t, 0xa0, base + 0x2000);
            w32(&mut t, 0x44, 1);
        }
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), Some(2));
    }

    #[test]
    fn hostile_register_accesses_are_harmless() {
        let (mut t, activated) = transport();
        // Features the device does not offer: FEATURES_OK is refused.
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut t, 0x20, 0xffff_ffff);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        // Queue selector out of range, odd sizes, unknown registers.
        w32(&mut t, 0x30, 0xffff_ffff);
        assert_eq!(r32(&mut t, 0x34), 0);
        w32(&mut t, 0x38, 7);
        w32(&mut t, 0x44, 1);
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 99);
        t.write(0x70, &[1, 2]);
        let mut b = [0u8; 8];
        t.read(0x0, &mut b);
        assert_eq!(b, [0; 8]);
        t.read(0xf000_0000, &mut b);
        // DRIVER_OK with no valid queues does not activate.
        w32(&mut t, 0x70, 0xff);
        assert_eq!(*activated.lock().unwrap(), None);
    }
}

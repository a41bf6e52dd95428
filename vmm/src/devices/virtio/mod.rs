//! virtio devices and the MMIO transport they sit behind.
//!
//! A device implements [`VirtioDevice`]: what it is (type, features,
//! config space) and what it does once the driver is ready
//! ([`VirtioDevice::activate`] hands it the queues, the guest memory, the
//! queues' notification eventfds and an [`Interrupt`]). The transport
//! ([`mmio::MmioTransport`]) owns the register file and knows nothing about
//! any particular device. Devices do their I/O on their own threads, woken
//! by the queue eventfds (KVM ioeventfds), never on vCPU threads.

pub mod balloon;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Device IDs (virtio 1.2, section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Feature bits common to all devices.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Bits of the InterruptStatus register.
pub const INTERRUPT_USED_RING: u32 = 1 << 0;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{device}: expected {expected} queues, got {got}")]
    QueueCount {
        device: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{device}: {detail}")]
    Failed {
        device: &'static str,
        detail: String,
    },
}

/// One queue as handed to a device at activation: the queue state the driver
/// configured, and the eventfd that fires when the driver notifies it.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// Everything a device needs to run once the driver set DRIVER_OK.
pub struct ActivateContext {
    pub memory: GuestMemoryMmap,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The features the driver accepted (a subset of the device's).
    pub acked_features: u64,
}

/// A device's interrupt line: the InterruptStatus register shared with the
/// transport, and the KVM irqfd that raises the guest IRQ.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// Set for devices whose backend raises the irqfd directly (vhost-user).
    used_ring_always: AtomicBool,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            used_ring_always: AtomicBool::new(false),
        }
    }

    /// From now on InterruptStatus always shows the used-ring bit: for a
    /// device whose out-of-process backend writes the irqfd itself and so
    /// cannot set the bit, while the guest driver ignores interrupts
    /// without it.
    pub fn report_used_ring_always(&self) {
        self.used_ring_always.store(true, Ordering::SeqCst);
    }

    /// The eventfd registered as the device's irqfd (vhost-user backends can
    /// be given a duplicate of it as their call fd).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("raising a virtio interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        let sticky = if self.used_ring_always.load(Ordering::SeqCst) {
            INTERRUPT_USED_RING
        } else {
            0
        };
        self.status.load(Ordering::SeqCst) | sticky
    }

    /// The driver's write to InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// A short name for logs.
    fn name(&self) -> &'static str;
    /// The virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits offered (VIRTIO_F_VERSION_1 must be among them: the
    /// MMIO transport is version 2, "modern" only).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Out-of-range bytes
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space; read-only devices ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set FEATURES_OK with `acked` (a subset of
    /// [`features`](Self::features)): the last chance to configure the
    /// backend for them. An error keeps FEATURES_OK clear, so the driver
    /// gives up on the device.
    fn negotiate(&mut self, _acked: u64) -> Result<(), String> {
        Ok(())
    }
    /// The driver is ready: start serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver reset the device after activation. Returns false where the
    /// device cannot go back to its initial state (it then stays as it is).
    fn reset(&mut self) -> bool {
        false
    }
}

/// Copies `config` bytes at `offset` into `data`, zero-filling anything
/// beyond the end: config reads take guest-chosen offsets and sizes.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Takes the next chain the driver made available, or None when there is
/// none. Unlike `QueueT::pop_descriptor_chain`, which logs an error and
/// returns None every time, a ring the driver broke is an `Err`: its avail
/// idx more than a ring ahead of what was taken
/// (`InvalidAvailRingIndex`), or the queue not ready. Such a ring stays
/// broken until the driver rewrites the index, so callers must not wait in
/// a loop for it to yield something.
pub fn pop_chain<M>(
    queue: &mut Queue,
    mem: M,
) -> Result<Option<DescriptorChain<M>>, virtio_queue::Error>
where
    M: Clone + std::ops::Deref,
    M::Target: GuestMemory,
{
    Ok(queue.iter(mem)?.next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [0xaa; 4];
        read_config_bytes(&cfg, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(INTERRUPT_USED_RING);
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
        irq.report_used_ring_always();
        irq.ack(u32::MAX);
        assert_eq!(
            irq.status(),
            INTERRUPT_USED_RING,
            "vhost-user devices keep the used-ring bit"
        );
    }
}

//! virtio-mmio: guest register reads and writes of any size at any offset
//! through the MMIO bus (`devices::MmioBus`) into the transport
//! (`devices::virtio::mmio::MmioTransport`): feature negotiation, queue
//! setup, status changes, activation and reset, and the config space of
//! the real balloon, net and vsock devices. The devices run no threads
//! here: activation hands them the queues and they drop them.

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podbox_fuzz::{decode, eventfd, guest_memory, QUEUE_STRIDE};
use podbox_vmm::arch::x86_64::layout::VIRTIO_MMIO_START;
use podbox_vmm::devices::virtio::balloon::Balloon;
use podbox_vmm::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE};
use podbox_vmm::devices::virtio::net::{Backend, Net};
use podbox_vmm::devices::virtio::vsock::{Muxer, Vsock};
use podbox_vmm::devices::virtio::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
use podbox_vmm::devices::MmioBus;
use podbox_vmm_config::MacAddr;
use vmm_sys_util::eventfd::EventFd;

/// A real device whose activation starts nothing (its thread would
/// outlive the run); everything else is the device's own.
struct NoThread<D> {
    inner: D,
    activate_ok: bool,
    reset_ok: bool,
}

impl<D: VirtioDevice> VirtioDevice for NoThread<D> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.inner.queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data)
    }
    fn negotiate(&mut self, acked: u64) -> Result<(), String> {
        self.inner.negotiate(acked)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        assert_eq!(ctx.queues.len(), self.inner.queue_max_sizes().len());
        if self.activate_ok {
            Ok(())
        } else {
            Err(ActivateError::Failed {
                device: self.inner.name(),
                detail: "fuzz".into(),
            })
        }
    }
    fn reset(&mut self) -> bool {
        self.reset_ok
    }
}

struct NullTap(EventFd);

impl AsRawFd for NullTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for NullTap {
    fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn set_offloads(&mut self, _flags: libc::c_uint) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Read {
        window: u8,
        offset: u16,
        len: u8,
    },
    Write32 {
        window: u8,
        offset: u16,
        value: u32,
    },
    Write {
        window: u8,
        offset: u16,
        bytes: Vec<u8>,
    },
    /// A driver's usual bring-up of `window`, with the fuzzer's features
    /// and queue sizes (the fuzzer can reach it alone, this is faster).
    Bringup {
        window: u8,
        features: u64,
        size: u16,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    cid: u64,
    mac: [u8; 6],
    guest_offloads: u64,
    activate_ok: bool,
    reset_ok: bool,
    ops: Vec<Op>,
}

const WINDOWS: u64 = 3;

fn addr(window: u8, offset: u16) -> u64 {
    // Window 3 is past the devices: nobody claims it.
    VIRTIO_MMIO_START + u64::from(window) % (WINDOWS + 1) * MMIO_WINDOW_SIZE + u64::from(offset)
}

fn w32(bus: &MmioBus, base: u64, offset: u64, v: u32) {
    bus.write(base + offset, &v.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = decode::<Input>(data) else {
        return;
    };
    let mem = guest_memory();
    let dir = std::env::temp_dir().join(format!("podbox-fuzz-mmio-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let muxer = Muxer::new(input.cid, &dir.join("v.sock")).expect("muxer");
    let devices: Vec<Box<dyn VirtioDevice>> = vec![
        Box::new(NoThread {
            inner: Balloon,
            activate_ok: input.activate_ok,
            reset_ok: input.reset_ok,
        }),
        Box::new(NoThread {
            inner: Net::new(
                "virtio-net(fuzz)".into(),
                NullTap(eventfd()),
                MacAddr(input.mac),
                input.guest_offloads,
            ),
            activate_ok: input.activate_ok,
            reset_ok: input.reset_ok,
        }),
        Box::new(NoThread {
            inner: Vsock::new(input.cid, muxer),
            activate_ok: input.activate_ok,
            reset_ok: input.reset_ok,
        }),
    ];
    let mut bus = MmioBus::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let irq = Arc::new(Interrupt::new(eventfd()));
        let t = MmioTransport::new(dev, mem.clone(), irq).expect("transport");
        let base = VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW_SIZE;
        bus.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(t)));
    }
    let mut scratch = VecDeque::new();
    for op in input.ops.iter().take(256) {
        match op {
            Op::Read {
                window,
                offset,
                len,
            } => {
                let mut buf = vec![0u8; usize::from(*len % 9)];
                bus.read(addr(*window, *offset), &mut buf);
                scratch.push_back(buf);
            }
            Op::Write32 {
                window,
                offset,
                value,
            } => w32(&bus, addr(*window, *offset), 0, *value),
            Op::Write {
                window,
                offset,
                bytes,
            } => bus.write(addr(*window, *offset), bytes),
            Op::Bringup {
                window,
                features,
                size,
            } => {
                let base = addr(*window, 0);
                w32(&bus, base, 0x70, 1);
                w32(&bus, base, 0x70, 3);
                w32(&bus, base, 0x24, 0);
                w32(&bus, base, 0x20, *features as u32);
                w32(&bus, base, 0x24, 1);
                w32(&bus, base, 0x20, (*features >> 32) as u32);
                w32(&bus, base, 0x70, 11);
                for q in 0..3u32 {
                    let rings = u64::from(q) * QUEUE_STRIDE;
                    w32(&bus, base, 0x30, q);
                    w32(&bus, base, 0x38, u32::from(*size));
                    w32(&bus, base, 0x80, rings as u32);
                    w32(&bus, base, 0x90, (rings + 0x1000) as u32);
                    w32(&bus, base, 0xa0, (rings + 0x2000) as u32);
                    w32(&bus, base, 0x44, 1);
                }
                w32(&bus, base, 0x70, 15);
            }
        }
        if scratch.len() > 8 {
            scratch.pop_front();
        }
    }
});

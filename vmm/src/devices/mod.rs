//! Emulated devices, the port-I/O bus and the MMIO bus that route vCPU
//! exits to them.

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use virtio::mmio::MmioTransport;

pub use i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
pub use serial::Serial;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
/// CMOS/RTC index and data ports. There is no RTC: reads return 0 so that
/// the kernel's "update in progress" wait ends at once.
const CMOS_PORTS: std::ops::RangeInclusive<u16> = 0x70..=0x71;

/// The legacy port-I/O devices of a podbox VM.
pub struct IoBus {
    serial: Mutex<Serial>,
    i8042: I8042,
}

impl IoBus {
    pub fn new(serial: Serial, i8042: I8042) -> Self {
        Self {
            serial: Mutex::new(serial),
            i8042,
        }
    }

    /// A guest IN: fills `data`. Ports nobody claims read as all ones, like
    /// an empty ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN).contains(&p) => self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read((p - SERIAL_PORT_BASE) as u8),
            I8042_DATA_PORT | I8042_COMMAND_PORT => self.i8042.read(port),
            p if CMOS_PORTS.contains(&p) => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    /// A guest OUT. Writes to unclaimed ports (port 0x80 delays, probes of
    /// absent devices) are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN).contains(&p) => self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write((p - SERIAL_PORT_BASE) as u8, value),
            I8042_DATA_PORT | I8042_COMMAND_PORT => self.i8042.write(port, value),
            _ => {}
        }
    }

    /// Flushes console output (at exit).
    pub fn flush(&self) {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }
}

/// The MMIO devices of a VM: virtio-mmio windows in the 32-bit MMIO gap.
/// vCPU threads only touch registers here; device I/O runs on the devices'
/// own threads.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<(u64, u64, Arc<Mutex<MmioTransport>>)>,
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device window at `base` of `len` bytes (windows never overlap:
    /// the builder hands them out in order).
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<MmioTransport>>) {
        self.devices.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        self.devices
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, dev)| (&**dev, addr - base))
    }

    /// A guest MMIO read; addresses nobody claims read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((dev, offset)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write; writes nobody claims vanish.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, offset)) = self.find(addr) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, data);
        }
    }
}

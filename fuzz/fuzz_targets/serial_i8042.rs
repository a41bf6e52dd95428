//! Port I/O: guest IN and OUT of any size on any port through the I/O bus
//! (`devices::IoBus`): the 16550 UART (vm-superio) behind COM1 with the
//! console's panic-line watch, the i8042 reset port, CMOS, unclaimed ports.

#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podbox_fuzz::{decode, eventfd};
use podbox_vmm::devices::serial::ConsoleOutput;
use podbox_vmm::devices::{IoBus, Serial, I8042};
use podbox_vmm::exit::ExitLatch;

#[derive(Debug, Arbitrary)]
enum Port {
    Serial(u8),
    I8042Data,
    I8042Command,
    Cmos(bool),
    Any(u16),
}

impl Port {
    fn number(&self) -> u16 {
        match self {
            Port::Serial(n) => 0x3f8 + u16::from(*n % 8),
            Port::I8042Data => 0x60,
            Port::I8042Command => 0x64,
            Port::Cmos(data) => 0x70 + u16::from(*data),
            Port::Any(p) => *p,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    In(Port, u8),
    Out(Port, Vec<u8>),
    /// A run of bytes to the UART's data register (console output).
    Print(Vec<u8>),
    Flush,
}

fuzz_target!(|data: &[u8]| {
    let Some(ops) = decode::<Vec<Op>>(data) else {
        return;
    };
    let exit = Arc::new(ExitLatch::new());
    let console = ConsoleOutput::new(Box::new(std::io::sink()), exit.clone());
    let bus = IoBus::new(Serial::new(eventfd(), console), I8042::new(exit));
    for op in ops.iter().take(1024) {
        match op {
            Op::In(port, len) => {
                let mut buf = vec![0u8; usize::from(*len % 5)];
                bus.read(port.number(), &mut buf);
            }
            Op::Out(port, bytes) => bus.write(port.number(), bytes),
            Op::Print(bytes) => {
                for b in bytes {
                    bus.write(0x3f8, &[*b]);
                }
            }
            Op::Flush => bus.flush(),
        }
    }
});

//! The 16550 UART console (vm-superio) on COM1, interrupting on IRQ 4
//! through an irqfd.
//!
//! Console output also passes a panic watch: Linux prints
//! "Kernel panic - not syncing" at emergency level (shown even with
//! `quiet`), and that line is how the VMM tells a panic from an ordinary
//! reset, since both end in the same keyboard-controller reset.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitLatch, VmExit};

const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Longest console line the panic watch keeps; the guest decides line
/// lengths, so the buffer is bounded.
const MAX_LINE: usize = 1024;

/// Raises the UART's interrupt by signalling an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go, watched for a kernel panic line.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    exit: Arc<ExitLatch>,
    write_failed: bool,
}

impl ConsoleOutput {
    pub fn new(out: Box<dyn Write + Send>, exit: Arc<ExitLatch>) -> Self {
        Self {
            out,
            line: Vec::new(),
            exit,
            write_failed: false,
        }
    }

    fn watch(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some(at) = line.find(PANIC_MARKER) {
                    self.exit
                        .trigger(VmExit::GuestPanic(line[at..].trim_end().to_string()));
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch(buf);
        // A full disk or a closed stdout must not stop the guest: report once.
        if let Err(e) = self.out.write_all(buf) {
            if !self.write_failed {
                tracing::warn!("serial console output failed, dropping further output: {e}");
                self.write_failed = true;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// COM1 as the I/O bus sees it.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOutput>,
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::warn!("serial: {e}");
        }
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_bytes_pass_through_and_a_panic_line_is_caught() {
        let latch = Arc::new(ExitLatch::new());
        let sink = Sink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()), latch.clone());
        out.write_all(b"booting\n[    1.0] Kernel panic - not syncing: Attempted to kill ")
            .unwrap();
        assert!(!latch.is_set(), "the line is not complete yet");
        out.write_all(b"init! exitcode=0x00000100\r\n").unwrap();
        assert_eq!(
            latch.wait(),
            VmExit::GuestPanic(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100".into()
            )
        );
        assert!(sink
            .0
            .lock()
            .unwrap()
            .starts_with(b"booting\n[    1.0] Kernel panic"));
    }

    #[test]
    fn endless_lines_stay_bounded() {
        let latch = Arc::new(ExitLatch::new());
        let mut out = ConsoleOutput::new(Box::new(Sink::default()), latch.clone());
        out.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(out.line.len() <= MAX_LINE);
        assert!(!latch.is_set());
    }

    #[test]
    fn endless_guest_output_into_a_file_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let log = crate::logfile::RotatingLog::create(&path, 4096).unwrap();
        let latch = Arc::new(ExitLatch::new());
        let mut serial = Serial::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::new(Box::new(log), latch),
        );
        for i in 0..64 * 1024u32 {
            serial.write(
                0,
                if i % 80 == 79 {
                    b'\n'
                } else {
                    b'a' + (i % 26) as u8
                },
            );
        }
        serial.write(0, b'!');
        let rotated = crate::logfile::rotated_path(&path);
        let sizes = [&path, &rotated].map(|p| std::fs::metadata(p).unwrap().len());
        assert!(sizes.iter().all(|&s| s <= 4096), "{sizes:?}");
        assert!(
            std::fs::read(&path).unwrap().ends_with(b"!"),
            "newest byte is in PATH"
        );
    }

    #[test]
    fn uart_transmits_written_bytes() {
        let latch = Arc::new(ExitLatch::new());
        let sink = Sink::default();
        let mut serial = Serial::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOutput::new(Box::new(sink.clone()), latch),
        );
        for b in b"hi\n" {
            serial.write(0, *b); // THR
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_ne!(
            serial.read(5) & 0x20,
            0,
            "LSR: transmitter holding register empty"
        );
    }
}

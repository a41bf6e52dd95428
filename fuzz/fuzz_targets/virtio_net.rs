//! virtio-net: guest TX chains (virtio-net header + Ethernet frame) and RX
//! buffers through the device worker (`devices::virtio::net::device::Worker`):
//! chain checks, the TX header rules for the negotiated features, frames
//! copied to and from a fake tap, mergeable RX buffers, budgets.

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podbox_fuzz::{decode, eventfd, guest_memory, Blob, QueueSpec};
use podbox_vmm::devices::virtio::net::device::Worker;
use podbox_vmm::devices::virtio::net::header::{
    BASE_FEATURES, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6,
};
use podbox_vmm::devices::virtio::net::{Backend, NetCounters};
use podbox_vmm::devices::virtio::Interrupt;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_MAX: u16 = 256;

/// A tap whose frames come from the fuzzer (the pod network is not
/// trusted either). Its fd only exists because the trait asks for one.
struct FakeTap {
    to_guest: VecDeque<Vec<u8>>,
    full: bool,
    fd: EventFd,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Backend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.to_guest.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.full {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(buf.len())
    }

    fn set_offloads(&mut self, _flags: libc::c_uint) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// One round of the worker (TX, RX, interrupt).
    Process,
    /// The guest notifies the RX queue (new buffers).
    RxKick,
    Guest(Blob),
    /// A frame (with its vnet header) arrives on the tap.
    TapFrame(Vec<u8>),
    TapFull(bool),
}

#[derive(Debug, Arbitrary)]
struct Input {
    acked: u64,
    rx: QueueSpec,
    tx: QueueSpec,
    blobs: Vec<Blob>,
    steps: Vec<Step>,
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = decode::<Input>(data) else {
        return;
    };
    let mem = guest_memory();
    let (Some(rx), Some(tx)) = (
        input.rx.build(&mem, 0, QUEUE_MAX),
        input.tx.build(&mem, 1, QUEUE_MAX),
    ) else {
        return;
    };
    for b in &input.blobs {
        b.write(&mem);
    }
    // What the transport lets a driver ack: a subset of the offered bits.
    let offered = BASE_FEATURES | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6;
    let acked = input.acked & offered;
    let tap = FakeTap {
        to_guest: VecDeque::new(),
        full: false,
        fd: eventfd(),
    };
    let mut worker = Worker::new(
        "virtio-net(fuzz)".into(),
        Arc::new(mem.clone()),
        [(rx, eventfd()), (tx, eventfd())],
        tap,
        acked,
        Arc::new(Interrupt::new(eventfd())),
        Arc::new(NetCounters::default()),
    );
    for step in input.steps.iter().take(64) {
        match step {
            Step::Process => worker.process(),
            Step::RxKick => worker.rx.blocked = false,
            Step::Guest(b) => b.write(&mem),
            Step::TapFrame(f) => {
                if worker.backend.to_guest.len() < 16 {
                    worker.backend.to_guest.push_back(f.clone());
                }
            }
            Step::TapFull(full) => worker.backend.full = *full,
        }
    }
    worker.process();
});

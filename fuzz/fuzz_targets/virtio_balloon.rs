//! virtio-balloon: inflate, deflate and free-page-reporting chains through
//! the device worker (`devices::virtio::balloon::Worker`); reported ranges
//! are dropped from the (fuzz) guest memory with madvise.

#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podbox_fuzz::{decode, eventfd, guest_memory, Blob, QueueSpec};
use podbox_vmm::devices::virtio::balloon::Worker;
use podbox_vmm::devices::virtio::{ActiveQueue, Interrupt};

/// The device's queue sizes: inflate, deflate, reporting.
const QUEUE_MAX: [u16; 3] = [64, 64, 32];

#[derive(Debug, Arbitrary)]
enum Step {
    /// The guest kicks queue `n % 3`.
    Kick(u8),
    Guest(Blob),
}

#[derive(Debug, Arbitrary)]
struct Input {
    queues: [QueueSpec; 3],
    blobs: Vec<Blob>,
    steps: Vec<Step>,
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = decode::<Input>(data) else {
        return;
    };
    let mem = guest_memory();
    let mut queues = Vec::new();
    for (i, spec) in input.queues.iter().enumerate() {
        let Some(queue) = spec.build(&mem, i as u64, QUEUE_MAX[i]) else {
            return;
        };
        queues.push(ActiveQueue {
            queue,
            notify: eventfd(),
        });
    }
    for b in &input.blobs {
        b.write(&mem);
    }
    let mut worker = Worker::new(mem.clone(), queues, Arc::new(Interrupt::new(eventfd())));
    for step in input.steps.iter().take(64) {
        match step {
            Step::Kick(n) => {
                worker.process(usize::from(*n) % 3);
            }
            Step::Guest(b) => b.write(&mem),
        }
    }
    for i in 0..3 {
        worker.process(i);
    }
});

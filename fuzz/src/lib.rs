//! Shared pieces of podbox's fuzz targets: a small guest memory, split
//! virtqueues laid out in it from fuzzer input, and guest writes into it.
//!
//! A target's input is decoded with `arbitrary`: the queues' sizes,
//! descriptors and avail rings, then memory blobs (packet headers, frame
//! bytes, or new ring contents between device rounds). The rings sit at
//! fixed places, as a driver would have set them up through virtio-mmio
//! before DRIVER_OK (the transport only activates a device whose queues
//! are valid); everything in them is the fuzzer's.

use arbitrary::{Arbitrary, Unstructured};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of every device target: small, so that descriptor addresses
/// the fuzzer picks often land in it.
pub const MEM_SIZE: u64 = 0x4_0000;
/// Each queue's rings: descriptor table, avail ring and used ring one page
/// apart (room for 256 entries each), queue `i` at `i * QUEUE_STRIDE`.
pub const QUEUE_STRIDE: u64 = 0x3000;
/// Where buffers usually go: past the rings of up to four queues.
pub const DATA_START: u64 = 0x1_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A guest memory for one run.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("mapping fuzz guest memory")
}

/// A descriptor as the guest writes it. Addresses and lengths are folded
/// into guest memory unless `raw` asks for the fuzzer's value as it is.
#[derive(Debug, Clone, Arbitrary)]
pub struct Desc {
    pub raw: bool,
    pub addr: u64,
    pub len: u32,
    pub flags: u8,
    pub next: u8,
}

impl Desc {
    pub fn addr(&self) -> u64 {
        if self.raw {
            self.addr
        } else {
            DATA_START + self.addr % (MEM_SIZE - DATA_START)
        }
    }

    pub fn length(&self) -> u32 {
        if self.raw {
            self.len
        } else {
            self.len % 0x1_2000
        }
    }

    /// The 16-byte split descriptor.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr().to_le_bytes());
        b[8..12].copy_from_slice(&self.length().to_le_bytes());
        b[12..14].copy_from_slice(&u16::from(self.flags).to_le_bytes());
        b[14..16].copy_from_slice(&u16::from(self.next).to_le_bytes());
        b
    }
}

/// One split queue as the driver set it up and filled it.
#[derive(Debug, Clone, Arbitrary)]
pub struct QueueSpec {
    /// log2 of the queue size (capped at the device's maximum).
    pub size_log2: u8,
    pub descs: Vec<Desc>,
    pub avail: Vec<u8>,
    /// The avail index; None: as many entries as `avail` holds.
    pub avail_idx: Option<u16>,
    pub avail_flags: u16,
}

impl QueueSpec {
    /// Writes the rings of queue `index` into `mem` and returns the queue
    /// the transport would hand the device, or None where the transport
    /// would not have activated it.
    pub fn build(&self, mem: &GuestMemoryMmap, index: u64, max_size: u16) -> Option<Queue> {
        let base = index * QUEUE_STRIDE;
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        let size = (1u16 << (self.size_log2 % 9)).min(max_size);
        for (i, d) in self.descs.iter().take(usize::from(size)).enumerate() {
            mem.write_slice(&d.bytes(), GuestAddress(desc + 16 * i as u64))
                .ok()?;
        }
        mem.write_obj(self.avail_flags, GuestAddress(avail)).ok()?;
        let entries = self.avail.iter().take(usize::from(size));
        for (i, &head) in entries.enumerate() {
            mem.write_obj(u16::from(head), GuestAddress(avail + 4 + 2 * i as u64))
                .ok()?;
        }
        let idx = self
            .avail_idx
            .unwrap_or(self.avail.len().min(usize::from(size)) as u16);
        mem.write_obj(idx, GuestAddress(avail + 2)).ok()?;
        let mut q = Queue::new(max_size).ok()?;
        q.set_size(size);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

/// Bytes the guest writes anywhere in its memory (payloads, or new ring
/// contents between two rounds of the device).
#[derive(Debug, Clone, Arbitrary)]
pub struct Blob {
    pub offset: u32,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn write(&self, mem: &GuestMemoryMmap) {
        let at = u64::from(self.offset) % MEM_SIZE;
        let n = self.bytes.len().min((MEM_SIZE - at) as usize);
        let _ = mem.write_slice(&self.bytes[..n], GuestAddress(at));
    }
}

/// Decodes `T` from `data`, None when it runs short.
pub fn decode<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(data)).ok()
}

/// A non-blocking eventfd (queue kicks, the device interrupt).
pub fn eventfd() -> vmm_sys_util::eventfd::EventFd {
    vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
}

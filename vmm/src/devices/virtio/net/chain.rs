//! Checking one guest descriptor chain before the device touches it.
//!
//! virtio-queue's chain iterator follows `next` and indirect tables, but it
//! ends a chain quietly where a descriptor cannot be read, an indirect
//! table is bad or its time-to-live runs out (a loop). The last descriptor
//! it yields still has NEXT set in those cases, which is how a cut-off
//! chain is told from a complete one here.

use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest memory as the device thread holds it: chains popped from a queue
/// keep their own reference, so the worker stays free to use.
pub type Mem = Arc<GuestMemoryMmap>;

/// Most descriptors one chain may have. Linux uses at most
/// MAX_SKB_FRAGS + 2 for a TX frame and one per page of a "big packets" RX
/// buffer; this bounds what an indirect table (up to 65535 entries) can
/// make us walk and keep.
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;

/// One guest buffer of a chain, its range checked against guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("chain has no descriptors (bad head index or indirect table)")]
    Empty,
    #[error("chain cut off after {0} descriptors (a loop, a bad next index or an unreadable descriptor)")]
    Truncated(usize),
    #[error("more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("descriptor {index} is {found} where {wanted} is needed")]
    Direction {
        index: usize,
        found: &'static str,
        wanted: &'static str,
    },
    #[error("descriptor {index}: {len} bytes at {addr:#x} are not guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("chain holds more than {max} bytes")]
    TooLong { max: usize },
}

fn direction(write_only: bool) -> &'static str {
    if write_only {
        "device-writable"
    } else {
        "device-readable"
    }
}

/// Collects the chain's buffers into `out` (cleared first) if every
/// descriptor is `writable` as asked, lies in guest memory, and they add up
/// to at most `max_bytes`. Returns the total length. Zero-length
/// descriptors are kept out of `out`: they carry nothing.
pub fn collect(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<Mem>,
    writable: bool,
    max_bytes: usize,
    out: &mut Vec<Segment>,
) -> Result<usize, ChainError> {
    out.clear();
    let mut total = 0usize;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        if count == MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let index = count;
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(ChainError::Direction {
                index,
                found: direction(desc.is_write_only()),
                wanted: direction(writable),
            });
        }
        let len = desc.len();
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len,
            });
        }
        total = total
            .checked_add(len as usize)
            .filter(|&t| t <= max_bytes)
            .ok_or(ChainError::TooLong { max: max_bytes })?;
        out.push(Segment {
            addr: desc.addr(),
            len,
        });
    }
    match count {
        0 => Err(ChainError::Empty),
        n if last_has_next => Err(ChainError::Truncated(n)),
        _ => Ok(total),
    }
}

/// Copies `data` into the segments starting `offset` bytes into them.
/// The segments were range-checked; a failure here means guest memory
/// changed under us, and is reported, not trusted.
pub fn write_at(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    mut offset: usize,
    mut data: &[u8],
) -> Result<(), String> {
    for seg in segments {
        if data.is_empty() {
            break;
        }
        let len = seg.len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(data.len());
        mem.write_slice(&data[..n], seg.addr.unchecked_add(offset as u64))
            .map_err(|e| format!("writing {n} bytes at {:#x}: {e}", seg.addr.0))?;
        data = &data[n..];
        offset = 0;
    }
    match data.len() {
        0 => Ok(()),
        n => Err(format!("{n} bytes did not fit the buffers")),
    }
}

/// Copies the segments' contents into the front of `buf` and returns how
/// many bytes that was.
pub fn read_all(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<usize, String> {
    let mut at = 0;
    for seg in segments {
        let len = seg.len as usize;
        let size = buf.len();
        let dst = buf
            .get_mut(at..at + len)
            .ok_or_else(|| format!("{} bytes exceed the {size}-byte buffer", at + len))?;
        mem.read_slice(dst, seg.addr)
            .map_err(|e| format!("reading {len} bytes at {:#x}: {e}", seg.addr.0))?;
        at += len;
    }
    Ok(at)
}

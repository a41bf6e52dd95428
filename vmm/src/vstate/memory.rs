//! Guest RAM: private anonymous memory, or one memfd mapped MAP_SHARED when
//! an out-of-process backend (virtiofsd through vhost-user) has to map the
//! same pages.
//!
//! Shared memory is used only when such a device is configured: anonymous
//! private memory can use transparent huge pages (shmem usually cannot, its
//! THP knob defaults to "never"), and VMs without a vhost-user device stay
//! exactly as they were measured.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the guest memory memfd to {bytes} bytes: {source}")]
    Size { bytes: u64, source: std::io::Error },
    #[error("mapping guest memory: {0}")]
    Map(String),
}

/// Maps `ranges` (guest address, length) as guest RAM; with `shared`, all
/// of them come from one memfd, back to back, so each region has a file
/// descriptor and offset to hand to a vhost-user backend.
pub fn guest_memory(
    ranges: &[(GuestAddress, usize)],
    shared: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    if !shared {
        return GuestMemoryMmap::<()>::from_ranges(ranges)
            .map_err(|e| MemoryError::Map(e.to_string()));
    }
    let total: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
    // SAFETY: memfd_create with a static NUL-terminated name; the returned
    // descriptor is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"podbox-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total).map_err(|source| MemoryError::Size {
        bytes: total,
        source,
    })?;
    let mut offset = 0u64;
    let mut with_files = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let f = file.try_clone().map_err(MemoryError::Memfd)?;
        with_files.push((addr, len, Some(FileOffset::new(f, offset))));
        offset += len as u64;
    }
    GuestMemoryMmap::<()>::from_ranges_with_files(&with_files)
        .map_err(|e| MemoryError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn shared_memory_regions_are_one_memfd_back_to_back() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 2 << 20)];
        let mem = guest_memory(&ranges, true).unwrap();
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, [0, 1 << 20]);
        mem.write_obj(0xdead_beefu32, GuestAddress((1 << 32) + 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((1 << 32) + 8)).unwrap(),
            0xdead_beef
        );
        let private = guest_memory(&ranges[..1], false).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));
    }
}

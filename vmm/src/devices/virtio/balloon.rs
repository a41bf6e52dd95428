//! virtio-balloon with free page reporting only (virtio 1.2, 5.5): the
//! guest kernel reports blocks of memory it has freed (2 MiB and up, each
//! a device-writable descriptor on the reporting queue), and the device
//! gives their host pages back, so an idle pod's host memory shrinks after
//! its containers free memory. The device never asks the guest to inflate
//! (`num_pages` stays 0); inflate and deflate buffers are handed back
//! untouched.
//!
//! Every reported range is the guest's word: it is used only where it lies
//! page-aligned inside one guest RAM region, and all that is done to it is
//! drop the host pages behind it (`MADV_DONTNEED` for private memory,
//! `MADV_REMOVE` for the memfd shared with virtiofsd). The guest reads
//! zeros there afterwards, which is what a freed page may hold: a guest
//! that reports pages it still uses only loses its own data.

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{
    pop_chain, ActivateContext, ActivateError, ActiveQueue, VirtioDevice, TYPE_BALLOON,
    VIRTIO_F_VERSION_1,
};

/// VIRTIO_BALLOON_F_REPORTING.
const F_REPORTING: u64 = 1 << 5;
/// Queues in the order the Linux driver sets them up with only REPORTING
/// negotiated: inflate, deflate, reporting.
const QUEUE_SIZES: [u16; 3] = [64, 64, 32];
const REPORTING: usize = 2;
/// struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id,
/// poison_val (all zero: no inflation asked, nothing else offered).
const CONFIG: [u8; 16] = [0; 16];
const PAGE_SIZE: u64 = 4096;

pub struct Balloon;

impl VirtioDevice for Balloon {
    fn name(&self) -> &'static str {
        "virtio-balloon"
    }

    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&CONFIG, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                device: "virtio-balloon",
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        let mut worker = Worker {
            memory: ctx.memory,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
        };
        std::thread::Builder::new()
            .name("virtio-balloon".into())
            .spawn(move || worker.run())
            .map_err(|e| ActivateError::Failed {
                device: "virtio-balloon",
                detail: format!("starting its thread: {e}"),
            })?;
        Ok(())
    }
}

/// The device's thread state. Public (with [`Worker::new`] and
/// [`Worker::process`]) for the fuzz targets (`fuzz/`).
pub struct Worker {
    memory: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: std::sync::Arc<super::Interrupt>,
}

impl Worker {
    /// A worker over `queues` (inflate, deflate, reporting) in `memory`, as
    /// activation makes one, without its thread.
    pub fn new(
        memory: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: std::sync::Arc<super::Interrupt>,
    ) -> Self {
        Worker {
            memory,
            queues,
            interrupt,
        }
    }

    fn run(&mut self) {
        let fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|q| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&q.notify),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            let mut ready = fds.clone();
            // SAFETY: poll on an array of pollfds this function owns.
            let n = unsafe { libc::poll(ready.as_mut_ptr(), ready.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("virtio-balloon: poll: {e}; device stops");
                return;
            }
            let mut used = false;
            for (i, p) in ready.iter().enumerate() {
                if p.revents & libc::POLLIN != 0 {
                    let _ = self.queues[i].notify.read();
                    used |= self.process(i);
                }
            }
            if used {
                self.interrupt.signal_used_queue();
            }
        }
    }

    /// Serves queue `index`; returns whether any buffer was used. At most
    /// one ring's worth per call: a guest cannot keep the thread here.
    pub fn process(&mut self, index: usize) -> bool {
        let mem = &self.memory;
        let queue = &mut self.queues[index].queue;
        let mut used = false;
        for _ in 0..QUEUE_SIZES[index] {
            let chain = match pop_chain(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("virtio-balloon: queue {index} unusable: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            if index == REPORTING {
                for desc in chain.filter(|d| d.is_write_only()) {
                    discard(mem, desc.addr(), u64::from(desc.len()));
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::debug!("virtio-balloon: add_used: {e}");
            }
            used = true;
        }
        used
    }
}

/// Drops the host pages behind the guest range `addr`..`addr + len` when
/// it is page-aligned and inside one RAM region; returns the bytes dropped.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> u64 {
    if len == 0 || !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return 0;
    }
    let Some(region) = mem.find_region(addr) else {
        return 0;
    };
    let offset = addr.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return 0;
    }
    let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(offset)) else {
        return 0;
    };
    // Shared (memfd) memory keeps its pages in the file: only MADV_REMOVE
    // frees them; private anonymous memory drops them with MADV_DONTNEED.
    let advice = if region.file_offset().is_some() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: the range lies inside this region's mapping (checked above),
    // which stays mapped for the VM's life; dropping its pages only makes
    // the guest read zeros there.
    if unsafe { libc::madvise(host.cast(), len as usize, advice) } != 0 {
        tracing::debug!(
            "virtio-balloon: madvise {:#x}+{len:#x}: {}",
            addr.0,
            std::io::Error::last_os_error()
        );
        return 0;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn reported_pages_read_as_zero_afterwards_and_bad_ranges_are_ignored() {
        for shared in [false, true] {
            let mem = guest_memory(&[(GuestAddress(0), 4 << 20)], shared).unwrap();
            mem.write_slice(&[0xab; 8192], GuestAddress(1 << 20))
                .unwrap();
            mem.write_slice(&[0xcd; 4096], GuestAddress(3 << 20))
                .unwrap();
            assert_eq!(discard(&mem, GuestAddress(1 << 20), 8192), 8192);
            let mut back = [0xffu8; 8192];
            mem.read_slice(&mut back, GuestAddress(1 << 20)).unwrap();
            assert!(back.iter().all(|b| *b == 0), "shared={shared}");
            // Unaligned, out of RAM, crossing the end, empty: nothing dropped.
            for (addr, len) in [
                (3u64 << 20, 100u64),
                ((3 << 20) + 1, 4096),
                (64 << 20, 4096),
                ((4 << 20) - 4096, 8192),
                (u64::MAX - 4095, 4096),
                (3 << 20, 0),
            ] {
                assert_eq!(
                    discard(&mem, GuestAddress(addr), len),
                    0,
                    "{addr:#x}+{len:#x}"
                );
            }
            let mut kept = [0u8; 4096];
            mem.read_slice(&mut kept, GuestAddress(3 << 20)).unwrap();
            assert!(kept.iter().all(|b| *b == 0xcd), "shared={shared}");
        }
    }
}

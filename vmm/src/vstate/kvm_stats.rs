//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+) for the VM and
//! each vCPU: exits by kind, emulated instructions, halt polling, ...
//!
//! The file starts with a `kvm_stats_header`; it points at the id string,
//! the descriptors (a `kvm_stats_desc` then the name, `name_size` bytes
//! each) and the data block, where each statistic is `size` u64s at its
//! descriptor's `offset`. Descriptors are read once, data on each read.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_stats_desc, kvm_stats_header, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT,
    KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK,
};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// Bounds on what the kernel reports, so a surprising header cannot make
/// the VMM allocate without limit.
const MAX_NAME_SIZE: usize = 256;
const MAX_DESCRIPTORS: usize = 1024;
const HEADER_SIZE: usize = std::mem::size_of::<kvm_stats_header>();
const DESC_SIZE: usize = std::mem::size_of::<kvm_stats_desc>();

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("KVM_GET_STATS_FD: {0} (a host kernel before 5.14?)")]
    Open(#[source] std::io::Error),
    #[error("reading KVM statistics: {0}")]
    Read(#[source] std::io::Error),
    #[error("KVM statistics: {0}")]
    Format(String),
}

/// One scalar statistic: a counter, a current value or a peak.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Descriptor {
    name: String,
    /// Byte offset in the data block.
    offset: u64,
}

/// An open statistics file of a VM or a vCPU.
pub struct KvmStats {
    file: File,
    data_offset: u64,
    descriptors: Vec<Descriptor>,
}

impl KvmStats {
    /// Opens the statistics of `fd` (a VmFd or a VcpuFd).
    pub fn open(fd: &impl AsRawFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(StatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let layout = Layout::parse(&header)?;
        let mut block = vec![0u8; layout.descriptor_block_len()];
        file.read_exact_at(&mut block, layout.desc_offset)
            .map_err(StatsError::Read)?;
        let descriptors = layout.descriptors(&block)?;
        Ok(Self {
            file,
            data_offset: layout.data_offset,
            descriptors,
        })
    }

    /// Every scalar statistic, by name, in the kernel's order.
    pub fn read(&self) -> Result<Vec<(String, u64)>, StatsError> {
        let mut out = Vec::with_capacity(self.descriptors.len());
        for d in &self.descriptors {
            let mut value = [0u8; 8];
            self.file
                .read_exact_at(&mut value, self.data_offset + d.offset)
                .map_err(StatsError::Read)?;
            out.push((d.name.clone(), u64::from_ne_bytes(value)));
        }
        Ok(out)
    }
}

/// The header's fields the reader needs.
#[derive(Debug, Clone, Copy)]
struct Layout {
    name_size: usize,
    num_desc: usize,
    desc_offset: u64,
    data_offset: u64,
}

fn field(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

impl Layout {
    fn parse(header: &[u8; HEADER_SIZE]) -> Result<Self, StatsError> {
        // kvm_stats_header: flags, name_size, num_desc, id_offset,
        // desc_offset, data_offset (u32 each).
        let layout = Layout {
            name_size: field(header, 4) as usize,
            num_desc: field(header, 8) as usize,
            desc_offset: u64::from(field(header, 16)),
            data_offset: u64::from(field(header, 20)),
        };
        if layout.name_size > MAX_NAME_SIZE || layout.num_desc > MAX_DESCRIPTORS {
            return Err(StatsError::Format(format!(
                "{} descriptors with {}-byte names is more than expected",
                layout.num_desc, layout.name_size
            )));
        }
        Ok(layout)
    }

    fn descriptor_len(&self) -> usize {
        DESC_SIZE + self.name_size
    }

    fn descriptor_block_len(&self) -> usize {
        self.num_desc * self.descriptor_len()
    }

    /// The scalar statistics (size 1, cumulative, instant or peak);
    /// histograms are left out.
    fn descriptors(&self, block: &[u8]) -> Result<Vec<Descriptor>, StatsError> {
        let mut out = Vec::new();
        for raw in block.chunks_exact(self.descriptor_len()) {
            // kvm_stats_desc: flags u32, exponent s16, size u16, offset u32,
            // bucket_size u32, then the name.
            let flags = field(raw, 0);
            let size = u16::from_ne_bytes([raw[6], raw[7]]);
            let offset = u64::from(field(raw, 8));
            let name = &raw[DESC_SIZE..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let name = std::str::from_utf8(&name[..end])
                .map_err(|_| StatsError::Format("a statistic's name is not UTF-8".into()))?;
            let kind = flags & KVM_STATS_TYPE_MASK;
            let scalar = matches!(
                kind,
                KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_TYPE_INSTANT | KVM_STATS_TYPE_PEAK
            );
            if scalar && size == 1 {
                out.push(Descriptor {
                    name: name.to_owned(),
                    offset,
                });
            }
        }
        Ok(out)
    }
}

/// `name=value` for the statistics in `wanted` (in that order) that are
/// present, for a one-line log.
pub fn summary(stats: &[(String, u64)], wanted: &[&str]) -> String {
    wanted
        .iter()
        .filter_map(|w| stats.iter().find(|(n, _)| n == w))
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(flags: u32, size: u16, offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&flags.to_ne_bytes());
        d.extend_from_slice(&0i16.to_ne_bytes());
        d.extend_from_slice(&size.to_ne_bytes());
        d.extend_from_slice(&offset.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend_from_slice(&n);
        d
    }

    fn header(name_size: u32, num_desc: u32) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        for (i, v) in [0, name_size, num_desc, 24, 24, 4096]
            .into_iter()
            .enumerate()
        {
            h[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        h
    }

    #[test]
    fn scalars_are_kept_and_histograms_left_out() {
        let layout = Layout::parse(&header(48, 3)).unwrap();
        let mut block = descriptor(KVM_STATS_TYPE_CUMULATIVE, 1, 0, "exits", 48);
        block.extend(descriptor(
            kvm_bindings::KVM_STATS_TYPE_LOG_HIST,
            32,
            8,
            "halt_hist",
            48,
        ));
        block.extend(descriptor(
            KVM_STATS_TYPE_PEAK,
            1,
            264,
            "max_mmu_page_hash",
            48,
        ));
        assert_eq!(block.len(), layout.descriptor_block_len());
        let d = layout.descriptors(&block).unwrap();
        let names: Vec<_> = d.iter().map(|d| (d.name.as_str(), d.offset)).collect();
        assert_eq!(names, [("exits", 0), ("max_mmu_page_hash", 264)]);
    }

    #[test]
    fn oversized_headers_are_refused() {
        assert!(Layout::parse(&header(4096, 3)).is_err());
        assert!(Layout::parse(&header(48, 100_000)).is_err());
    }

    #[test]
    fn a_summary_names_what_is_present_in_the_asked_order() {
        let stats = vec![("exits".into(), 9), ("io_exits".into(), 4)];
        assert_eq!(
            summary(&stats, &["io_exits", "nope", "exits"]),
            "io_exits=4 exits=9"
        );
    }
}

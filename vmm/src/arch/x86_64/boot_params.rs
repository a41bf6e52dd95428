//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol:
//! setup header fields a boot loader fills in, and the e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};

use super::layout::{CMDLINE_START, EBDA_END, HIGH_MEMORY_START, MPTABLE_START};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS": marks the setup header as valid.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Boot loader id 0xff: "undefined" (no registered id).
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment the header advertises (16 MiB, Linux's default).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    #[error("guest memory map needs {0} e820 entries, the zero page holds {max}", max = E820_MAX)]
    TooManyE820Entries(usize),
    #[error("initramfs at {addr:#x}+{size:#x} does not fit the 32-bit boot header fields")]
    InitrdAbove4G { addr: u64, size: u64 },
    #[error("guest RAM must start at address 0 and cover base memory, got {0:#x?}")]
    NoBaseMemory(Option<(u64, u64)>),
}

const E820_MAX: usize = 128;

/// Where the initramfs was placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: u64,
    pub size: u64,
}

/// The e820 map for the given RAM ranges: base memory up to the MP table,
/// the MP table area reserved, then everything from 1 MiB on.
pub fn e820_map(ram: &[(u64, u64)]) -> Result<Vec<boot_e820_entry>, BootParamsError> {
    let first = ram.first().copied();
    match first {
        Some((0, len)) if len > HIGH_MEMORY_START => {}
        _ => return Err(BootParamsError::NoBaseMemory(first)),
    }
    let entry = |addr, size, kind| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, MPTABLE_START, E820_RAM),
        entry(MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    for &(start, len) in ram {
        let start_hi = start.max(HIGH_MEMORY_START);
        let end = start + len;
        if end > start_hi {
            map.push(entry(start_hi, end - start_hi, E820_RAM));
        }
    }
    if map.len() > E820_MAX {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    Ok(map)
}

/// Builds the zero page for a kernel entered at its 64-bit entry point.
pub fn build(
    ram: &[(u64, u64)],
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(InitrdPlacement { addr, size }) = initrd {
        if addr + size > u64::from(u32::MAX) {
            return Err(BootParamsError::InitrdAbove4G { addr, size });
        }
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(ram)?;
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_entries(map: &[boot_e820_entry]) -> Vec<(u64, u64)> {
        map.iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| (e.addr, e.size))
            .collect()
    }

    #[test]
    fn e820_for_256_mib_reserves_the_mp_table_and_the_legacy_hole() {
        let map = e820_map(&[(0, 256 << 20)]).unwrap();
        assert_eq!(
            ram_entries(&map),
            vec![
                (0, MPTABLE_START),
                (HIGH_MEMORY_START, (256 << 20) - HIGH_MEMORY_START)
            ]
        );
        let reserved: Vec<_> = map
            .iter()
            .filter(|e| e.r#type == E820_RESERVED)
            .map(|e| (e.addr, e.size))
            .collect();
        assert_eq!(reserved, vec![(MPTABLE_START, EBDA_END - MPTABLE_START)]);
        // Nothing claims the 640 KiB..1 MiB hole.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= EBDA_END || e.addr >= HIGH_MEMORY_START));
    }

    #[test]
    fn e820_keeps_ram_above_4g() {
        let ram = super::super::layout::ram_ranges(5 << 30);
        let map = e820_map(&ram).unwrap();
        let total: u64 = ram_entries(&map).iter().map(|r| r.1).sum();
        assert_eq!(total, (5 << 30) - (HIGH_MEMORY_START - MPTABLE_START));
        assert_eq!(ram_entries(&map).last().unwrap().0, 1 << 32);
    }

    #[test]
    fn e820_rejects_memory_without_base_ram() {
        assert!(matches!(
            e820_map(&[]),
            Err(BootParamsError::NoBaseMemory(None))
        ));
        assert!(e820_map(&[(0, 0x8000)]).is_err());
    }

    #[test]
    fn zero_page_carries_header_cmdline_and_initrd() {
        let initrd = InitrdPlacement {
            addr: 0x0f00_0000,
            size: 0x12345,
        };
        let p = build(&[(0, 256 << 20)], 42, Some(initrd)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn initrd_above_4g_is_an_error() {
        let initrd = InitrdPlacement {
            addr: 0xffff_f000,
            size: 0x2000,
        };
        assert!(matches!(
            build(&[(0, 256 << 20)], 1, Some(initrd)),
            Err(BootParamsError::InitrdAbove4G { .. })
        ));
    }
}

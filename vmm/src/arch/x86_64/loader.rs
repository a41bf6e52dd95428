//! Putting the kernel, the initramfs and the command line into guest memory.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot_params::InitrdPlacement;
use super::layout::{CMDLINE_START, HIGH_MEMORY_START};

const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("kernel is not a loadable x86-64 ELF vmlinux (a bzImage needs in-guest decompression, which podbox does not do): {0}")]
    Kernel(#[source] loader::Error),
    #[error("reading the initramfs: {0}")]
    InitrdRead(#[source] std::io::Error),
    #[error("initramfs is empty")]
    InitrdEmpty,
    #[error("initramfs of {size} bytes does not fit in guest RAM above the kernel (kernel ends at {kernel_end:#x}, low RAM ends at {ram_end:#x}); give the VM more memory")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("copying the initramfs into guest memory: {0}")]
    InitrdWrite(#[source] vm_memory::GuestMemoryError),
    #[error("kernel command line: {0}")]
    Cmdline(#[source] loader::Error),
}

/// Where the kernel landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point (`startup_64`).
    pub entry: u64,
    /// First address past the kernel image, BSS included.
    pub end: u64,
}

/// Loads an uncompressed ELF vmlinux at the physical addresses it names.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, LoadError> {
    let result = Elf::load(mem, None, kernel, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(LoadError::Kernel)?;
    Ok(LoadedKernel {
        entry: result.kernel_load.0,
        end: result.kernel_end,
    })
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of low
/// RAM, which keeps it clear of the kernel and of the kernel's early
/// allocations that start right after the image.
pub fn initrd_placement(
    size: u64,
    kernel_end: u64,
    low_ram_end: u64,
) -> Result<InitrdPlacement, LoadError> {
    let too_large = LoadError::InitrdTooLarge {
        size,
        kernel_end,
        ram_end: low_ram_end,
    };
    let addr = low_ram_end.checked_sub(size).ok_or(too_large)? & !(PAGE_SIZE - 1);
    // The kernel file decides `kernel_end` (an ELF segment's p_paddr +
    // p_memsz): rounding it up must not overflow.
    let kernel_pages_end = kernel_end.checked_next_multiple_of(PAGE_SIZE);
    if kernel_pages_end.is_none_or(|end| addr < end) {
        return Err(LoadError::InitrdTooLarge {
            size,
            kernel_end,
            ram_end: low_ram_end,
        });
    }
    Ok(InitrdPlacement { addr, size })
}

/// Copies the initramfs file into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel_end: u64,
    low_ram_end: u64,
) -> Result<InitrdPlacement, LoadError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(LoadError::InitrdRead)?;
    if size == 0 {
        return Err(LoadError::InitrdEmpty);
    }
    initrd.rewind().map_err(LoadError::InitrdRead)?;
    let placement = initrd_placement(size, kernel_end, low_ram_end)?;
    mem.read_exact_volatile_from(GuestAddress(placement.addr), initrd, size as usize)
        .map_err(LoadError::InitrdWrite)?;
    Ok(placement)
}

/// Writes the NUL-terminated command line where the zero page points.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<(), LoadError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(LoadError::Cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let p = initrd_placement(10_000, 0x200_0000, 0x1000_0000).unwrap();
        assert_eq!(p.addr % PAGE_SIZE, 0);
        assert!(p.addr + p.size <= 0x1000_0000);
        assert!(0x1000_0000 - (p.addr + p.size) < PAGE_SIZE);
    }

    #[test]
    fn initrd_overlapping_the_kernel_is_refused() {
        let err = initrd_placement(0x0f00_0000, 0x200_0000, 0x1000_0000).unwrap_err();
        assert!(matches!(err, LoadError::InitrdTooLarge { .. }), "{err}");
        assert!(initrd_placement(u64::MAX, 0, 0x1000).is_err());
    }

    fn write_temp(name: &str, bytes: &[u8]) -> File {
        let path =
            std::env::temp_dir().join(format!("podbox-loader-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    /// A minimal ELF64 image: one PT_LOAD segment of `code` at `paddr`.
    fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 0x78];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = 2; // 64-bit
        img[5] = 1; // little endian
        img[6] = 1; // version
        img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        img[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        img[20..24].copy_from_slice(&1u32.to_le_bytes());
        img[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        img[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        img[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // e_ehsize
        img[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // e_phentsize
        img[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        img[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        img[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        img[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        img[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        img[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        img[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes()); // memsz: BSS
        img.extend_from_slice(code);
        img
    }

    #[test]
    fn loads_an_elf_kernel_at_its_physical_address() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mut f = write_temp("elf", &tiny_elf(0x100_0000, &[0xf4, 0x90, 0xcc]));
        let k = load_kernel(&mem, &mut f).unwrap();
        assert_eq!(k.entry, 0x100_0000);
        assert_eq!(k.end, 0x100_0000 + 3 + 0x1000);
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(got, [0xf4, 0x90, 0xcc]);
    }

    #[test]
    fn rejects_a_non_elf_kernel_with_a_clear_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mut f = write_temp("bz", b"MZ this is a bzImage, not an ELF file at all.........................................");
        let err = load_kernel(&mem, &mut f).unwrap_err();
        assert!(err.to_string().contains("ELF vmlinux"), "{err}");
    }

    /// Found by the `loader` fuzz target: a vmlinux whose PT_LOAD segment
    /// claims a memsz reaching to the top of the address space made
    /// placing the initramfs round `kernel_end` up past u64::MAX (a panic
    /// with overflow checks, an initramfs over the "kernel" without).
    #[test]
    fn initrd_after_a_kernel_ending_near_u64_max_is_refused() {
        assert!(matches!(
            initrd_placement(16, u64::MAX - 10, 0x1000_0000),
            Err(LoadError::InitrdTooLarge { .. })
        ));
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let mut elf = tiny_elf(0x100_0000, &[0xf4, 0x90, 0xcc]);
        // p_memsz of the one program header.
        let memsz = u64::MAX - 0x100_0000 - 10;
        elf[0x40 + 40..0x40 + 48].copy_from_slice(&memsz.to_le_bytes());
        let k = load_kernel(&mem, &mut write_temp("huge-bss", &elf)).unwrap();
        assert_eq!(k.end, u64::MAX - 10);
        let mut initrd = write_temp("initrd-after-huge-bss", b"070701 initramfs");
        assert!(matches!(
            load_initrd(&mem, &mut initrd, k.end, 32 << 20),
            Err(LoadError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn initrd_bytes_land_in_guest_memory() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = write_temp("initrd", &data);
        let p = load_initrd(&mem, &mut f, 0x200_0000 - (16 << 20), 32 << 20).unwrap();
        let mut got = vec![0u8; data.len()];
        mem.read_slice(&mut got, GuestAddress(p.addr)).unwrap();
        assert_eq!(got, data);
        let mut empty = write_temp("empty", b"");
        assert!(matches!(
            load_initrd(&mem, &mut empty, 0, 32 << 20),
            Err(LoadError::InitrdEmpty)
        ));
    }
}

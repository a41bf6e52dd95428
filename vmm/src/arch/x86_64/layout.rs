//! Where things live in guest-physical memory.
//!
//! Low memory (below 1 MiB) holds the boot structures; the kernel is loaded at
//! the physical address its ELF headers ask for (16 MiB for Linux); the
//! initramfs goes at the top of the low RAM region. Between 3 GiB and 4 GiB
//! there is no RAM: that window holds the LAPIC, the IOAPIC and MMIO devices.

/// GDT used while entering the kernel in 64-bit mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables (PML4, PDPT, PD) for the first GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we hand to the kernel (its COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP floating pointer and table live in the last KiB of base memory,
/// where Linux looks for them (the EBDA area).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base memory; 0xa0000..1 MiB is the legacy VGA/BIOS hole.
pub const EBDA_END: u64 = 0xa0000;
/// Start of high memory.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// First address of the 32-bit MMIO gap (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows (4 KiB each, one after another) in the gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC pins for virtio-mmio devices: 5 upwards (0-4 are the legacy PIT,
/// keyboard, cascade and COM ports), up to the IOAPIC's 24 pins.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
pub const VIRTIO_LAST_IRQ: u32 = 23;
/// Local APIC and IOAPIC (standard addresses, emulated by KVM).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// KVM needs three pages for the TSS just below the BIOS area on Intel.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Guest RAM as (start, length) ranges for `memory_bytes` of RAM, skipping
/// the MMIO gap below 4 GiB.
pub fn ram_ranges(memory_bytes: u64) -> Vec<(u64, u64)> {
    if memory_bytes <= MMIO_GAP_START {
        vec![(0, memory_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, memory_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }
}

//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI learns its CPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! The floating pointer and the configuration table sit together in the
//! last KiB of base memory, one of the places Linux scans.

use vm_memory::ByteValued;

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_END, IOAPIC_DEFAULT_PHYS_BASE, MPTABLE_START};

/// The contract's vCPU maximum: the most whose entries fit the 1 KiB the
/// table may occupy (the tests build a table that large).
pub use podbox_vmm_config::MAX_VCPUS;
/// ISA interrupt lines routed 1:1 to IOAPIC pins.
const IRQ_LINES: u8 = 24;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
/// Family 6 CPU signature, FPU + APIC feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const DEST_ALL_LAPICS: u8 = 0xff;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("{0} vCPUs requested; the MP table supports 1 to {max}", max = MAX_VCPUS)]
    VcpuCount(u8),
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specrev: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct TableHeader {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    product: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    entry_count: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Processor {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    cpu_flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Bus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Ioapic {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    address: u32,
}

/// An I/O (type 3) or local (type 4) interrupt assignment; same layout.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct Interrupt {
    entry_type: u8,
    irq_type: u8,
    irq_flags: u16,
    src_bus: u8,
    src_irq: u8,
    dst_apic: u8,
    dst_pin: u8,
}

// SAFETY: plain-old-data structs with no padding (packed) and no pointers.
unsafe impl ByteValued for FloatingPointer {}
unsafe impl ByteValued for TableHeader {}
unsafe impl ByteValued for Processor {}
unsafe impl ByteValued for Bus {}
unsafe impl ByteValued for Ioapic {}
unsafe impl ByteValued for Interrupt {}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The bytes to place at [`MPTABLE_START`] for `vcpus` CPUs: the floating
/// pointer followed by the configuration table.
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        push(
            Processor {
                entry_type: ENTRY_PROCESSOR,
                apic_id: cpu,
                apic_version: APIC_VERSION,
                cpu_flags: flags,
                signature: CPU_SIGNATURE,
                features: CPU_FEATURES,
                ..Default::default()
            }
            .as_slice(),
        );
    }
    push(
        Bus {
            entry_type: ENTRY_BUS,
            bus_id: 0,
            bus_type: *b"ISA   ",
        }
        .as_slice(),
    );
    push(
        Ioapic {
            entry_type: ENTRY_IOAPIC,
            apic_id: ioapic_id,
            apic_version: IOAPIC_VERSION,
            flags: MPC_APIC_USABLE,
            address: IOAPIC_DEFAULT_PHYS_BASE,
        }
        .as_slice(),
    );
    for irq in 0..IRQ_LINES {
        push(
            Interrupt {
                entry_type: ENTRY_INTSRC,
                irq_type: INT_TYPE_INT,
                irq_flags: 0, // bus-default polarity and trigger
                src_bus: 0,
                src_irq: irq,
                dst_apic: ioapic_id,
                dst_pin: irq,
            }
            .as_slice(),
        );
    }
    for (irq_type, pin) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        push(
            Interrupt {
                entry_type: ENTRY_LINTSRC,
                irq_type,
                src_bus: 0,
                dst_apic: DEST_ALL_LAPICS,
                dst_pin: pin,
                ..Default::default()
            }
            .as_slice(),
        );
    }

    let fp_size = std::mem::size_of::<FloatingPointer>();
    let header_size = std::mem::size_of::<TableHeader>();
    let table_start = MPTABLE_START + fp_size as u64;
    let mut header = TableHeader {
        signature: *b"PCMP",
        length: (header_size + entries.len()) as u16,
        spec: MPC_SPEC_REV,
        oem: *b"PODBOX  ",
        product: *b"MICROVM     ",
        entry_count: count,
        lapic: APIC_DEFAULT_PHYS_BASE,
        ..Default::default()
    };
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&entries);
    header.checksum = checksum(&table);
    table[..header_size].copy_from_slice(header.as_slice());

    let mut fp = FloatingPointer {
        signature: *b"_MP_",
        physptr: table_start as u32,
        length: 1, // in 16-byte units
        specrev: MPC_SPEC_REV,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    let mut image = fp.as_slice().to_vec();
    image.extend_from_slice(&table);
    debug_assert!(MPTABLE_START + image.len() as u64 <= EBDA_END);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// Parses an image back into (entry type, entry bytes) pairs.
    fn parse(image: &[u8]) -> (FloatingPointer, TableHeader, Vec<(u8, Vec<u8>)>) {
        let fp = FloatingPointer::from_slice(&image[..16]).copied().unwrap();
        let table = &image[(fp.physptr as u64 - MPTABLE_START) as usize..];
        let header = TableHeader::from_slice(&table[..44]).copied().unwrap();
        let mut entries = Vec::new();
        let mut at = 44;
        for _ in 0..header.entry_count {
            let len = if table[at] == ENTRY_PROCESSOR { 20 } else { 8 };
            entries.push((table[at], table[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, header.length as usize, "entries fill the table exactly");
        (fp, header, entries)
    }

    #[test]
    fn checksums_are_valid() {
        let image = build(4).unwrap();
        let (fp, header, _) = parse(&image);
        assert_eq!(&fp.signature, b"_MP_");
        assert_eq!(sum(&image[..16]), 0);
        assert_eq!(&header.signature, b"PCMP");
        let table_at = 16;
        assert_eq!(sum(&image[table_at..table_at + header.length as usize]), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu_with_one_bsp() {
        for vcpus in [1u8, 2, 7, MAX_VCPUS] {
            let (_, _, entries) = parse(&build(vcpus).unwrap());
            let cpus: Vec<_> = entries
                .iter()
                .filter(|e| e.0 == ENTRY_PROCESSOR)
                .map(|e| e.1.clone())
                .collect();
            assert_eq!(cpus.len(), vcpus as usize);
            let ids: Vec<u8> = cpus.iter().map(|c| c[1]).collect();
            assert_eq!(ids, (0..vcpus).collect::<Vec<_>>());
            let bsps = cpus
                .iter()
                .filter(|c| c[3] & CPU_BOOTPROCESSOR != 0)
                .count();
            assert_eq!(bsps, 1);
            assert!(cpus.iter().all(|c| c[3] & CPU_ENABLED != 0));
        }
    }

    #[test]
    fn ioapic_and_interrupt_routing() {
        let (_, header, entries) = parse(&build(2).unwrap());
        assert_eq!({ header.lapic }, APIC_DEFAULT_PHYS_BASE);
        let ioapic: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_IOAPIC).collect();
        assert_eq!(ioapic.len(), 1);
        assert_eq!(ioapic[0].1[1], 2, "IOAPIC id follows the CPU ids");
        let routes: Vec<(u8, u8)> = entries
            .iter()
            .filter(|e| e.0 == ENTRY_INTSRC)
            .map(|e| (e.1[5], e.1[7]))
            .collect();
        assert_eq!(routes, (0..IRQ_LINES).map(|i| (i, i)).collect::<Vec<_>>());
        assert_eq!(entries.iter().filter(|e| e.0 == ENTRY_LINTSRC).count(), 2);
    }

    #[test]
    fn fits_in_the_last_kib_of_base_memory() {
        let image = build(MAX_VCPUS).unwrap();
        assert!(MPTABLE_START + image.len() as u64 <= EBDA_END);
    }

    #[test]
    fn rejects_zero_and_too_many_vcpus() {
        assert_eq!(build(0).unwrap_err(), MptableError::VcpuCount(0));
        assert_eq!(
            build(MAX_VCPUS + 1).unwrap_err(),
            MptableError::VcpuCount(MAX_VCPUS + 1)
        );
    }
}

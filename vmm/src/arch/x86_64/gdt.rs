//! The boot GDT: a flat 64-bit code segment, a flat data segment and a TSS
//! descriptor, and their translation into the `kvm_segment`s the vCPU's
//! special registers take.

use kvm_bindings::kvm_segment;

/// Descriptor flags in the layout `entry()` takes: bits 0-7 are the access
/// byte (P, DPL, S, type), bits 12-15 the G/DB/L/AVL nibble.
const CODE64_FLAGS: u16 = 0xa09b; // present, ring 0, execute/read, accessed; G, L
const DATA_FLAGS: u16 = 0xc093; // present, ring 0, read/write, accessed; G, DB
const TSS_FLAGS: u16 = 0x808b; // present, ring 0, busy 64-bit TSS; G

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Packs one 8-byte segment descriptor.
pub const fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT, indexed by selector / 8.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        entry(CODE64_FLAGS, 0, 0xfffff),
        entry(DATA_FLAGS, 0, 0xfffff),
        entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Decodes descriptor `index` of `table` into the form KVM loads.
pub fn segment(table: &[u64], index: usize) -> kvm_segment {
    let e = table[index];
    let access = ((e >> 40) & 0xff) as u8;
    let nibble = ((e >> 52) & 0xf) as u8;
    let granular = nibble >> 3 & 1;
    let raw_limit = ((e >> 32) & 0x000f_0000) as u32 | (e & 0xffff) as u32;
    kvm_segment {
        base: ((e >> 32) & 0xff00_0000) | ((e >> 16) & 0x00ff_ffff),
        limit: if granular == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (index * 8) as u16,
        type_: access & 0xf,
        present: access >> 7,
        dpl: (access >> 5) & 3,
        db: nibble >> 2 & 1,
        s: (access >> 4) & 1,
        l: nibble >> 1 & 1,
        g: granular,
        avl: nibble & 1,
        unusable: u8::from(access >> 7 == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring_0() {
        let gdt = boot_gdt();
        let cs = segment(&gdt, usize::from(CODE_SELECTOR / 8));
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.dpl, cs.present, cs.s, cs.type_),
            (0x08, 1, 0, 0, 1, 1, 0xb)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = boot_gdt();
        let ds = segment(&gdt, usize::from(DATA_SELECTOR / 8));
        assert_eq!(
            (ds.selector, ds.l, ds.db, ds.type_, ds.s),
            (0x10, 0, 1, 3, 1)
        );
        let tss = segment(&gdt, usize::from(TSS_SELECTOR / 8));
        assert_eq!(
            (tss.selector, tss.type_, tss.s, tss.present),
            (0x18, 0xb, 0, 1)
        );
    }

    #[test]
    fn entry_packs_base_and_limit_fields() {
        let e = entry(0x009b, 0x1234_5678, 0xabcde); // byte-granular
        let seg = segment(&[e], 0);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.unusable, 0);
        assert_eq!(segment(&[0], 0).unusable, 1);
    }
}

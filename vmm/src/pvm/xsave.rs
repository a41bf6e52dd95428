//! XSAVE and XRSTOR (standard form), performed on a copy of the vCPU's
//! extended state for PVM hosts, whose in-kernel emulator fails on them.
//!
//! Why the guest needs them at all: on PVM, guest user code runs natively
//! with the host's XCR0, so glibc's string functions use AVX/AVX-512
//! registers. A guest kernel without XSAVE (`noxsave`) switches tasks with
//! FXSAVE, which keeps only x87 and XMM state: the upper halves of YMM and
//! the AVX-512 registers leaked from one guest process into the next, and
//! copied memory came out as another process's bytes or zeros. With XSAVE
//! enabled the guest kernel saves what its XCR0 names, through these.
//!
//! Both work on KVM_GET_XSAVE's 4 KiB area, which is itself in standard
//! form (legacy FXSAVE region, 64-byte header, components at the offsets
//! CPUID leaf 0xD gives), and on `image`, the bytes at the instruction's
//! memory operand. Everything in `image` comes from the guest: it is
//! checked the way the CPU checks it, and what the CPU would refuse with
//! #GP is returned as [`XsaveFault`], never a panic.

use kvm_bindings::kvm_cpuid_entry2;

/// Size of KVM_GET_XSAVE's area.
pub const AREA_LEN: usize = 4096;
/// The legacy region (FXSAVE layout) is followed by the XSAVE header.
const HEADER: usize = 512;
/// Legacy region plus header: the least an XSAVE image covers.
const MIN_IMAGE_LEN: usize = 576;

const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const YMM: u64 = 1 << 2;

/// x87 state in the legacy region: FCW..FDP, then ST0-ST7.
const X87_CONTROL: std::ops::Range<usize> = 0..24;
const X87_REGS: std::ops::Range<usize> = 32..160;
/// MXCSR and MXCSR_MASK.
const MXCSR: std::ops::Range<usize> = 24..28;
const MXCSR_MASK: std::ops::Range<usize> = 28..32;
const XMM_REGS: std::ops::Range<usize> = 160..416;
/// FCW after init: all x87 exceptions masked, 64-bit precision.
const FCW_INIT: u16 = 0x037f;
/// MXCSR_MASK when the area reports 0 (SDM: then 0xFFBF applies).
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;

const LEAF_XSTATE: u32 = 0xd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XsaveFault {
    #[error("#GP: XRSTOR header or MXCSR the CPU would refuse")]
    GeneralProtection,
}

/// Where the extended components (bit 2 and up) sit in standard form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// (component bit, offset, size), each inside the 4 KiB area.
    parts: Vec<(u32, usize, usize)>,
}

impl Layout {
    /// From CPUID leaf 0xD sub-leaves 2..63 (EAX size, EBX offset).
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Layout {
        let mut parts: Vec<(u32, usize, usize)> = entries
            .iter()
            .filter(|e| e.function == LEAF_XSTATE && (2..64).contains(&e.index))
            .map(|e| (e.index, e.ebx as usize, e.eax as usize))
            .filter(|&(_, off, size)| size > 0 && off >= MIN_IMAGE_LEN && off + size <= AREA_LEN)
            .collect();
        parts.sort_unstable();
        Layout { parts }
    }

    /// Bytes at the memory operand that XSAVE/XRSTOR with `rfbm` touches.
    pub fn image_len(&self, rfbm: u64) -> usize {
        self.requested(rfbm)
            .map(|(_, off, size)| off + size)
            .fold(MIN_IMAGE_LEN, usize::max)
    }

    fn requested(&self, rfbm: u64) -> impl Iterator<Item = (u32, usize, usize)> + '_ {
        self.parts
            .iter()
            .copied()
            .filter(move |&(bit, _, _)| rfbm & (1 << bit) != 0)
    }
}

/// XCR0 of this host process, if the CPU has XSAVE: on PVM guest user code
/// runs natively with it.
pub fn host_xcr0() -> Option<u64> {
    #[target_feature(enable = "xsave")]
    unsafe fn xgetbv0() -> u64 {
        // SAFETY (of the intrinsic): XGETBV with ECX=0 is allowed in user
        // mode once the OS has set CR4.OSXSAVE, which the caller checked.
        unsafe { std::arch::x86_64::_xgetbv(0) }
    }
    if std::arch::is_x86_feature_detected!("xsave") {
        // SAFETY: the CPU and OS support XSAVE (checked just above).
        Some(unsafe { xgetbv0() })
    } else {
        None
    }
}

/// State components the host's XCR0 enables (so guest user code may use
/// them) that KVM cannot give the guest kernel to switch: each one leaks
/// between guest processes.
pub fn unswitchable(host_xcr0: u64, supported: &[kvm_cpuid_entry2]) -> u64 {
    let offered = supported
        .iter()
        .find(|e| e.function == LEAF_XSTATE && e.index == 0)
        .map_or(X87 | SSE, |e| (u64::from(e.edx) << 32) | u64::from(e.eax));
    host_xcr0 & !offered
}

fn header_bv(bytes: &[u8]) -> u64 {
    u64_at(bytes, HEADER)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(bytes: &[u8], range: std::ops::Range<usize>) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&bytes[range]);
    u32::from_le_bytes(w)
}

fn set_header_bv(bytes: &mut [u8], bv: u64) {
    bytes[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
}

fn copy(dst: &mut [u8], src: &[u8], range: std::ops::Range<usize>) {
    dst[range.clone()].copy_from_slice(&src[range]);
}

/// XSAVE: writes the components in `rfbm` from `area` into `image` (the
/// operand's current bytes, `layout.image_len(rfbm)` long) and updates its
/// XSTATE_BV for them; everything else in `image` stays as it was.
pub fn save(area: &[u8], rfbm: u64, layout: &Layout, image: &mut [u8]) {
    debug_assert!(area.len() == AREA_LEN && image.len() >= layout.image_len(rfbm));
    if rfbm & X87 != 0 {
        copy(image, area, X87_CONTROL);
        copy(image, area, X87_REGS);
    }
    if rfbm & (SSE | YMM) != 0 {
        copy(image, area, MXCSR);
        copy(image, area, MXCSR_MASK);
    }
    if rfbm & SSE != 0 {
        copy(image, area, XMM_REGS);
    }
    for (_, off, size) in layout.requested(rfbm) {
        copy(image, area, off..off + size);
    }
    let bv = (header_bv(image) & !rfbm) | (header_bv(area) & rfbm);
    set_header_bv(image, bv);
}

/// XRSTOR: loads the components in `rfbm` into `area` from `image`, or
/// puts them in their initial state where the image's XSTATE_BV says so.
pub fn restore(
    area: &mut [u8],
    xcr0: u64,
    rfbm: u64,
    layout: &Layout,
    image: &[u8],
) -> Result<(), XsaveFault> {
    debug_assert!(area.len() == AREA_LEN && image.len() >= layout.image_len(rfbm));
    let image_bv = header_bv(image);
    // Standard form only: XCOMP_BV and the next 8 header bytes must be 0
    // (compacted form needs XSAVEC, which the guest is not offered), and
    // XSTATE_BV may only name components XCR0 enables.
    if u64_at(image, HEADER + 8) != 0 || u64_at(image, HEADER + 16) != 0 {
        return Err(XsaveFault::GeneralProtection);
    }
    if image_bv & !xcr0 != 0 {
        return Err(XsaveFault::GeneralProtection);
    }
    if rfbm & (SSE | YMM) != 0 {
        let mask = match u32_at(area, MXCSR_MASK) {
            0 => MXCSR_MASK_DEFAULT,
            m => m,
        };
        if u32_at(image, MXCSR) & !mask != 0 {
            return Err(XsaveFault::GeneralProtection);
        }
        copy(area, image, MXCSR);
    }
    let loaded = rfbm & image_bv;
    if rfbm & X87 != 0 {
        if loaded & X87 != 0 {
            copy(area, image, X87_CONTROL);
            copy(area, image, X87_REGS);
        } else {
            area[X87_CONTROL].fill(0);
            area[X87_REGS].fill(0);
            area[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        }
    }
    if rfbm & SSE != 0 {
        if loaded & SSE != 0 {
            copy(area, image, XMM_REGS);
        } else {
            area[XMM_REGS].fill(0);
        }
    }
    for (bit, off, size) in layout.requested(rfbm) {
        if loaded & (1 << bit) != 0 {
            copy(area, image, off..off + size);
        } else {
            area[off..off + size].fill(0);
        }
    }
    let bv = (header_bv(area) & !rfbm) | loaded;
    set_header_bv(area, bv);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 machine this was written on: YMM, opmask, ZMM_Hi256,
    /// Hi16_ZMM at their standard offsets.
    fn layout() -> Layout {
        let leaf = |index, eax, ebx| kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index,
            eax,
            ebx,
            ..Default::default()
        };
        Layout::from_cpuid(&[
            leaf(0, 0xe7, 0x980),
            leaf(1, 0, 0),
            leaf(2, 0x100, 0x240),
            leaf(5, 0x40, 0x340),
            leaf(6, 0x200, 0x380),
            leaf(7, 0x400, 0x580),
        ])
    }

    fn area_with(fill: u8, bv: u64) -> Vec<u8> {
        let mut a = vec![fill; AREA_LEN];
        // A valid MXCSR and mask, and an empty header.
        a[MXCSR].copy_from_slice(&0x1f80u32.to_le_bytes());
        a[MXCSR_MASK].copy_from_slice(&0xffffu32.to_le_bytes());
        a[HEADER..MIN_IMAGE_LEN].fill(0);
        set_header_bv(&mut a, bv);
        a
    }

    #[test]
    fn unswitchable_names_host_state_kvm_does_not_offer() {
        let supported = [kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index: 0,
            eax: 0xe7,
            ..Default::default()
        }];
        assert_eq!(unswitchable(0xe7, &supported), 0);
        // PKRU (bit 9) enabled on the host but not offered.
        assert_eq!(unswitchable(0x2e7, &supported), 0x200);
    }

    #[test]
    fn layout_reads_leaf_0xd_and_sizes_images() {
        let l = layout();
        assert_eq!(l.parts.len(), 4);
        assert_eq!(l.image_len(X87 | SSE), 576);
        assert_eq!(l.image_len(X87 | SSE | YMM), 0x240 + 0x100);
        assert_eq!(l.image_len(0xe7), 0x580 + 0x400);
        // Sub-leaves pointing outside the area or into the header are ignored.
        let bad = kvm_cpuid_entry2 {
            function: LEAF_XSTATE,
            index: 9,
            eax: 0x100,
            ebx: 0xf80,
            ..Default::default()
        };
        assert!(Layout::from_cpuid(&[bad]).parts.is_empty());
    }

    #[test]
    fn save_writes_only_requested_components() {
        let l = layout();
        let area = area_with(0xaa, X87 | SSE | YMM);
        let mut image = vec![0x55; l.image_len(0xe7)];
        set_header_bv(&mut image, 0x20);
        save(&area, X87 | SSE, &l, &mut image);
        assert!(image[XMM_REGS].iter().all(|&b| b == 0xaa));
        assert!(image[X87_REGS].iter().all(|&b| b == 0xaa));
        assert_eq!(u32_at(&image, MXCSR), 0x1f80);
        // YMM was not asked for: untouched.
        assert!(image[0x240..0x340].iter().all(|&b| b == 0x55));
        // XSTATE_BV: requested bits from the area, others kept.
        assert_eq!(header_bv(&image), 0x20 | X87 | SSE);

        save(&area, 0xe7, &l, &mut image);
        assert!(image[0x240..0x340].iter().all(|&b| b == 0xaa));
        assert_eq!(header_bv(&image), X87 | SSE | YMM);
    }

    #[test]
    fn restore_loads_or_initialises_and_round_trips() {
        let l = layout();
        let saved_from = area_with(0x11, 0xe7);
        let mut image = vec![0; l.image_len(0xe7)];
        save(&saved_from, 0xe7, &l, &mut image);

        let mut area = area_with(0x99, 0xe7);
        restore(&mut area, 0xe7, 0xe7, &l, &image).unwrap();
        // Bytes 416..512 of the legacy region are software's; XRSTOR skips them.
        assert_eq!(area[..XMM_REGS.end], saved_from[..XMM_REGS.end]);
        let end = l.image_len(0xe7);
        assert_eq!(area[MIN_IMAGE_LEN..end], saved_from[MIN_IMAGE_LEN..end]);

        // XSTATE_BV without YMM: YMM goes to its initial state (zeros),
        // the x87 control word to 0x37F when x87 is not loaded.
        set_header_bv(&mut image, SSE);
        let mut area = area_with(0x99, 0xe7);
        restore(&mut area, 0xe7, X87 | SSE | YMM, &l, &image).unwrap();
        assert!(area[0x240..0x340].iter().all(|&b| b == 0));
        assert_eq!(&area[0..2], &FCW_INIT.to_le_bytes());
        assert!(area[XMM_REGS].iter().all(|&b| b == 0x11));
        // Components outside RFBM keep the vCPU's values.
        assert!(area[0x380..0x580].iter().all(|&b| b == 0x99));
        assert_eq!(header_bv(&area), SSE | (0xe7 & !(X87 | SSE | YMM)));
    }

    #[test]
    fn restore_refuses_what_the_cpu_refuses() {
        let l = layout();
        let fresh = || {
            let mut image = vec![0; l.image_len(0xe7)];
            image[MXCSR].copy_from_slice(&0x1f80u32.to_le_bytes());
            image
        };
        let mut area = area_with(0, 0);
        // A component XCR0 does not enable.
        let mut image = fresh();
        set_header_bv(&mut image, X87 | YMM);
        assert_eq!(
            restore(&mut area, X87 | SSE, X87 | SSE, &l, &image),
            Err(XsaveFault::GeneralProtection)
        );
        // Compacted form / reserved header bytes.
        let mut image = fresh();
        image[HEADER + 15] = 0x80;
        assert_eq!(
            restore(&mut area, 0xe7, 0xe7, &l, &image),
            Err(XsaveFault::GeneralProtection)
        );
        // Reserved MXCSR bits.
        let mut image = fresh();
        image[MXCSR].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        assert_eq!(
            restore(&mut area, 0xe7, X87 | SSE, &l, &image),
            Err(XsaveFault::GeneralProtection)
        );
        // Nothing of the refused images reached the area.
        assert_eq!(area, area_with(0, 0));
    }
}

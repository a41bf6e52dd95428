//! The PVM emulation fallback: KVM's emulation-failure data
//! (`vstate::vcpu::instruction_bytes`), the decoder
//! (`pvm::fallback::decode`), and `apply` on fuzzed registers with its
//! memory operands walked through `vstate::vcpu::translate_range` /
//! `read_pieces` / `write_pieces` over a fuzzed page table, and XSAVE /
//! XRSTOR on a fuzzed extended-state area, XCR0 and CPUID leaf 0xD layout
//! (`pvm::xsave`).

#![no_main]

use std::cell::RefCell;

use arbitrary::Arbitrary;
use kvm_bindings::{kvm_cpuid_entry2, kvm_regs};
use libfuzzer_sys::fuzz_target;
use podbox_fuzz::{decode, guest_memory, Blob, MEM_SIZE};
use podbox_vmm::pvm::fallback::{self, Exception, FallbackError, GuestAccess, Segment};
use podbox_vmm::pvm::xsave::{self, Layout};
use podbox_vmm::vstate::vcpu::{
    instruction_bytes, read_pieces, translate_range, write_pieces, Translation,
};
use vm_memory::GuestMemoryMmap;

#[derive(Debug, Arbitrary)]
struct Page {
    /// Guest-virtual page number (folded near the operand's registers).
    virt: u64,
    /// Guest-physical page number (folded into guest memory unless huge).
    phys: u32,
    huge: bool,
    valid: bool,
    writeable: bool,
}

#[derive(Debug, Arbitrary)]
struct XsaveComponent {
    bit: u8,
    size: u16,
    offset: u16,
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// KVM's exit data: ndata and the words after the flags word; or, with
    /// `raw`, the instruction bytes as they are.
    ndata: u32,
    flags: u64,
    words: [u64; 2],
    raw: Option<Vec<u8>>,
    regs: [u64; 18],
    fs_base: u64,
    gs_base: u64,
    /// Pages the translation knows; anything else is not present, and the
    /// `identity` low memory maps straight through.
    pages: Vec<Page>,
    identity: bool,
    identity_writeable: bool,
    translate_fails: Option<u64>,
    xcr0: Option<u64>,
    area: Vec<u8>,
    components: Vec<XsaveComponent>,
    memory: Vec<Blob>,
}

struct FuzzGuest<'a> {
    input: &'a Input,
    mem: GuestMemoryMmap,
    area: RefCell<Vec<u8>>,
    layout: Layout,
}

impl FuzzGuest<'_> {
    fn translate(&self, gva: u64) -> Result<Translation, FallbackError> {
        let page = gva >> 12;
        if self.input.translate_fails == Some(page) {
            return Err(FallbackError::Memory {
                gva,
                reason: "KVM_TRANSLATE: fuzz".into(),
            });
        }
        let found = self.input.pages.iter().find(|p| p.virt == page);
        let (valid, writeable, phys) = match found {
            Some(p) => {
                let phys = if p.huge {
                    u64::from(p.phys) << 12
                } else {
                    (u64::from(p.phys) << 12) % MEM_SIZE
                };
                (p.valid, p.writeable, phys)
            }
            None if self.input.identity && gva < MEM_SIZE => {
                (true, self.input.identity_writeable, page << 12)
            }
            None => (false, false, 0),
        };
        Ok(Translation {
            valid,
            writeable,
            physical_address: phys | (gva & 0xfff),
        })
    }

    fn pieces(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<Result<Vec<(u64, usize)>, Exception>, FallbackError> {
        translate_range(gva, len, write, |a| self.translate(a))
    }
}

impl GuestAccess for FuzzGuest<'_> {
    fn segment_base(&self, seg: Segment) -> u64 {
        match seg {
            Segment::Fs => self.input.fs_base,
            Segment::Gs => self.input.gs_base,
        }
    }

    // As the vCPU does: unmapped is an error here, not a fault.
    fn read_virt(&self, gva: u64, size: u8) -> Result<u64, FallbackError> {
        let bytes = match self.pieces(gva, usize::from(size), false)? {
            Ok(pieces) => read_pieces(&self.mem, &pieces, gva)?,
            Err(_) => {
                return Err(FallbackError::Memory {
                    gva,
                    reason: "not mapped".into(),
                })
            }
        };
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(&bytes);
        Ok(u64::from_le_bytes(word))
    }

    fn read_bytes(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<Result<Vec<u8>, Exception>, FallbackError> {
        match self.pieces(gva, len, write)? {
            Ok(pieces) => read_pieces(&self.mem, &pieces, gva).map(Ok),
            Err(fault) => Ok(Err(fault)),
        }
    }

    fn write_bytes(&self, gva: u64, data: &[u8]) -> Result<(), FallbackError> {
        match self.pieces(gva, data.len(), true)? {
            Ok(pieces) => write_pieces(&self.mem, &pieces, gva, data),
            Err(_) => Err(FallbackError::Memory {
                gva,
                reason: "became unwritable between check and write".into(),
            }),
        }
    }

    fn xcr0(&self) -> Result<u64, FallbackError> {
        self.input.xcr0.ok_or(FallbackError::Kvm {
            what: "KVM_GET_XCRS",
            reason: "fuzz".into(),
        })
    }

    fn xsave_area(&self) -> Result<Vec<u8>, FallbackError> {
        Ok(self.area.borrow().clone())
    }

    fn set_xsave_area(&self, area: &[u8]) -> Result<(), FallbackError> {
        *self.area.borrow_mut() = area.to_vec();
        Ok(())
    }

    fn xsave_layout(&self) -> &Layout {
        &self.layout
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = decode::<Input>(data) else {
        return;
    };
    let bytes = match &input.raw {
        Some(raw) => raw.clone(),
        None => {
            let data = {
                let mut d = [0u64; 16];
                d[0] = input.flags;
                d[1..3].copy_from_slice(&input.words);
                d
            };
            match instruction_bytes(input.ndata, &data) {
                Some(b) => b,
                None => return,
            }
        }
    };
    let Ok(decoded) = fallback::decode(&bytes) else {
        return;
    };
    assert!(decoded.len <= bytes.len() && decoded.len <= fallback::MAX_INSN_LEN);
    let mem = guest_memory();
    for b in &input.memory {
        b.write(&mem);
    }
    // CPUID leaf 0xD sub-leaves as KVM would report them.
    let cpuid: Vec<kvm_cpuid_entry2> = input
        .components
        .iter()
        .take(16)
        .map(|c| kvm_cpuid_entry2 {
            function: 0xd,
            index: u32::from(c.bit),
            eax: u32::from(c.size),
            ebx: u32::from(c.offset),
            ..Default::default()
        })
        .collect();
    // KVM_GET_XSAVE always gives 4 KiB; a short one is what `apply` refuses.
    let mut area = input.area.clone();
    if area.len() > 64 {
        area.resize(xsave::AREA_LEN, 0);
    }
    let guest = FuzzGuest {
        input: &input,
        mem,
        area: RefCell::new(area),
        layout: Layout::from_cpuid(&cpuid),
    };
    let r = input.regs;
    let mut regs = kvm_regs {
        rax: r[0],
        rbx: r[1],
        rcx: r[2],
        rdx: r[3],
        rsi: r[4],
        rdi: r[5],
        rsp: r[6],
        rbp: r[7],
        r8: r[8],
        r9: r[9],
        r10: r[10],
        r11: r[11],
        r12: r[12],
        r13: r[13],
        r14: r[14],
        r15: r[15],
        rip: r[16],
        rflags: r[17],
    };
    let _ = fallback::apply(&decoded, &mut regs, &guest);
    let stats = fallback::FallbackStats::default();
    stats.record(&decoded.insn);
});

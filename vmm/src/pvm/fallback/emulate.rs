//! Performing a decoded instruction on the vCPU's registers and, through
//! [`GuestAccess`], on guest memory and extended state.

use kvm_bindings::kvm_regs;

use super::insn::{Base, Decoded, FallbackError, Instruction, MemOperand, Operand, Segment};
use crate::pvm::xsave::{self, XsaveFault};

pub(super) const RFLAGS_AC: u64 = 1 << 18;
/// CF, PF, AF, ZF, SF, OF.
const RFLAGS_ARITH: u64 = 0x8d5;
pub(super) const RFLAGS_ZF: u64 = 1 << 6;

fn reg_mut(regs: &mut kvm_regs, n: u8) -> &mut u64 {
    match n & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn reg(regs: &kvm_regs, n: u8) -> u64 {
    let mut copy = *regs;
    *reg_mut(&mut copy, n)
}

/// What the guest sees besides its general registers.
pub trait GuestAccess {
    /// Base of FS or GS.
    fn segment_base(&self, seg: Segment) -> u64;
    /// Reads `size` bytes (little endian) at guest-virtual `gva`.
    fn read_virt(&self, gva: u64, size: u8) -> Result<u64, FallbackError>;
    /// Reads `len` bytes at `gva` as the guest kernel would (for a write
    /// when `write`): the bytes, or the page fault the CPU would raise.
    fn read_bytes(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<Result<Vec<u8>, Exception>, FallbackError>;
    /// Writes `data` at `gva` (already checked writable by `read_bytes`).
    fn write_bytes(&self, gva: u64, data: &[u8]) -> Result<(), FallbackError>;
    /// XCR0, the vCPU's extended state (KVM_GET_XSAVE's area) and where its
    /// components sit.
    fn xcr0(&self) -> Result<u64, FallbackError>;
    fn xsave_area(&self) -> Result<Vec<u8>, FallbackError>;
    fn set_xsave_area(&self, area: &[u8]) -> Result<(), FallbackError>;
    fn xsave_layout(&self) -> &xsave::Layout;
}

/// An exception the instruction raises in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// #BP after `int3` (RIP already past it).
    Breakpoint,
    /// #PF at `address` (CR2); RIP stays on the instruction.
    PageFault { address: u64, error_code: u32 },
    /// #GP(0); RIP stays on the instruction.
    GeneralProtection,
}

/// Page-fault error code bits for a supervisor access.
pub const PF_PRESENT: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;

/// What the VMM must do after [`apply`] besides writing back the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Resume,
    Inject(Exception),
}

/// The guest-virtual address a memory operand names.
fn effective_address(
    m: &MemOperand,
    regs: &kvm_regs,
    next_rip: u64,
    guest: &dyn GuestAccess,
) -> u64 {
    let mut gva = m.disp as u64;
    gva = gva.wrapping_add(match m.base {
        Some(Base::Reg(r)) => reg(regs, r),
        Some(Base::Rip) => next_rip,
        None => 0,
    });
    if let Some((r, scale)) = m.index {
        gva = gva.wrapping_add(reg(regs, r).wrapping_mul(u64::from(scale)));
    }
    if let Some(seg) = m.segment {
        gva = gva.wrapping_add(guest.segment_base(seg));
    }
    gva
}

/// XSAVE or XRSTOR on the area at `gva`: an exception, or done.
fn xsave_or_xrstor(
    save: bool,
    gva: u64,
    regs: &kvm_regs,
    guest: &dyn GuestAccess,
) -> Result<Option<Exception>, FallbackError> {
    if !gva.is_multiple_of(64) {
        return Ok(Some(Exception::GeneralProtection));
    }
    let xcr0 = guest.xcr0()?;
    let rfbm = xcr0 & ((regs.rdx << 32) | (regs.rax & 0xffff_ffff));
    let layout = guest.xsave_layout();
    let mut image = match guest.read_bytes(gva, layout.image_len(rfbm), save)? {
        Ok(bytes) => bytes,
        Err(fault) => return Ok(Some(fault)),
    };
    let mut area = guest.xsave_area()?;
    if area.len() != xsave::AREA_LEN {
        return Err(FallbackError::Kvm {
            what: "KVM_GET_XSAVE",
            reason: format!("{} bytes, expected {}", area.len(), xsave::AREA_LEN),
        });
    }
    if save {
        xsave::save(&area, rfbm, layout, &mut image);
        guest.write_bytes(gva, &image)?;
    } else {
        match xsave::restore(&mut area, xcr0, rfbm, layout, &image) {
            Ok(()) => guest.set_xsave_area(&area)?,
            Err(XsaveFault::GeneralProtection) => return Ok(Some(Exception::GeneralProtection)),
        }
    }
    Ok(None)
}

/// Performs `d` on `regs` (RIP advanced past it).
pub fn apply(
    d: &Decoded,
    regs: &mut kvm_regs,
    guest: &dyn GuestAccess,
) -> Result<Effect, FallbackError> {
    let next_rip = regs.rip.wrapping_add(d.len as u64);
    let mut effect = Effect::Resume;
    match d.insn {
        Instruction::Fwait => {}
        Instruction::Int3 => effect = Effect::Inject(Exception::Breakpoint),
        Instruction::Clac => regs.rflags &= !RFLAGS_AC,
        Instruction::Stac => regs.rflags |= RFLAGS_AC,
        Instruction::Popcnt { size, dst, src } => {
            let mask = if size == 8 {
                u64::MAX
            } else {
                (1u64 << (size * 8)) - 1
            };
            let value = match src {
                Operand::Reg(r) => reg(regs, r),
                Operand::Mem(m) => {
                    guest.read_virt(effective_address(&m, regs, next_rip, guest), size)?
                }
            } & mask;
            let count = u64::from(value.count_ones());
            let dst = reg_mut(regs, dst);
            // 32-bit results zero the upper half; 16-bit ones keep it.
            *dst = match size {
                2 => (*dst & !0xffff) | count,
                _ => count,
            };
            regs.rflags &= !RFLAGS_ARITH;
            if value == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
        }
        Instruction::Xsave { area } | Instruction::Xrstor { area } => {
            let save = matches!(d.insn, Instruction::Xsave { .. });
            let gva = effective_address(&area, regs, next_rip, guest);
            if let Some(fault) = xsave_or_xrstor(save, gva, regs, guest)? {
                // A fault leaves RIP on the instruction, as the CPU does.
                return Ok(Effect::Inject(fault));
            }
        }
    }
    regs.rip = next_rip;
    Ok(effect)
}

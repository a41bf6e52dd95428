//! Performing, in the VMM, the instructions a PVM host's in-kernel emulator
//! gives up on (`KVM_EXIT_INTERNAL_ERROR`, suberror "emulation").
//!
//! KVM hands over the instruction bytes; [`decode`] turns them into an
//! [`Instruction`] (or a clear refusal), [`apply`] performs it on the vCPU's
//! registers and RIP is advanced past it. The bytes come from the guest, so
//! decoding is bounds-checked and anything unknown is an error, never a
//! panic. The vCPU loop counts each kind in [`FallbackStats`].

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::kvm_regs;

use super::xsave::{self, XsaveFault};

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
const RFLAGS_AC: u64 = 1 << 18;
/// CF, PF, AF, ZF, SF, OF.
const RFLAGS_ARITH: u64 = 0x8d5;
const RFLAGS_ZF: u64 = 1 << 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Fs,
    Gs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Reg(u8),
    /// RIP-relative: relative to the next instruction.
    Rip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    pub segment: Option<Segment>,
    pub base: Option<Base>,
    /// (register, scale)
    pub index: Option<(u8, u8)>,
    pub disp: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    Reg(u8),
    Mem(MemOperand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    /// `fwait`: wait for pending x87 exceptions; nothing to do.
    Fwait,
    /// `int3`: deliver #BP to the guest.
    Int3,
    /// `clac` / `stac`: clear / set RFLAGS.AC.
    Clac,
    Stac,
    /// `popcnt dst, src` with a 2, 4 or 8 byte operand.
    Popcnt {
        size: u8,
        dst: u8,
        src: Operand,
    },
    /// `xsave` / `xrstor` (standard form) on the area at `area`, for the
    /// components XCR0 & EDX:EAX; see [`xsave`].
    Xsave {
        area: MemOperand,
    },
    Xrstor {
        area: MemOperand,
    },
}

impl Instruction {
    pub fn name(&self) -> &'static str {
        match self {
            Instruction::Fwait => "fwait",
            Instruction::Int3 => "int3",
            Instruction::Clac => "clac",
            Instruction::Stac => "stac",
            Instruction::Popcnt { .. } => "popcnt",
            Instruction::Xsave { .. } => "xsave",
            Instruction::Xrstor { .. } => "xrstor",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    pub insn: Instruction,
    pub len: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FallbackError {
    #[error("instruction bytes end early")]
    Truncated,
    #[error("no fallback for this instruction")]
    Unknown,
    #[error("address-size override is not supported")]
    AddressSize,
    #[error("reading the memory operand at {gva:#x}: {reason}")]
    Memory { gva: u64, reason: String },
    #[error("{what}: {reason}")]
    Kvm { what: &'static str, reason: String },
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, FallbackError> {
        let b = *self.bytes.get(self.at).ok_or(FallbackError::Truncated)?;
        self.at += 1;
        Ok(b)
    }
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }
    fn disp8(&mut self) -> Result<i64, FallbackError> {
        Ok(i64::from(self.next()? as i8))
    }
    fn disp32(&mut self) -> Result<i64, FallbackError> {
        let b = [self.next()?, self.next()?, self.next()?, self.next()?];
        Ok(i64::from(i32::from_le_bytes(b)))
    }
}

#[derive(Default)]
struct Prefixes {
    operand_size: bool,
    rep: bool,
    segment: Option<Segment>,
    rex: u8,
}

/// Decodes the instruction at the start of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Decoded, FallbackError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let mut c = Cursor { bytes, at: 0 };
    let mut p = Prefixes::default();
    loop {
        match c.peek().ok_or(FallbackError::Truncated)? {
            0x66 => p.operand_size = true,
            0x67 => return Err(FallbackError::AddressSize),
            0xf3 => p.rep = true,
            0xf0 | 0xf2 | 0x26 | 0x2e | 0x36 | 0x3e => {}
            0x64 => p.segment = Some(Segment::Fs),
            0x65 => p.segment = Some(Segment::Gs),
            _ => break,
        }
        c.at += 1;
    }
    if let Some(b @ 0x40..=0x4f) = c.peek() {
        p.rex = b;
        c.at += 1;
    }
    let insn = match c.next()? {
        0x9b => Instruction::Fwait,
        0xcc => Instruction::Int3,
        0x0f => match c.next()? {
            0x01 => match c.next()? {
                0xca => Instruction::Clac,
                0xcb => Instruction::Stac,
                _ => return Err(FallbackError::Unknown),
            },
            // Group 15: /4 xsave, /5 xrstor with a memory operand (with
            // REX.W the 64-bit forms; KVM's area has the 64-bit layout).
            0xae if !p.rep && !p.operand_size => match decode_modrm(&mut c, &p)? {
                (reg, Operand::Mem(area)) if reg & 7 == 4 => Instruction::Xsave { area },
                (reg, Operand::Mem(area)) if reg & 7 == 5 => Instruction::Xrstor { area },
                _ => return Err(FallbackError::Unknown),
            },
            0xb8 if p.rep => {
                let size = if p.rex & 0x8 != 0 {
                    8
                } else if p.operand_size {
                    2
                } else {
                    4
                };
                let (dst, src) = decode_modrm(&mut c, &p)?;
                Instruction::Popcnt { size, dst, src }
            }
            _ => return Err(FallbackError::Unknown),
        },
        _ => return Err(FallbackError::Unknown),
    };
    Ok(Decoded { insn, len: c.at })
}

/// ModRM (+ SIB + displacement): the reg field and the r/m operand.
fn decode_modrm(c: &mut Cursor, p: &Prefixes) -> Result<(u8, Operand), FallbackError> {
    let modrm = c.next()?;
    let (mode, rm) = (modrm >> 6, modrm & 7);
    let rex_bit = |bit: u8| if p.rex & bit != 0 { 8 } else { 0 };
    let reg = ((modrm >> 3) & 7) | rex_bit(0x4);
    if mode == 3 {
        return Ok((reg, Operand::Reg(rm | rex_bit(0x1))));
    }
    let mut mem = MemOperand {
        segment: p.segment,
        base: None,
        index: None,
        disp: 0,
    };
    if rm == 4 {
        let sib = c.next()?;
        let index = ((sib >> 3) & 7) | rex_bit(0x2);
        if index != 4 {
            mem.index = Some((index, 1 << (sib >> 6)));
        }
        if sib & 7 == 5 && mode == 0 {
            mem.disp = c.disp32()?;
        } else {
            mem.base = Some(Base::Reg((sib & 7) | rex_bit(0x1)));
        }
    } else if rm == 5 && mode == 0 {
        mem.base = Some(Base::Rip);
        mem.disp = c.disp32()?;
    } else {
        mem.base = Some(Base::Reg(rm | rex_bit(0x1)));
    }
    match mode {
        1 => mem.disp += c.disp8()?,
        2 => mem.disp += c.disp32()?,
        _ => {}
    }
    Ok((reg, Operand::Mem(mem)))
}

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

/// How often each instruction was performed by the fallback.
#[derive(Default)]
pub struct FallbackStats {
    fwait: AtomicU64,
    int3: AtomicU64,
    clac: AtomicU64,
    stac: AtomicU64,
    popcnt: AtomicU64,
    xsave: AtomicU64,
    xrstor: AtomicU64,
}

impl FallbackStats {
    pub fn record(&self, insn: &Instruction) {
        let counter = match insn {
            Instruction::Fwait => &self.fwait,
            Instruction::Int3 => &self.int3,
            Instruction::Clac => &self.clac,
            Instruction::Stac => &self.stac,
            Instruction::Popcnt { .. } => &self.popcnt,
            Instruction::Xsave { .. } => &self.xsave,
            Instruction::Xrstor { .. } => &self.xrstor,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// "fwait=12 int3=1 ..." for the exit log.
    pub fn summary(&self) -> String {
        let counts = [
            ("fwait", &self.fwait),
            ("int3", &self.int3),
            ("clac", &self.clac),
            ("stac", &self.stac),
            ("popcnt", &self.popcnt),
            ("xsave", &self.xsave),
            ("xrstor", &self.xrstor),
        ];
        let parts: Vec<String> = counts
            .iter()
            .map(|(name, n)| format!("{name}={}", n.load(Ordering::Relaxed)))
            .collect();
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeGuest {
        gs_base: u64,
        mem: Vec<(u64, u64)>,
    }

    impl GuestAccess for FakeGuest {
        fn segment_base(&self, seg: Segment) -> u64 {
            if seg == Segment::Gs {
                self.gs_base
            } else {
                0
            }
        }
        fn read_virt(&self, gva: u64, _size: u8) -> Result<u64, FallbackError> {
            self.mem
                .iter()
                .find(|(a, _)| *a == gva)
                .map(|(_, v)| *v)
                .ok_or(FallbackError::Memory {
                    gva,
                    reason: "unmapped".into(),
                })
        }
        fn read_bytes(
            &self,
            _gva: u64,
            _len: usize,
            _write: bool,
        ) -> Result<Result<Vec<u8>, Exception>, FallbackError> {
            self.unused()
        }
        fn write_bytes(&self, _gva: u64, _data: &[u8]) -> Result<(), FallbackError> {
            self.unused()
        }
        fn xcr0(&self) -> Result<u64, FallbackError> {
            self.unused()
        }
        fn xsave_area(&self) -> Result<Vec<u8>, FallbackError> {
            self.unused()
        }
        fn set_xsave_area(&self, _area: &[u8]) -> Result<(), FallbackError> {
            self.unused()
        }
        fn xsave_layout(&self) -> &xsave::Layout {
            unimplemented!("FakeGuest has no XSAVE state")
        }
    }

    impl FakeGuest {
        fn unused<T>(&self) -> Result<T, FallbackError> {
            Err(FallbackError::Unknown)
        }
    }

    fn no_memory() -> FakeGuest {
        FakeGuest {
            gs_base: 0,
            mem: vec![],
        }
    }

    #[test]
    fn decodes_the_simple_ones() {
        assert_eq!(
            decode(&[0x9b, 0x90]).unwrap(),
            Decoded {
                insn: Instruction::Fwait,
                len: 1
            }
        );
        assert_eq!(
            decode(&[0xcc]).unwrap(),
            Decoded {
                insn: Instruction::Int3,
                len: 1
            }
        );
        assert_eq!(
            decode(&[0x0f, 0x01, 0xca]).unwrap(),
            Decoded {
                insn: Instruction::Clac,
                len: 3
            }
        );
        assert_eq!(
            decode(&[0x0f, 0x01, 0xcb]).unwrap(),
            Decoded {
                insn: Instruction::Stac,
                len: 3
            }
        );
    }

    #[test]
    fn decodes_popcnt_register_forms() {
        // popcnt %rdi,%rax (the kernel's hweight64 alternative)
        let d = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(
            d,
            Decoded {
                insn: Instruction::Popcnt {
                    size: 8,
                    dst: 0,
                    src: Operand::Reg(7)
                },
                len: 5
            }
        );
        // popcnt %edi,%eax
        let d = decode(&[0xf3, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(
            d.insn,
            Instruction::Popcnt {
                size: 4,
                dst: 0,
                src: Operand::Reg(7)
            }
        );
        // popcnt %r9w,%r10w: 66 F3 REX.RB
        let d = decode(&[0x66, 0xf3, 0x45, 0x0f, 0xb8, 0xd1]).unwrap();
        assert_eq!(
            d.insn,
            Instruction::Popcnt {
                size: 2,
                dst: 10,
                src: Operand::Reg(9)
            }
        );
    }

    #[test]
    fn decodes_popcnt_memory_forms() {
        // popcnt 0x10(%rbx,%rcx,8),%rdx
        let d = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0x54, 0xcb, 0x10]).unwrap();
        let mem = MemOperand {
            segment: None,
            base: Some(Base::Reg(3)),
            index: Some((1, 8)),
            disp: 0x10,
        };
        assert_eq!(
            d,
            Decoded {
                insn: Instruction::Popcnt {
                    size: 8,
                    dst: 2,
                    src: Operand::Mem(mem)
                },
                len: 7
            }
        );
        // popcnt %gs:0x1234(%rip),%eax
        let d = decode(&[0x65, 0xf3, 0x0f, 0xb8, 0x05, 0x34, 0x12, 0, 0]).unwrap();
        let mem = MemOperand {
            segment: Some(Segment::Gs),
            base: Some(Base::Rip),
            index: None,
            disp: 0x1234,
        };
        assert_eq!(
            d,
            Decoded {
                insn: Instruction::Popcnt {
                    size: 4,
                    dst: 0,
                    src: Operand::Mem(mem)
                },
                len: 9
            }
        );
        // SIB with no base: popcnt 0x100(,%rsi,4),%eax
        let d = decode(&[0xf3, 0x0f, 0xb8, 0x04, 0xb5, 0, 1, 0, 0]).unwrap();
        let mem = MemOperand {
            segment: None,
            base: None,
            index: Some((6, 4)),
            disp: 0x100,
        };
        assert_eq!(
            d.insn,
            Instruction::Popcnt {
                size: 4,
                dst: 0,
                src: Operand::Mem(mem)
            }
        );
    }

    #[test]
    fn decodes_xsave_and_xrstor() {
        // xsave64 (%rdi) and xrstor64 0x40(%rsi), as the guest kernel has them.
        let rdi = MemOperand {
            segment: None,
            base: Some(Base::Reg(7)),
            index: None,
            disp: 0,
        };
        assert_eq!(
            decode(&[0x48, 0x0f, 0xae, 0x27]).unwrap(),
            Decoded {
                insn: Instruction::Xsave { area: rdi },
                len: 4
            }
        );
        let rsi_40 = MemOperand {
            base: Some(Base::Reg(6)),
            disp: 0x40,
            ..rdi
        };
        assert_eq!(
            decode(&[0x48, 0x0f, 0xae, 0x6e, 0x40]).unwrap(),
            Decoded {
                insn: Instruction::Xrstor { area: rsi_40 },
                len: 5
            }
        );
    }

    #[test]
    fn refuses_unknown_and_truncated_bytes() {
        assert_eq!(
            decode(&[0x0f, 0xae, 0x3f]).unwrap_err(),
            FallbackError::Unknown
        ); // clflush
        assert_eq!(
            decode(&[0x0f, 0xae, 0xe8]).unwrap_err(),
            FallbackError::Unknown
        ); // lfence (group 15 /5 with a register operand)
        assert_eq!(
            decode(&[0x0f, 0xb8, 0xc0]).unwrap_err(),
            FallbackError::Unknown
        ); // jmpe, no F3
        assert_eq!(
            decode(&[0xf3, 0x48, 0x0f, 0xb8]).unwrap_err(),
            FallbackError::Truncated
        );
        assert_eq!(decode(&[]).unwrap_err(), FallbackError::Truncated);
        assert_eq!(decode(&[0x66; 15]).unwrap_err(), FallbackError::Truncated);
        assert_eq!(
            decode(&[0x67, 0x9b]).unwrap_err(),
            FallbackError::AddressSize
        );
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // Every 1- and 2-byte sequence, plus 3-byte ones under the 0F escape.
        for a in 0..=255u8 {
            let _ = decode(&[a]);
            for b in 0..=255u8 {
                let _ = decode(&[a, b]);
                let _ = decode(&[0xf3, 0x0f, a, b]);
                let _ = decode(&[0xf3, 0x4f, 0x0f, 0xb8, a, b]);
            }
        }
    }

    #[test]
    fn popcnt_computes_result_and_flags() {
        let mut regs = kvm_regs {
            rip: 0x1000,
            rdi: 0xf0f0_0000_0000_0003,
            rax: 0xdead,
            rflags: 0x2 | 0x1,
            ..Default::default()
        };
        let d = decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).unwrap();
        assert_eq!(apply(&d, &mut regs, &no_memory()).unwrap(), Effect::Resume);
        assert_eq!((regs.rax, regs.rip, regs.rflags), (10, 0x1005, 0x2));

        // 32-bit form counts only the low half and zero-extends.
        let mut regs = kvm_regs {
            rdi: 0xffff_ffff_0000_0000,
            rax: u64::MAX,
            ..Default::default()
        };
        apply(
            &decode(&[0xf3, 0x0f, 0xb8, 0xc7]).unwrap(),
            &mut regs,
            &no_memory(),
        )
        .unwrap();
        assert_eq!(regs.rax, 0);
        assert_ne!(regs.rflags & RFLAGS_ZF, 0);

        // 16-bit form keeps the upper bits of the destination.
        let mut regs = kvm_regs {
            r9: 0x1_00ff,
            r10: 0xaaaa_0000_0000_ffff,
            ..Default::default()
        };
        apply(
            &decode(&[0x66, 0xf3, 0x45, 0x0f, 0xb8, 0xd1]).unwrap(),
            &mut regs,
            &no_memory(),
        )
        .unwrap();
        assert_eq!(regs.r10, 0xaaaa_0000_0000_0008);
    }

    #[test]
    fn popcnt_reads_memory_through_the_segment_base() {
        let guest = FakeGuest {
            gs_base: 0x10_0000,
            mem: vec![(0x10_0000 + 0x2000 + 9 + 0x1234, 0b1011)],
        };
        let mut regs = kvm_regs {
            rip: 0x2000,
            ..Default::default()
        };
        let d = decode(&[0x65, 0xf3, 0x0f, 0xb8, 0x05, 0x34, 0x12, 0, 0]).unwrap();
        apply(&d, &mut regs, &guest).unwrap();
        assert_eq!(regs.rax, 3);
        let mut regs = kvm_regs {
            rip: 0x3000,
            ..Default::default()
        };
        let err = apply(&d, &mut regs, &guest).unwrap_err();
        assert!(matches!(err, FallbackError::Memory { .. }));
        assert_eq!(regs.rip, 0x3000, "a failed fallback leaves RIP alone");
    }

    #[test]
    fn int3_and_smap_instructions() {
        let mut regs = kvm_regs {
            rip: 0x500,
            rflags: 2,
            ..Default::default()
        };
        assert_eq!(
            apply(&decode(&[0xcc]).unwrap(), &mut regs, &no_memory()).unwrap(),
            Effect::Inject(Exception::Breakpoint)
        );
        assert_eq!(regs.rip, 0x501);
        apply(
            &decode(&[0x0f, 0x01, 0xcb]).unwrap(),
            &mut regs,
            &no_memory(),
        )
        .unwrap();
        assert_ne!(regs.rflags & RFLAGS_AC, 0);
        apply(
            &decode(&[0x0f, 0x01, 0xca]).unwrap(),
            &mut regs,
            &no_memory(),
        )
        .unwrap();
        assert_eq!(regs.rflags & RFLAGS_AC, 0);
        assert_eq!(regs.rip, 0x507);
    }

    #[test]
    fn stats_count_per_instruction() {
        let stats = FallbackStats::default();
        stats.record(&Instruction::Fwait);
        stats.record(&Instruction::Fwait);
        stats.record(&Instruction::Int3);
        assert_eq!(
            stats.summary(),
            "fwait=2 int3=1 clac=0 stac=0 popcnt=0 xsave=0 xrstor=0"
        );
    }
}

//! The instruction model the fallback decodes into and performs, and its
//! errors; shared by `decoder`, `emulate` and `stats`.

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

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
    /// components XCR0 & EDX:EAX; see [`xsave`](crate::pvm::xsave).
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

//! Decoding the instruction bytes KVM hands over: legacy prefixes, REX,
//! the opcode and ModRM/SIB operands, bounds-checked throughout.

use super::insn::{
    Base, Decoded, FallbackError, Instruction, MemOperand, Operand, Segment, MAX_INSN_LEN,
};

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

use kvm_bindings::kvm_regs;

use super::emulate::{RFLAGS_AC, RFLAGS_ZF};
use super::*;
use crate::pvm::xsave;

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

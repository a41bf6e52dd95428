//! Per-instruction counts of what the fallback performed.

use std::sync::atomic::{AtomicU64, Ordering};

use super::insn::Instruction;

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

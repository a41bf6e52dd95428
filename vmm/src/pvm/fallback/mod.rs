//! Performing, in the VMM, the instructions a PVM host's in-kernel emulator
//! gives up on (`KVM_EXIT_INTERNAL_ERROR`, suberror "emulation").
//!
//! KVM hands over the instruction bytes; [`decode`] turns them into an
//! [`Instruction`] (or a clear refusal), [`apply`] performs it on the vCPU's
//! registers and RIP is advanced past it. The bytes come from the guest, so
//! decoding is bounds-checked and anything unknown is an error, never a
//! panic. The vCPU loop counts each kind in [`FallbackStats`].
//!
//! `insn` holds the instruction model and the errors; `decoder` reads the
//! bytes, `emulate` performs the result through the [`GuestAccess`] the vCPU
//! provides, `stats` keeps the counts. This file only declares them and
//! re-exports their items.

mod decoder;
mod emulate;
mod insn;
mod stats;
#[cfg(test)]
mod tests;

pub use decoder::decode;
pub use emulate::{apply, Effect, Exception, GuestAccess, PF_PRESENT, PF_WRITE};
pub use insn::{
    Base, Decoded, FallbackError, Instruction, MemOperand, Operand, Segment, MAX_INSN_LEN,
};
pub use stats::FallbackStats;

//! x86-64 boot: guest memory layout, the Linux 64-bit boot protocol
//! (boot_params + e820), the MP table, CPUID, MSRs and the initial vCPU state.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod msr;
pub mod regs;

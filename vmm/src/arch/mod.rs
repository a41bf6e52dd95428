//! Architecture-specific boot setup. podbox guests are x86-64 only.

pub mod x86_64;

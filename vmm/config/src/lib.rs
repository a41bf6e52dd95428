//! The contract between podbox-vmm and everything that starts it (the shim,
//! the test harness, the benchmarks): what a VM is made of, as types, with
//! the bounds podbox-vmm accepts, validated in one place.
//!
//! A [`VmConfig`] crosses the process boundary as podbox-vmm's command
//! line: [`VmConfig::to_args`] writes it, and podbox-vmm parses it with
//! [`VmArgs`] (clap, derived here from the same fields) back into a
//! [`VmConfig`]. The command line stays the interface (rather than a
//! serialised document on a pipe) because people run podbox-vmm by hand
//! and in tests with a few flags, and a `ps` listing shows what a pod's VM
//! got; the round-trip test below keeps writer and parser in step. No
//! other place in the tree writes a podbox-vmm flag.

mod args;
mod files;
mod net;
mod profile;
mod vm;

pub use args::VmArgs;
pub use files::{check_initrd, check_kernel, minimal_vmlinux};
pub use net::{MacAddr, NetBackend, NetConfig};
pub use profile::{ProfileConfig, DEFAULT_PROFILE_HZ, PROFILE_HZ};
pub use vm::*;

#[cfg(test)]
mod tests;

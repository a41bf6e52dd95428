//! podbox-vmm: a small KVM virtual machine monitor for podbox pods.
//!
//! It boots an uncompressed Linux vmlinux in 64-bit mode with an initramfs on
//! 1..N vCPUs, with a 16550 serial console and an i8042 for reset, on
//! hardware KVM and on nested PVM hosts (see [`pvm`]).

pub mod arch;
pub mod builder;
pub mod confine;
/// The VM's configuration: the contract crate, shared with every caller.
pub use podbox_vmm_config as config;
pub mod devices;
pub mod exit;
pub mod fatal;
pub mod jail;
pub mod logfile;
pub mod profiler;
pub mod pvm;
pub mod virtiofsd;
pub mod vstate;

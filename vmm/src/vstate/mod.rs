//! KVM state: guest memory, the VM (memory slots, in-kernel irqchip and PIT) and its vCPUs.

pub mod kvm_stats;
pub mod memory;
pub mod vcpu;
pub mod vm;

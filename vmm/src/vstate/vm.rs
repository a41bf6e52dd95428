//! The KVM VM: guest memory slots, the in-kernel interrupt controllers
//! (PIC, IOAPIC, LAPICs) and the in-kernel PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("creating the KVM VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("registering guest memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("setting the TSS address: {0}")]
    Tss(#[source] kvm_ioctls::Error),
    #[error("creating the in-kernel irqchip: {0}")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("creating the in-kernel PIT: {0}")]
    Pit(#[source] kvm_ioctls::Error),
}

pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    pub fn new(kvm: &Kvm, memory: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let region_desc = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region stays mapped for the life of the process
            // (the VMM exits when the VM does), and slots do not overlap.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::Tss)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        // The dummy speaker port keeps port 0x61 in the kernel too.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(Self { fd })
    }
}

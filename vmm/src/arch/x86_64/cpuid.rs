//! Per-vCPU CPUID, built from `KVM_GET_SUPPORTED_CPUID`.
//!
//! KVM reports what it can virtualise; the VMM adds what only it knows: the
//! vCPU's APIC id and the topology (N single-threaded cores in one package),
//! the hypervisor leaves, and the host-specific profile (PVM).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use crate::pvm::GuestProfile;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
pub const LEAF_HYPERVISOR: u32 = 0x4000_0000;
pub const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_CX16: u32 = 1 << 13;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Where this vCPU sits: `id` of `count` cores, one thread each.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    pub id: u8,
    pub count: u8,
}

/// Bits needed to number `count` cores (x2APIC id shift for the core level).
fn core_id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

fn topology_entries(leaf: u32, topo: VcpuTopology) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(topo.id);
    let level = |index: u32, shift: u32, logical: u32, level_type: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: logical,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    vec![
        level(0, 0, 1, TOPOLOGY_LEVEL_SMT),
        level(
            1,
            core_id_bits(topo.count),
            u32::from(topo.count),
            TOPOLOGY_LEVEL_CORE,
        ),
        // An invalid level ends the enumeration.
        level(2, 0, 0, 0),
    ]
}

/// The CPUID table for one vCPU.
pub fn build(
    supported: &[kvm_cpuid_entry2],
    topo: VcpuTopology,
    profile: &GuestProfile,
) -> Vec<kvm_cpuid_entry2> {
    let count = u32::from(topo.count);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 4);
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(topo.id) << 24) | (count << 16);
                if topo.count > 1 {
                    e.edx |= EDX_HTT;
                }
                e.ecx |= ECX_HYPERVISOR;
                if profile.is_pvm() {
                    // KVM lets the VMM clear CX16 here (cmpxchg16b fails in
                    // the emulator); POPCNT is also hidden on the command
                    // line because PVM shows the host's leaf 1 regardless.
                    // XSAVE is offered although KVM's table lacks it, so that
                    // KVM accepts the guest's CR4.OSXSAVE: the guest kernel
                    // must switch AVX state with XSAVE/XRSTOR, which the
                    // emulation fallback performs (pvm/xsave.rs).
                    e.ecx &= !(ECX_CX16 | ECX_POPCNT);
                    e.ecx |= ECX_XSAVE;
                }
            }
            LEAF_CACHE_PARAMS => {
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | (sharing << 14) | ((count - 1) << 26);
            }
            // No PMU: nothing in a pod needs one, and probing it costs boot time.
            LEAF_PERFMON => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue, // rebuilt below
            LEAF_HYPERVISOR => {
                let [ebx, ecx, edx] = kvm_signature();
                e.eax = LEAF_KVM_FEATURES;
                (e.ebx, e.ecx, e.edx) = (ebx, ecx, edx);
            }
            LEAF_KVM_FEATURES => e.eax = profile.kvm_features(e.eax),
            _ => {}
        }
        out.push(e);
    }
    let has_leaf = |leaf| supported.iter().any(|e| e.function == leaf);
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if has_leaf(leaf) {
            out.extend(topology_entries(leaf, topo));
        }
    }
    out
}

/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
fn kvm_signature() -> [u32; 3] {
    let sig = b"KVMKVMKVM\0\0\0";
    [0, 4, 8].map(|i| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pvm::HostKind;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        let mut l1 = leaf(1, 0);
        l1.ebx = 0x0008_0800; // CLFLUSH size 8, garbage APIC id 0
        l1.ecx = ECX_CX16 | ECX_POPCNT;
        let mut l4_l1 = leaf(4, 0);
        l4_l1.eax = 0x121; // level 1 data cache
        let mut l4_l3 = leaf(4, 3);
        l4_l3.eax = 0x163; // level 3 unified cache
        let mut kvm = leaf(LEAF_KVM_FEATURES, 0);
        kvm.eax = 0x01ff_ffff;
        vec![
            l1,
            l4_l1,
            l4_l3,
            leaf(0xa, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(LEAF_HYPERVISOR, 0),
            kvm,
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        let out = build(&supported(), VcpuTopology { id: 3, count: 4 }, &hw);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_CX16, 0, "hardware hosts keep CX16");
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        let out = build(&supported(), VcpuTopology { id: 0, count: 1 }, &hw);
        assert_eq!(find(&out, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_cores_of_one_thread() {
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        let out = build(&supported(), VcpuTopology { id: 2, count: 3 }, &hw);
        let smt = find(&out, 0xb, 0);
        let core = find(&out, 0xb, 1);
        let end = find(&out, 0xb, 2);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, TOPOLOGY_LEVEL_SMT, 2)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 3, TOPOLOGY_LEVEL_CORE, 2)
        );
        assert_eq!(end.ecx >> 8, 0);
        assert_eq!(
            out.iter().filter(|e| e.function == 0xb).count(),
            3,
            "old 0xb entries replaced"
        );
        assert!(
            !out.iter().any(|e| e.function == 0x1f),
            "no 0x1f when KVM has none"
        );
    }

    #[test]
    fn cache_leaf_reports_cores_per_package_and_l3_sharing() {
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        let out = build(&supported(), VcpuTopology { id: 0, count: 4 }, &hw);
        let l1d = find(&out, 4, 0);
        let l3 = find(&out, 4, 3);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3ff, 0x163);
    }

    #[test]
    fn hypervisor_leaves_and_pvm_profile() {
        let pvm = GuestProfile::new(HostKind::Pvm);
        let out = build(&supported(), VcpuTopology { id: 0, count: 2 }, &pvm);
        let sig = find(&out, LEAF_HYPERVISOR, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
        assert_eq!(sig.eax, LEAF_KVM_FEATURES);
        assert_eq!(find(&out, LEAF_KVM_FEATURES, 0).eax, 0x0100_000b);
        assert_eq!(find(&out, 1, 0).ecx & (ECX_CX16 | ECX_POPCNT), 0);
        assert_ne!(find(&out, 1, 0).ecx & ECX_XSAVE, 0, "PVM guests get XSAVE");
        let pmu = find(&out, 0xa, 0);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }
}

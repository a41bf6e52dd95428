//! Nested PVM hosts: recognising them and the guest profile they need.
//!
//! On a host whose `/dev/kvm` comes from PVM ("Pagetable-based Virtual
//! Machine") in native mode, guest kernel code runs in KVM's instruction
//! emulator. Three things follow, all applied by the VMM so the same guest
//! kernel boots on PVM and on hardware KVM:
//! - hypercalls (VMCALL) hang the vCPU, so CPUID leaf 0x40000001 advertises
//!   no paravirt feature that issues one;
//! - the emulator fails on some instructions, so the guest is told to avoid
//!   them on the command line and [`fallback`] performs the rest;
//! - a user-mode SYSCALL arrives half done; the guest kernel patch in
//!   `guest-kernel/patches/` completes it when `podbox.pvm_syscall` is set.
//!
//! On hardware-virtualisation hosts none of this is applied.

pub mod fallback;
pub mod xsave;

use std::path::Path;

/// Which kind of KVM the VMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    HardwareKvm,
    Pvm,
}

impl HostKind {
    /// PVM registers itself as the `kvm_pvm` module.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::HardwareKvm
        }
    }
}

/// KVM paravirt feature bits (CPUID 0x40000001 EAX) that need no hypercall:
/// kvmclock (both MSR sets), no-op port 0x80 delays, and the stable-clock bit.
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
const PVM_SAFE_KVM_FEATURES: u32 = KVM_FEATURE_CLOCKSOURCE
    | KVM_FEATURE_NOP_IO_DELAY
    | KVM_FEATURE_CLOCKSOURCE2
    | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;

/// Kernel command-line additions for PVM hosts:
/// - `clearcpuid=...`: CPUID leaf 1 shows the host's features whatever the
///   VMM sets, so tell the kernel not to use the ones the emulator cannot
///   execute (POPCNT in alternatives, SMAP's clac/stac, PCID, ...), and to
///   use plain XSAVE rather than XSAVEOPT/XSAVEC/XSAVES: the VMM performs
///   XSAVE/XRSTOR (standard form) itself, see [`xsave`]. AVX and AVX-512
///   stay visible on purpose: guest user code runs natively with the host's
///   XCR0 and uses those registers, so the guest kernel's XCR0 must name
///   them or it cannot switch them between processes. `erms,fsrm,fsrs` as
///   well: with them the kernel copies and clears memory with `rep
///   movsb`/`stosb`, one emulated iteration per byte; without, with
///   8-byte moves (`memcpy_orig`, `clear_page_rep`). Boot to the agent's
///   ready call took 8.3 s instead of 10.2 s (two runs each, side by
///   side) although KVM counted 5% more emulated instructions. FSRS
///   (fast short `rep stosb`, CPUID 7.1 EAX bit 11) is what memset keys
///   on; the guest profile showed 42 samples in `__memset`'s `rep stosb`
///   of a boot before it was cleared too;
/// - `podbox.pvm_syscall`: enables the guest patch completing SYSCALLs;
/// - `rcupdate.rcu_cpu_stall_suppress=1`: emulated kernel code is slow
///   enough to trip RCU's stall detector, whose reports (a register dump
///   and a backtrace each) only add console output to the boot.
const PVM_CMDLINE: &[&str] = &[
    "clearcpuid=popcnt,invpcid,pcid,fsgsbase,rdpid,smap,smep,umip,xsaveopt,xsavec,xsaves,erms,fsrm,fsrs",
    "podbox.pvm_syscall",
    "rcupdate.rcu_cpu_stall_suppress=1",
];

/// What the guest needs from this VMM on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestProfile {
    pub host: HostKind,
}

impl GuestProfile {
    pub fn new(host: HostKind) -> Self {
        Self { host }
    }

    pub fn is_pvm(&self) -> bool {
        self.host == HostKind::Pvm
    }

    /// Extra kernel parameters, appended after the user's command line.
    pub fn cmdline_additions(&self) -> &'static [&'static str] {
        if self.is_pvm() {
            PVM_CMDLINE
        } else {
            &[]
        }
    }

    /// The KVM paravirt features to advertise, given what KVM supports.
    pub fn kvm_features(&self, supported: u32) -> u32 {
        if self.is_pvm() {
            supported & PVM_SAFE_KVM_FEATURES
        } else {
            supported
        }
    }

    /// Whether to perform instructions KVM's emulator fails on.
    pub fn emulation_fallback(&self) -> bool {
        self.is_pvm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_by_its_module() {
        let dir = std::env::temp_dir().join(format!("podbox-pvm-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::HardwareKvm);
        std::fs::create_dir(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pvm_profile_hides_hypercall_features() {
        let all = u32::MAX;
        let pvm = GuestProfile::new(HostKind::Pvm);
        assert_eq!(pvm.kvm_features(all), PVM_SAFE_KVM_FEATURES);
        // PV send-IPI (bit 11), PV unhalt (7) and sched-yield (13) use VMCALL.
        for bit in [7, 11, 13] {
            assert_eq!(pvm.kvm_features(all) & (1 << bit), 0);
        }
        assert!(pvm.cmdline_additions().contains(&"podbox.pvm_syscall"));
    }

    #[test]
    fn hardware_profile_changes_nothing() {
        let hw = GuestProfile::new(HostKind::HardwareKvm);
        assert_eq!(hw.kvm_features(0x0123_4567), 0x0123_4567);
        assert!(hw.cmdline_additions().is_empty());
        assert!(!hw.emulation_fallback());
    }
}

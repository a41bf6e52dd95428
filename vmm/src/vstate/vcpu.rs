//! One vCPU: its boot configuration and the thread that runs it.

use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::{IoBus, MmioBus};
use crate::exit::{ExitLatch, VmExit};
use crate::profiler::sample::{CpuState, RunState, SampleSource};
use crate::profiler::{kick, Profiler};
use crate::pvm::fallback::{
    self, Effect, Exception, FallbackError, FallbackStats, GuestAccess, Segment, MAX_INSN_LEN,
    PF_PRESENT, PF_WRITE,
};
use crate::pvm::{xsave, GuestProfile};
use crate::vstate::kvm_stats::{KvmStats, StatsError};

/// KVM_INTERNAL_ERROR_EMULATION and its "instruction bytes present" flag.
const INTERNAL_ERROR_EMULATION: u32 = 1;
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
/// LAPIC local vector table entries for LINT0/LINT1, and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
const BP_VECTOR: u8 = 3;
const GP_VECTOR: u8 = 13;
const PF_VECTOR: u8 = 14;
/// Where the kernel's GS base waits while the vCPU is in user mode.
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("vCPU {id}: {what}: {source}")]
    Configure {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: CPUID table: {detail}")]
    Cpuid { id: u8, detail: String },
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub bus: IoBus,
    pub mmio: MmioBus,
    pub exit: Arc<ExitLatch>,
    pub memory: GuestMemoryMmap,
    pub profile: GuestProfile,
    pub fallback_stats: FallbackStats,
    /// Where XSAVE components sit (CPUID leaf 0xD), for the fallback.
    pub xsave_layout: xsave::Layout,
    /// When the VMM started, for the "first KVM_RUN" log line.
    pub started: Instant,
    /// `--guest-profile`: sample this vCPU when the profiler kicks it.
    pub profiler: Option<Arc<Profiler>>,
}

pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self { fd, id })
    }

    /// CPUID, MSRs, LAPIC wiring; the boot vCPU also gets the entry state.
    /// The others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
    pub fn configure(
        &self,
        supported_cpuid: &[kvm_cpuid_entry2],
        count: u8,
        profile: &GuestProfile,
        boot_entry: Option<u64>,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let fail = |what| move |source| VcpuError::Configure { id, what, source };
        let entries = cpuid::build(supported_cpuid, cpuid::VcpuTopology { id, count }, profile);
        let table = CpuId::from_entries(&entries).map_err(|e| VcpuError::Cpuid {
            id,
            detail: format!("{e:?}"),
        })?;
        self.fd.set_cpuid2(&table).map_err(fail("KVM_SET_CPUID2"))?;
        self.fd
            .set_msrs(&msr::boot_msrs())
            .map_err(fail("KVM_SET_MSRS"))?;
        self.set_lint().map_err(fail("LAPIC LINT0/LINT1"))?;
        if let Some(entry) = boot_entry {
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(fail("KVM_SET_REGS"))?;
            let sregs = self.fd.get_sregs().map_err(fail("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&regs::boot_sregs(sregs))
                .map_err(fail("KVM_SET_SREGS"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(fail("KVM_SET_FPU"))?;
        }
        Ok(())
    }

    /// This vCPU's KVM statistics (read by the main thread at the end).
    pub fn stats(&self) -> Result<KvmStats, StatsError> {
        KvmStats::open(&self.fd)
    }

    /// LINT0 takes the PIC's ExtINT, LINT1 the NMI, as the MP table says.
    fn set_lint(&self) -> Result<(), kvm_ioctls::Error> {
        let mut lapic = self.fd.get_lapic()?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: &mut [u8] =
                // SAFETY: c_char and u8 have the same size and alignment.
                unsafe { std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast(), lapic.regs.len()) };
            let mut reg =
                u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
            reg = (reg & !0x700) | (mode << 8);
            bytes[offset..offset + 4].copy_from_slice(&reg.to_le_bytes());
        }
        self.fd.set_lapic(&lapic)
    }

    /// Runs the vCPU until the VM exits; the first reason goes to the latch.
    pub fn run(mut self, shared: Arc<VcpuShared>) {
        let id = self.id;
        let mut first_run = id == 0;
        let profiler = shared.profiler.clone();
        if let Some(p) = &profiler {
            p.slot(id).kick.register(self.fd.get_kvm_run());
        }
        while !shared.exit.is_set() {
            if first_run {
                tracing::info!(
                    "vcpu0: first KVM_RUN at {:.3} ms after VMM start",
                    shared.started.elapsed().as_secs_f64() * 1e3
                );
                first_run = false;
            }
            let outcome = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    shared.bus.read(port, data);
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    shared.bus.write(port, data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    shared.mmio.read(addr, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    shared.mmio.write(addr, data);
                    None
                }
                Ok(VcpuExit::Hlt) => None,
                Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault { vcpu: id }),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    tracing::info!(
                        "vcpu{id}: system event {kind} ({})",
                        if kind == KVM_SYSTEM_EVENT_RESET {
                            "reset"
                        } else {
                            "shutdown"
                        }
                    );
                    Some(VmExit::GuestReset)
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Kvm {
                    vcpu: id,
                    detail: format!(
                        "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                    ),
                }),
                Ok(VcpuExit::InternalError) => self.handle_internal_error(&shared),
                Ok(other) => Some(VmExit::Kvm {
                    vcpu: id,
                    detail: format!("unexpected exit {other:?}"),
                }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(VmExit::Kvm {
                    vcpu: id,
                    detail: format!("KVM_RUN: {e}"),
                }),
            };
            if let Some(exit) = outcome {
                shared.exit.trigger(exit);
            }
            if let Some(p) = &profiler {
                if kick::take_kick() {
                    p.record(
                        id,
                        &VcpuGuest {
                            vcpu: &self,
                            shared: &shared,
                        },
                    );
                }
            }
        }
        if let Some(p) = &profiler {
            p.slot(id).kick.unregister();
        }
    }

    /// An emulation failure on a PVM host: perform the instruction here and
    /// resume, or end the VM naming the instruction bytes.
    fn handle_internal_error(&mut self, shared: &VcpuShared) -> Option<VmExit> {
        let id = self.id;
        // SAFETY: KVM filled the `internal` union member for this exit.
        let (suberror, ndata, data) = unsafe {
            let internal = &self.fd.get_kvm_run().__bindgen_anon_1.internal;
            (internal.suberror, internal.ndata, internal.data)
        };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        if suberror != INTERNAL_ERROR_EMULATION || !shared.profile.emulation_fallback() {
            return Some(VmExit::Kvm {
                vcpu: id,
                detail: format!(
                    "internal error, suberror {suberror}, data {:x?} at rip {rip:#x}",
                    &data[..(ndata as usize).min(data.len())]
                ),
            });
        }
        let bytes = match instruction_bytes(ndata, &data) {
            Some(bytes) => bytes,
            None => match self.read_guest_virt(shared, rip, MAX_INSN_LEN) {
                Ok(bytes) => bytes,
                Err(e) => {
                    return Some(VmExit::UnhandledInstruction {
                        vcpu: id,
                        rip,
                        bytes: vec![],
                        detail: e.to_string(),
                    })
                }
            },
        };
        match self.perform(shared, &bytes) {
            Ok(()) => None,
            Err(e) => Some(VmExit::UnhandledInstruction {
                vcpu: id,
                rip,
                bytes,
                detail: e.to_string(),
            }),
        }
    }

    fn perform(&mut self, shared: &VcpuShared, bytes: &[u8]) -> Result<(), FallbackError> {
        let decoded = fallback::decode(bytes)?;
        let mut regs = self
            .fd
            .get_regs()
            .map_err(|e| kvm_failure("KVM_GET_REGS", e))?;
        let effect = fallback::apply(&decoded, &mut regs, &VcpuGuest { vcpu: self, shared })?;
        self.fd
            .set_regs(&regs)
            .map_err(|e| kvm_failure("KVM_SET_REGS", e))?;
        if let Effect::Inject(exception) = effect {
            self.inject(exception)
                .map_err(|e| kvm_failure("injecting an exception", e))?;
        }
        shared.fallback_stats.record(&decoded.insn);
        Ok(())
    }

    /// Makes `exception` the next thing the guest sees.
    fn inject(&self, exception: Exception) -> Result<(), kvm_ioctls::Error> {
        let (nr, error_code) = match exception {
            Exception::Breakpoint => (BP_VECTOR, None),
            Exception::GeneralProtection => (GP_VECTOR, Some(0)),
            Exception::PageFault {
                address,
                error_code,
            } => {
                let mut sregs = self.fd.get_sregs()?;
                sregs.cr2 = address;
                self.fd.set_sregs(&sregs)?;
                (PF_VECTOR, Some(error_code))
            }
        };
        let mut events = self.fd.get_vcpu_events()?;
        events.exception.injected = 1;
        events.exception.nr = nr;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        self.fd.set_vcpu_events(&events)
    }

    /// Guest-physical pieces of `len` bytes at guest-virtual `gva`, or the
    /// page fault a supervisor access (a write when `write`) would raise.
    fn translate_range(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<Result<Vec<(u64, usize)>, Exception>, FallbackError> {
        translate_range(gva, len, write, |addr| {
            let t = self
                .fd
                .translate_gva(addr)
                .map_err(|e| FallbackError::Memory {
                    gva: addr,
                    reason: format!("KVM_TRANSLATE: {e}"),
                })?;
            Ok(Translation {
                valid: t.valid != 0,
                writeable: t.writeable != 0,
                physical_address: t.physical_address,
            })
        })
    }

    /// Reads `len` bytes at guest-virtual `gva` as the guest kernel would
    /// (checked writable when `write`): the bytes, or the page fault.
    fn read_guest(
        &self,
        shared: &VcpuShared,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<Result<Vec<u8>, Exception>, FallbackError> {
        match self.translate_range(gva, len, write)? {
            Ok(pieces) => read_pieces(&shared.memory, &pieces, gva).map(Ok),
            Err(fault) => Ok(Err(fault)),
        }
    }

    /// Reads `len` bytes at guest-virtual `gva`; unmapped is an error.
    fn read_guest_virt(
        &self,
        shared: &VcpuShared,
        gva: u64,
        len: usize,
    ) -> Result<Vec<u8>, FallbackError> {
        self.read_guest(shared, gva, len, false)?
            .map_err(|fault| FallbackError::Memory {
                gva: match fault {
                    Exception::PageFault { address, .. } => address,
                    _ => gva,
                },
                reason: "not mapped".into(),
            })
    }
}

/// What KVM_TRANSLATE says of one guest-virtual address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub valid: bool,
    pub writeable: bool,
    pub physical_address: u64,
}

/// The fallback's walk over a memory operand: splits `len` bytes at `gva`
/// into page-sized guest-physical pieces through `translate` (KVM_TRANSLATE
/// on a vCPU), or gives the page fault a supervisor access (a write when
/// `write`) would raise. `gva` and `len` come from the guest's registers
/// and instruction; public for the fuzz targets (`fuzz/`).
pub fn translate_range(
    gva: u64,
    len: usize,
    write: bool,
    mut translate: impl FnMut(u64) -> Result<Translation, FallbackError>,
) -> Result<Result<Vec<(u64, usize)>, Exception>, FallbackError> {
    let mut pieces = Vec::new();
    let mut done = 0;
    while done < len {
        let addr = gva.wrapping_add(done as u64);
        let t = translate(addr)?;
        let write_bit = if write { PF_WRITE } else { 0 };
        if !t.valid {
            return Ok(Err(Exception::PageFault {
                address: addr,
                error_code: write_bit,
            }));
        }
        if write && !t.writeable {
            return Ok(Err(Exception::PageFault {
                address: addr,
                error_code: PF_PRESENT | PF_WRITE,
            }));
        }
        let chunk = (len - done).min(4096 - (addr as usize & 0xfff));
        pieces.push((t.physical_address, chunk));
        done += chunk;
    }
    Ok(Ok(pieces))
}

/// Reads the guest-physical `pieces` of the operand at `gva` (named in
/// errors) back to back.
pub fn read_pieces(
    memory: &GuestMemoryMmap,
    pieces: &[(u64, usize)],
    gva: u64,
) -> Result<Vec<u8>, FallbackError> {
    let mut out = Vec::with_capacity(pieces.iter().map(|&(_, n)| n).sum());
    for &(gpa, n) in pieces {
        let start = out.len();
        out.resize(start + n, 0);
        memory
            .read_slice(&mut out[start..], GuestAddress(gpa))
            .map_err(|e| FallbackError::Memory {
                gva,
                reason: e.to_string(),
            })?;
    }
    Ok(out)
}

/// Writes `data` over the guest-physical `pieces` of the operand at `gva`
/// (which [`translate_range`] made for `data.len()` bytes).
pub fn write_pieces(
    memory: &GuestMemoryMmap,
    pieces: &[(u64, usize)],
    gva: u64,
    data: &[u8],
) -> Result<(), FallbackError> {
    let mut done = 0;
    for &(gpa, n) in pieces {
        let chunk = data
            .get(done..done + n)
            .ok_or_else(|| FallbackError::Memory {
                gva,
                reason: format!("{} bytes do not cover the pieces", data.len()),
            })?;
        memory
            .write_slice(chunk, GuestAddress(gpa))
            .map_err(|e| FallbackError::Memory {
                gva,
                reason: e.to_string(),
            })?;
        done += n;
    }
    Ok(())
}

/// The instruction bytes KVM attached to an emulation failure, if any:
/// `data[0]` is the flags word, then one length byte and the bytes.
pub fn instruction_bytes(ndata: u32, data: &[u64; 16]) -> Option<Vec<u8>> {
    if ndata < 2 || data[0] & EMULATION_FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(raw[0]).min(MAX_INSN_LEN);
    if len == 0 {
        return None;
    }
    Some(raw[1..1 + len].to_vec())
}

struct VcpuGuest<'a> {
    vcpu: &'a Vcpu,
    shared: &'a VcpuShared,
}

impl GuestAccess for VcpuGuest<'_> {
    fn segment_base(&self, seg: Segment) -> u64 {
        match self.vcpu.fd.get_sregs() {
            Ok(s) => match seg {
                Segment::Fs => s.fs.base,
                Segment::Gs => s.gs.base,
            },
            Err(_) => 0,
        }
    }

    fn read_virt(&self, gva: u64, size: u8) -> Result<u64, FallbackError> {
        let bytes = self
            .vcpu
            .read_guest_virt(self.shared, gva, usize::from(size))?;
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(&bytes);
        Ok(u64::from_le_bytes(word))
    }

    fn read_bytes(
        &self,
        gva: u64,
        len: usize,
        write: bool,
    ) -> Result<Result<Vec<u8>, Exception>, FallbackError> {
        self.vcpu.read_guest(self.shared, gva, len, write)
    }

    fn write_bytes(&self, gva: u64, data: &[u8]) -> Result<(), FallbackError> {
        match self.vcpu.translate_range(gva, data.len(), true)? {
            Ok(pieces) => write_pieces(&self.shared.memory, &pieces, gva, data),
            Err(_) => Err(FallbackError::Memory {
                gva,
                reason: "became unwritable between check and write".into(),
            }),
        }
    }

    fn xcr0(&self) -> Result<u64, FallbackError> {
        let xcrs = self
            .vcpu
            .fd
            .get_xcrs()
            .map_err(|e| kvm_failure("KVM_GET_XCRS", e))?;
        Ok(xcrs.xcrs[..xcrs.nr_xcrs.min(16) as usize]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value))
    }

    fn xsave_area(&self) -> Result<Vec<u8>, FallbackError> {
        let x = self
            .vcpu
            .fd
            .get_xsave()
            .map_err(|e| kvm_failure("KVM_GET_XSAVE", e))?;
        Ok(x.region.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    fn set_xsave_area(&self, area: &[u8]) -> Result<(), FallbackError> {
        let mut x = kvm_xsave::default();
        for (word, bytes) in x.region.iter_mut().zip(area.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        // SAFETY: `x` is a whole kvm_xsave, its 4 KiB region filled from
        // `area` (the 4 KiB KVM_GET_XSAVE gave). KVM reads more than 4 KiB
        // only once the VMM has asked for dynamically enabled state (AMX)
        // with ARCH_REQ_XCOMP_GUEST_PERM, which podbox never does.
        unsafe { self.vcpu.fd.set_xsave(&x) }.map_err(|e| kvm_failure("KVM_SET_XSAVE", e))
    }

    fn xsave_layout(&self) -> &xsave::Layout {
        &self.shared.xsave_layout
    }
}

/// What a profiler sample reads of a kicked vCPU.
impl SampleSource for VcpuGuest<'_> {
    fn state(&self) -> Option<CpuState> {
        let regs = self.vcpu.fd.get_regs().ok()?;
        let sregs = self.vcpu.fd.get_sregs().ok()?;
        Some(CpuState {
            rip: regs.rip,
            rbp: regs.rbp,
            cpl: (sregs.cs.selector & 3) as u8,
            gs_base: sregs.gs.base,
        })
    }

    fn run_state(&self) -> RunState {
        match self.vcpu.fd.get_mp_state().map(|s| s.mp_state) {
            Ok(KVM_MP_STATE_HALTED) => RunState::Halted,
            Ok(
                KVM_MP_STATE_UNINITIALIZED
                | KVM_MP_STATE_INIT_RECEIVED
                | KVM_MP_STATE_SIPI_RECEIVED,
            ) => RunState::NotStarted,
            _ => RunState::Running,
        }
    }

    fn kernel_gs_base(&self) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            ..Default::default()
        }])
        .ok()?;
        match self.vcpu.fd.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn read_virt(&self, gva: u64, len: usize) -> Option<Vec<u8>> {
        self.vcpu.read_guest_virt(self.shared, gva, len).ok()
    }
}

fn kvm_failure(what: &'static str, e: kvm_ioctls::Error) -> FallbackError {
    FallbackError::Kvm {
        what,
        reason: e.to_string(),
    }
}

/// `KVM_GET_SUPPORTED_CPUID` as a plain list.
pub fn supported_cpuid(kvm: &kvm_ioctls::Kvm) -> Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
    Ok(kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?
        .as_slice()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_bytes_follow_the_flags_word() {
        let mut data = [0u64; 16];
        data[0] = EMULATION_FLAG_INSTRUCTION_BYTES;
        // length 3, bytes f3 0f b8 (then 0x90 padding)
        data[1] = u64::from_le_bytes([3, 0xf3, 0x0f, 0xb8, 0x90, 0x90, 0x90, 0x90]);
        assert_eq!(instruction_bytes(3, &data), Some(vec![0xf3, 0x0f, 0xb8]));
        data[1] = u64::from_le_bytes([0xff, 1, 2, 3, 4, 5, 6, 7]);
        data[2] = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(
            instruction_bytes(3, &data).unwrap().len(),
            MAX_INSN_LEN,
            "guest-sized length is clamped"
        );
        assert_eq!(instruction_bytes(1, &data), None);
        data[0] = 0;
        assert_eq!(instruction_bytes(3, &data), None);
    }
}

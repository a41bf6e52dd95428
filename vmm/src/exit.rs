//! Why a VM stopped, and the one place that records it.
//!
//! Devices and vCPU threads report the first reason through an [`ExitLatch`];
//! the main thread waits on it, then maps it to the process exit status: 0
//! for a guest-requested reset (`reboot -f` with `reboot=k`), non-zero with
//! a one-line reason for everything else.

use std::sync::{Condvar, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine through the i8042 controller.
    GuestReset,
    /// The guest kernel panicked; the panic line from the console.
    GuestPanic(String),
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// KVM failed to enter the guest or reported an internal error.
    Kvm { vcpu: u8, detail: String },
    /// The guest ran an instruction neither KVM nor the fallback can perform.
    UnhandledInstruction {
        vcpu: u8,
        rip: u64,
        bytes: Vec<u8>,
        detail: String,
    },
    /// The VMM was asked to stop (SIGTERM, SIGINT, SIGHUP).
    Signal(i32),
    /// A device's out-of-process backend (virtiofsd) died under the guest.
    BackendDied {
        device: &'static str,
        detail: String,
    },
}

impl VmExit {
    pub fn exit_code(&self) -> u8 {
        match self {
            VmExit::GuestReset => 0,
            VmExit::GuestPanic(_) => 2,
            VmExit::TripleFault { .. } => 3,
            VmExit::Kvm { .. } => 4,
            VmExit::UnhandledInstruction { .. } => 5,
            VmExit::BackendDied { .. } => 6,
            // The shell convention for "killed by signal N".
            VmExit::Signal(n) => 128u8.wrapping_add(*n as u8),
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "guest reset the VM"),
            VmExit::GuestPanic(line) => write!(f, "guest kernel panic: {line}"),
            VmExit::TripleFault { vcpu } => write!(f, "vCPU {vcpu}: triple fault (guest shutdown)"),
            VmExit::Kvm { vcpu, detail } => write!(f, "vCPU {vcpu}: KVM error: {detail}"),
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
            VmExit::BackendDied { device, detail } => write!(f, "{device} backend died: {detail}"),
            VmExit::UnhandledInstruction {
                vcpu,
                rip,
                bytes,
                detail,
            } => {
                let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                write!(
                    f,
                    "vCPU {vcpu}: cannot emulate instruction at {rip:#x} [{}]: {detail}",
                    hex.join(" ")
                )
            }
        }
    }
}

/// Holds the first exit reason reported; later ones are ignored.
#[derive(Default)]
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    set: Condvar,
}

impl ExitLatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `exit` unless a reason is already recorded.
    pub fn trigger(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
            self.set.notify_all();
        }
    }

    pub fn is_set(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Blocks until a reason is recorded and returns it.
    pub fn wait(&self) -> VmExit {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(exit) = reason.as_ref() {
                return exit.clone();
            }
            reason = self.set.wait(reason).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins() {
        let latch = Arc::new(ExitLatch::new());
        let l2 = latch.clone();
        let waiter = std::thread::spawn(move || l2.wait());
        latch.trigger(VmExit::GuestPanic("Kernel panic - not syncing: x".into()));
        latch.trigger(VmExit::GuestReset);
        assert_eq!(
            waiter.join().unwrap(),
            VmExit::GuestPanic("Kernel panic - not syncing: x".into())
        );
    }

    #[test]
    fn only_a_guest_reset_is_success() {
        assert_eq!(VmExit::GuestReset.exit_code(), 0);
        assert_ne!(VmExit::GuestPanic(String::new()).exit_code(), 0);
        assert_ne!(VmExit::TripleFault { vcpu: 0 }.exit_code(), 0);
        let e = VmExit::UnhandledInstruction {
            vcpu: 1,
            rip: 0x10,
            bytes: vec![0x0f, 0xae],
            detail: "x".into(),
        };
        assert!(e.to_string().contains("[0f ae]"));
    }
}

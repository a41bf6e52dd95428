//! containerd-shim-podbox-v2.
//!
//! The containerd shim v2 task API is not implemented yet (tracked as the
//! shim issue). Until then the binary refuses every invocation with a clear
//! message instead of pretending to start a task.

fn main() -> std::process::ExitCode {
    eprintln!("containerd-shim-podbox-v2: the shim task API is not implemented yet");
    std::process::ExitCode::from(2)
}

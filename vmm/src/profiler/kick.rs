//! Kicking a vCPU thread out of `KVM_RUN` to take a sample.
//!
//! The sampler sends [`kick_signal`] to a vCPU thread. Inside `KVM_RUN` the
//! signal makes the ioctl return EINTR; outside it (the thread is handling
//! an I/O exit) the handler sets `kvm_run.immediate_exit`, so the next
//! `KVM_RUN` returns EINTR at once instead of running on until some later
//! exit. Either way the vCPU loop takes the sample at the next return.

use std::cell::Cell;
use std::sync::Mutex;

use kvm_bindings::kvm_run;

thread_local! {
    /// This thread's `kvm_run` (its vCPU's shared page), for the handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal the sampler kicks vCPUs with.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an async-signal-safe store: a const-initialised thread local is
    // a plain TLS slot, and the page is this thread's own vCPU's.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: set by `register` on this thread to its VcpuFd's mapped
        // kvm_run, which lives as long as the thread runs the vCPU.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the handler (once per process, before the first kick).
pub fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask;
    // without SA_RESTART so a blocking call the signal interrupts returns.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_kick as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A vCPU thread the sampler may signal: set while the thread runs its
/// vCPU, cleared before it ends (a pthread_t of an ended detached thread
/// must never be signalled).
#[derive(Default)]
pub struct KickTarget {
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KickTarget {
    /// Called on the vCPU thread with its vCPU's `kvm_run`.
    pub fn register(&self, run: *mut kvm_run) {
        KVM_RUN.with(|c| c.set(run));
        // SAFETY: pthread_self has no preconditions.
        *self.lock() = Some(unsafe { libc::pthread_self() });
    }

    /// Called on the vCPU thread before it stops running the vCPU.
    pub fn unregister(&self) {
        *self.lock() = None;
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Signals the thread if it is registered; false if not.
    pub fn kick(&self) -> bool {
        let thread = self.lock();
        match *thread {
            // SAFETY: the thread is alive: it unregisters (under this
            // lock) before it ends.
            Some(t) => unsafe { libc::pthread_kill(t, kick_signal()) == 0 },
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<libc::pthread_t>> {
        self.thread.lock().unwrap_or_else(|p| p.into_inner())
    }
}

//! Kicking a vCPU thread out of `KVM_RUN` to take a sample.
//!
//! The sampler sends [`kick_signal`] to a vCPU thread. Inside `KVM_RUN` the
//! signal makes the ioctl return EINTR; outside it (the thread is handling
//! an I/O exit) the handler sets `kvm_run.immediate_exit`, so the next
//! `KVM_RUN` returns EINTR at once instead of running on until some later
//! exit. Either way the vCPU loop takes the sample at the next return.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_run;

thread_local! {
    /// This thread's `kvm_run` (its vCPU's shared page), for the handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal the sampler kicks vCPUs with: a standard one, which the
/// kernel keeps pending at most once per thread. A real-time signal would
/// queue one entry per kick while the thread cannot take them (the process
/// stopped, a long host-side exit), counted against RLIMIT_SIGPENDING,
/// which every process of the user (root, for all pods' VMMs) shares.
pub fn kick_signal() -> libc::c_int {
    libc::SIGUSR2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an async-signal-safe store: a const-initialised thread local is
    // a plain TLS slot, and the page is this thread's own vCPU's.
    with_immediate_exit(|flag| flag.store(1, Ordering::Relaxed));
}

/// Runs `f` on this thread's registered `kvm_run.immediate_exit` as an
/// atomic; None when nothing is registered. The handler and the vCPU loop
/// on the same thread reach the flag only through the raw pointer
/// `register` stored, never through a `&mut kvm_run` that a signal could
/// write under; the borrow ends with `f`, so it cannot outlive the page.
fn with_immediate_exit<R>(f: impl FnOnce(&AtomicU8) -> R) -> Option<R> {
    let run = KVM_RUN.with(Cell::get);
    if run.is_null() {
        return None;
    }
    // SAFETY: set by `register` on this thread to its vCPU's mapped
    // kvm_run, which stays mapped while the thread runs the vCPU (it
    // unregisters first); a u8 field is always aligned for AtomicU8.
    let flag = unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*run).immediate_exit)) };
    Some(f(flag))
}

/// Whether this thread's vCPU was kicked since the last look; clears the
/// flag in the same step (a kick between a read and a clear would be
/// lost), or every later KVM_RUN would return at once.
pub fn take_kick() -> bool {
    with_immediate_exit(|flag| flag.swap(0, Ordering::Relaxed) != 0).unwrap_or(false)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The real signal through the installed handler sets the registered
    /// page's flag; `take_kick` reports it once and clears it.
    #[test]
    fn a_kick_sets_immediate_exit_once() {
        install_handler().unwrap();
        // SAFETY: kvm_run is plain old data; all zeroes is a valid value.
        let mut run: Box<kvm_run> = Box::new(unsafe { std::mem::zeroed() });
        let target = KickTarget::default();
        assert!(!target.kick(), "an unregistered target is not signalled");
        target.register(&mut *run);
        assert!(!take_kick(), "no kick yet");
        // The signal is sent to this thread and handled before
        // pthread_kill returns.
        assert!(target.kick());
        assert!(take_kick(), "the handler set immediate_exit");
        assert!(!take_kick(), "take_kick cleared it");
        target.unregister();
        assert!(!target.kick());
        assert!(!take_kick(), "nothing registered after unregister");
        assert_eq!(run.immediate_exit, 0);
    }

    /// Signals queued for this process's user (`SigQ` in /proc/self/status).
    fn queued_signals() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("SigQ:"))
            .unwrap();
        line.trim().split('/').next().unwrap().parse().unwrap()
    }

    /// Kicks a thread cannot take (the signal blocked, as for a stopped
    /// VMM) stay one pending signal, not one queued entry each.
    #[test]
    fn kicks_a_thread_cannot_take_do_not_queue_up() {
        install_handler().unwrap();
        std::thread::spawn(|| {
            // SAFETY: kvm_run is plain old data; all zeroes is a valid value.
            let mut run: Box<kvm_run> = Box::new(unsafe { std::mem::zeroed() });
            // SAFETY: sigset operations on a local set; pthread_sigmask of
            // this thread only.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            unsafe {
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, kick_signal());
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let target = KickTarget::default();
            target.register(&mut *run);
            let before = queued_signals();
            for _ in 0..500 {
                assert!(target.kick());
            }
            let grown = queued_signals().saturating_sub(before);
            // Other processes of the user may queue a few meanwhile.
            assert!(grown < 50, "{grown} signals queued for 500 kicks");
            // SAFETY: as above; the one pending kick is handled now.
            unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
            assert!(take_kick(), "the pending kick arrives once unblocked");
            target.unregister();
        })
        .join()
        .unwrap();
    }
}

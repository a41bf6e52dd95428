//! Test helpers for crates whose tests need a network namespace of their own
//! (the `test-util` feature; enable it in [dev-dependencies] only).

/// Runs `f` on a new thread that has entered a new, empty network namespace
/// (loopback only, down) and returns what it returns. Needs CAP_SYS_ADMIN
/// (root); panics where unshare(2) fails, and with `f`'s panic.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) only affects this new thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

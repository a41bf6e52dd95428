//! A panic anywhere ends the VMM process.
//!
//! The VMM is a set of threads (vCPUs, device event loops, the signal and
//! virtiofsd supervisors), each owning part of the VM. By default a panic
//! unwinds and ends only its own thread while the others carry on: vCPUs
//! whose device is gone, a guest waiting on a queue nobody serves, a VMM
//! that never exits. [`exit_on_panic`] makes any panic fatal to the whole
//! process, with one line on stderr saying where and why.
//!
//! It is process-wide: meant for the `podbox-vmm` binary, not for library
//! users with panics of their own to handle.

use std::any::Any;
use std::panic::Location;
use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status after a panic: EX_SOFTWARE from sysexits.h ("internal
/// software error"), distinct from the VM exit statuses (0-6, 128+N).
pub const PANIC_EXIT_STATUS: i32 = 70;

/// The longest panic message quoted; the rest is cut.
const MAX_MESSAGE: usize = 1000;

/// Set by the first panicking thread: only it reports and exits.
static FIRED: AtomicBool = AtomicBool::new(false);

/// Replaces the panic hook: the first panic in any thread writes
/// `podbox-vmm: fatal: thread '<name>' panicked at <file:line:col>: <message>`
/// to stderr and ends the process with [`PANIC_EXIT_STATUS`].
///
/// It ends it with `_exit(2)`, not `std::process::exit`: the other threads
/// are still running (a vCPU inside KVM_RUN, a device thread holding a
/// lock), and `exit(3)` would run atexit handlers and flush stdio under
/// them, can deadlock on a lock a stopped-mid-way thread holds, and is not
/// safe against a second thread exiting at the same time. `_exit` ends
/// every thread at once and runs nothing. Destructors do not run either
/// way, so what must not outlive the VMM has to go by itself: a spawned
/// virtiofsd is tied to it with PR_SET_PDEATHSIG (see
/// [`crate::virtiofsd::Virtiofsd::start`]), and the kernel closes every fd.
pub fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        if FIRED.swap(true, Ordering::SeqCst) {
            // Another thread is already reporting and about to _exit.
            loop {
                std::thread::park();
            }
        }
        let thread = std::thread::current();
        let line = fatal_line(thread.name(), info.location(), info.payload());
        write_stderr(line.as_bytes());
        // SAFETY: _exit(2) takes no pointers and never returns.
        unsafe { libc::_exit(PANIC_EXIT_STATUS) }
    }));
}

/// The one-line report, newline included.
fn fatal_line(thread: Option<&str>, location: Option<&Location<'_>>, payload: &dyn Any) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-string panic payload)");
    let location = location.map_or_else(|| "an unknown location".to_string(), |l| l.to_string());
    format!(
        "podbox-vmm: fatal: thread '{}' panicked at {location}: {}\n",
        one_line(thread.unwrap_or("<unnamed>")),
        one_line(message)
    )
}

/// `text` with control characters (newlines included) escaped, so that the
/// report stays one line, and cut to [`MAX_MESSAGE`] characters.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_MESSAGE {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes to fd 2 directly: std's stderr lock may be held by the thread
/// that is stuck, and nothing here may wait for another thread.
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live byte slice.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        match n {
            n if n > 0 => bytes = &bytes[n as usize..],
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_one_line_with_thread_location_and_message() {
        let here = Location::caller();
        let line = fatal_line(Some("vcpu0"), Some(here), &"queue index 7 out of range");
        assert_eq!(
            line,
            format!(
                "podbox-vmm: fatal: thread 'vcpu0' panicked at {}:{}:{}: queue index 7 out of range\n",
                here.file(),
                here.line(),
                here.column()
            )
        );
        let owned = String::from("bad\ndescriptor\x1b[2J");
        let line = fatal_line(None, None, &owned);
        assert_eq!(
            line,
            "podbox-vmm: fatal: thread '<unnamed>' panicked at an unknown location: \
             bad\\ndescriptor\\u{1b}[2J\n"
        );
        assert!(fatal_line(None, None, &42u32).contains("non-string panic payload"));
        let long = "x".repeat(5000);
        assert!(fatal_line(None, None, &long).len() < MAX_MESSAGE + 100);
    }
}

//! A panic in a non-main thread ends podbox-vmm at once with a non-zero
//! status and one line on stderr, even while other threads would run on.
//!
//! No guest boots: the binary's debug-build test hook
//! (`PODBOX_VMM_TEST_PANIC_THREAD`, see src/main.rs) starts a thread that
//! panics next to one that loops for ever, with the main thread waiting on
//! the loop. Without the panic hook (src/fatal.rs) the process would hang
//! and this test would fail on its deadline.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What "at once" means here, with room for a slow, loaded host.
const DEADLINE: Duration = Duration::from_secs(5);

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the test hook is in debug builds only"
)]
fn a_panicking_device_thread_ends_the_vmm() {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_podbox-vmm"))
        .env("PODBOX_VMM_TEST_PANIC_THREAD", "virtio-test-dev")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting podbox-vmm");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("podbox-vmm still running {DEADLINE:?} after a thread panicked");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(70), "EX_SOFTWARE; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line:\n{stderr}");
    let line = lines[0];
    assert!(
        line.starts_with("podbox-vmm: fatal: thread 'virtio-test-dev' panicked at "),
        "{line}"
    );
    assert!(line.contains("src/main.rs:"), "names the location: {line}");
    assert!(
        line.ends_with(": test panic requested by PODBOX_VMM_TEST_PANIC_THREAD"),
        "{line}"
    );
}

//! A child's output read while it still runs, and waiting on a condition:
//! what the end-to-end tests do around `ctr run`.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads a child's pipe into a shared buffer on a thread, so a test can
/// look at output while the child still runs.
pub fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&chunk[..n]);
        }
    });
    buffer
}

/// What [`collect`] has read so far, as text.
pub fn text(buffer: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buffer.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Polls `done` every 200 ms; panics naming `what` after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

//! Benchmarks: side-by-side measurements printed as tables (never asserted).

pub mod boot;
pub mod fs;
pub mod vsock;

use std::io::Read;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A VMM under measurement: the guest console on `stdout`, its own log
/// collected by `log`, and a watchdog that SIGKILLs it after the deadline.
pub struct Watched {
    pub child: Child,
    pub stdout: ChildStdout,
    pub log: JoinHandle<String>,
    pub watchdog: JoinHandle<()>,
}

/// Starts `cmd` with piped stdout/stderr and a deadline.
pub fn spawn_watched(cmd: &mut Command, deadline: Duration) -> Result<Watched, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let pid = child.id() as libc::pid_t;
    let watchdog = std::thread::spawn(move || {
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: signal 0 only checks whether the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    Ok(Watched {
        child,
        stdout,
        log,
        watchdog,
    })
}

/// Median of the samples (upper median for an even count).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

//! Is a booting VM still getting somewhere? Waits for a guest are derived
//! from that instead of from a fixed deadline: on PVM hosts a boot is a
//! minute of emulated kernel work on a fast machine and several on a slow
//! or loaded one, so any fixed deadline is either too short for the slow
//! machine or far too long to notice a stuck guest.
//!
//! A VMM "makes progress" while its threads run or wait to run for a good
//! part of the time: the sum of their on-CPU and run-queue wait times from
//! `/proc/<pid>/task/*/schedstat` grows by at least [`MIN_BUSY_PERCENT`] of
//! the wall time over a window (a VMM starved by a busy host is waiting,
//! not stuck). A booting guest keeps a vCPU thread busy all the time (on
//! PVM its kernel is emulated); a guest that went idle without its agent
//! answering only wakes for timer ticks and device events, and the wait
//! ends after [`VmProgress::stall_limit`] without a busy window.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Share of one core a VMM's threads must have run or waited to run over
/// a window to count as progress. A booting guest keeps a vCPU runnable
/// all the time (99-199% measured in 10 s windows on a PVM host, run plus
/// wait); an idle guest on hardware KVM sleeps in HLT, but on PVM
/// its vCPU threads still spent 58-64% of a core in the host kernel (two
/// vCPUs, 19% + 42% system time, measured), so there an idle guest counts
/// as busy and only the overall limit ends a wait on a stuck agent.
pub const MIN_BUSY_PERCENT: u64 = 50;
/// Longest window; shorter where the stall limit is short.
const MAX_WINDOW: Duration = Duration::from_secs(10);

/// Why a wait for a guest ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stalled {
    #[error("podbox-vmm (pid {pid}) is gone")]
    Gone { pid: u32 },
    #[error("the VM made no progress for {idle:?} (podbox-vmm pid {pid}: its threads ran or waited to run {busy_percent}% of the last window, below {MIN_BUSY_PERCENT}%)")]
    Idle {
        pid: u32,
        idle: Duration,
        busy_percent: u64,
    },
    #[error("the VM was still booting after {limit:?} (the overall limit)")]
    Limit { limit: Duration },
}

/// Watches one VMM process: [`VmProgress::check`] says whether to keep
/// waiting for its guest.
#[derive(Debug)]
pub struct VmProgress {
    pid: u32,
    task_dir: PathBuf,
    /// How long the VMM may go without a busy window.
    pub stall_limit: Duration,
    /// How long a wait may take in all, however busy the VM is (a guest
    /// spinning for ever must not hold its caller for ever).
    pub overall_limit: Duration,
    window: Duration,
    started: Instant,
    /// The current window: when it began and the busy time (ns) then.
    window_start: Instant,
    window_busy: u64,
    /// The end of the last busy window, and the last window's busy share.
    last_progress: Instant,
    last_percent: u64,
}

impl VmProgress {
    pub fn new(pid: u32, stall_limit: Duration, overall_limit: Duration) -> Self {
        let now = Instant::now();
        let mut progress = Self {
            pid,
            task_dir: PathBuf::from(format!("/proc/{pid}/task")),
            stall_limit,
            overall_limit,
            window: (stall_limit / 4).min(MAX_WINDOW),
            started: now,
            window_start: now,
            window_busy: 0,
            last_progress: now,
            last_percent: 0,
        };
        progress.window_busy = progress.busy_ns().unwrap_or(0);
        progress
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long this wait has lasted.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ok while the VM is worth waiting for.
    pub fn check(&mut self) -> Result<(), Stalled> {
        let Some(busy) = self.busy_ns() else {
            return Err(Stalled::Gone { pid: self.pid });
        };
        if self.started.elapsed() > self.overall_limit {
            return Err(Stalled::Limit {
                limit: self.overall_limit,
            });
        }
        let length = self.window_start.elapsed();
        if length >= self.window {
            let gained = busy.saturating_sub(self.window_busy);
            self.last_percent = gained.saturating_mul(100) / (length.as_nanos() as u64).max(1);
            if self.last_percent >= MIN_BUSY_PERCENT {
                self.last_progress = Instant::now();
            }
            self.window_start = Instant::now();
            self.window_busy = busy;
        }
        if self.last_progress.elapsed() > self.stall_limit {
            return Err(Stalled::Idle {
                pid: self.pid,
                idle: self.last_progress.elapsed(),
                busy_percent: self.last_percent,
            });
        }
        Ok(())
    }

    /// Run plus run-queue wait time of all the VMM's threads, in ns; None
    /// once the process is gone (or a zombie).
    fn busy_ns(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The state follows the parenthesised command name.
        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let mut total = 0u64;
        for task in std::fs::read_dir(&self.task_dir).ok()?.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue; // the thread just ended
            };
            let mut fields = text
                .split_whitespace()
                .map(|f| f.parse::<u64>().unwrap_or(0));
            total += fields.next().unwrap_or(0) + fields.next().unwrap_or(0);
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_process_progresses_an_idle_one_stalls_a_dead_one_is_gone() {
        // Busy: this test's own process, spinning.
        let me = std::process::id();
        let mut busy = VmProgress::new(me, Duration::from_millis(400), Duration::from_secs(60));
        let until = Instant::now() + Duration::from_millis(900);
        while Instant::now() < until {
            std::hint::black_box(0u64.wrapping_add(1));
            assert_eq!(busy.check(), Ok(()));
        }

        // Idle: a sleeping child.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut idle = VmProgress::new(
            child.id(),
            Duration::from_millis(300),
            Duration::from_secs(60),
        );
        assert_eq!(idle.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            matches!(idle.check(), Err(Stalled::Idle { .. })),
            "{:?}",
            idle.check()
        );

        // Gone: the same child after it was killed and reaped.
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(idle.check(), Err(Stalled::Gone { pid: idle.pid() }));

        // The overall limit holds even for a busy process.
        let mut capped = VmProgress::new(me, Duration::from_secs(60), Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            capped.check(),
            Err(Stalled::Limit {
                limit: Duration::from_millis(100)
            })
        );
    }
}

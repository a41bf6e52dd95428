//! Collects exit statuses of every child of the agent.
//!
//! One thread calls waitpid(-1): as PID 1 the agent inherits orphans and
//! must reap them, and a single waiter avoids two threads racing for the
//! same status. Children the agent spawned are registered under the
//! registry lock around the fork, so a status is never lost to a child that
//! exits before it is registered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// Exit status of one process, set once by the reaper.
#[derive(Default)]
pub struct ExitCell {
    status: Mutex<Option<i32>>,
    cv: Condvar,
}

impl ExitCell {
    /// Blocks until the process exited; exit code or 128 + signal.
    pub fn wait(&self) -> i32 {
        let mut g = lock(&self.status);
        loop {
            if let Some(s) = *g {
                return s;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn wait_timeout(&self, d: Duration) -> Option<i32> {
        let g = lock(&self.status);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, d, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    pub fn get(&self) -> Option<i32> {
        *lock(&self.status)
    }

    fn set(&self, status: i32) {
        *lock(&self.status) = Some(status);
        self.cv.notify_all();
    }
}

/// Locks ignoring poison: a panicking holder must not wedge the agent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub type Registry = HashMap<i32, Arc<ExitCell>>;

fn registry_mutex() -> &'static Mutex<Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

/// Hold this while forking a child and until `register` is called.
pub fn registry() -> MutexGuard<'static, Registry> {
    lock(registry_mutex())
}

/// Counts registrations; signalled on each, for a reaper with no children.
fn child_started() -> &'static (AtomicU64, Condvar) {
    static STARTED: OnceLock<(AtomicU64, Condvar)> = OnceLock::new();
    STARTED.get_or_init(Default::default)
}

/// Registers `pid` (call with the guard from `registry`).
pub fn register(reg: &mut Registry, pid: i32) -> Arc<ExitCell> {
    let cell = Arc::new(ExitCell::default());
    reg.insert(pid, cell.clone());
    let (count, cv) = child_started();
    count.fetch_add(1, Ordering::SeqCst);
    cv.notify_all();
    cell
}

/// While the agent has no children, waits for the next registration (with
/// a 1 s safety net) instead of polling: on PVM hosts every wakeup of an
/// idle guest is emulated kernel work. `seen` is the registration count
/// read before the waitpid that found no children; a child registered
/// since then ends the wait at once.
fn wait_for_a_child(seen: u64) {
    let (count, cv) = child_started();
    let reg = registry();
    if count.load(Ordering::SeqCst) == seen {
        let _ = cv.wait_timeout(reg, Duration::from_secs(1));
    }
}

/// Starts the reaper thread (idempotent).
pub fn start() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_loop)
            .expect("spawning the reaper thread");
    });
}

fn reap_loop() {
    loop {
        let seen = child_started().0.load(Ordering::SeqCst);
        let (pid, status) = match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, code),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => {
                // ECHILD: no children right now.
                wait_for_a_child(seen);
                continue;
            }
        };
        let cell = registry().remove(&pid.as_raw());
        match cell {
            Some(c) => {
                // One line per process the agent started: tells after the
                // fact why a container or a pod's pause process went away.
                log::info!("process {pid} exited (status {status})");
                c.set(status)
            }
            None => log::debug!("reaped orphan {pid} (status {status})"),
        }
    }
}

//! A process the agent started in a container (its init or an exec):
//! PID, exit status, stdio, and the sync socket that holds it before exec.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::stdio::ProcessIo;
use super::Error;
use crate::reaper::{lock, ExitCell};

pub struct Process {
    /// PID in the agent's namespace.
    pub pid: i32,
    pub exit: Arc<ExitCell>,
    pub io: ProcessIo,
    /// Present until the process has been told to exec.
    sync: Mutex<Option<UnixStream>>,
}

/// Reads one status line from stage 2: "ok" or "err <message>".
pub(crate) fn read_status(sock: &mut UnixStream) -> Result<(), Error> {
    let mut line = String::new();
    // BufReader on a &UnixStream: stage 2 writes one line and then waits,
    // so nothing past the line is buffered away.
    BufReader::new(&*sock)
        .read_line(&mut line)
        .map_err(|e| Error::io("read from container setup", e))?;
    match line.trim_end() {
        "ok" => Ok(()),
        "" => Err(Error::Setup(
            "container setup exited without a report".into(),
        )),
        l => Err(Error::Setup(
            l.strip_prefix("err ").unwrap_or(l).to_string(),
        )),
    }
}

impl Process {
    pub(crate) fn new(pid: i32, exit: Arc<ExitCell>, io: ProcessIo, sync: UnixStream) -> Process {
        Process {
            pid,
            exit,
            io,
            sync: Mutex::new(Some(sync)),
        }
    }

    /// Lets the process exec its program; returns once exec succeeded, or
    /// with stage 2's message (e.g. executable not found).
    pub fn start(&self) -> Result<(), Error> {
        let mut sock = lock(&self.sync)
            .take()
            .ok_or_else(|| Error::FailedPrecondition("process was already started".into()))?;
        sock.write_all(b"s\n")
            .map_err(|e| Error::io("tell container to start", e))?;
        // The socket is close-on-exec in stage 2: EOF without a message
        // means exec succeeded.
        let mut msg = String::new();
        sock.read_to_string(&mut msg)
            .map_err(|e| Error::io("wait for container exec", e))?;
        let msg = msg.trim();
        if msg.is_empty() {
            Ok(())
        } else {
            Err(Error::Setup(
                msg.strip_prefix("err ").unwrap_or(msg).to_string(),
            ))
        }
    }

    pub fn started(&self) -> bool {
        lock(&self.sync).is_none()
    }

    /// Sends `sig` unless the process is already reaped (its PID could have
    /// been reused by then).
    pub fn signal(&self, sig: Signal) -> Result<(), Error> {
        if self.exit.get().is_some() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::sys(format!("kill {} {sig}", self.pid), e)),
        }
    }

    /// SIGKILL and wait up to `timeout`; used for cleanup.
    pub fn kill_and_wait(&self, timeout: Duration) -> bool {
        let _ = self.signal(Signal::SIGKILL);
        self.exit.wait_timeout(timeout).is_some()
    }
}

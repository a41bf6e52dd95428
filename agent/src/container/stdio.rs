//! Stdio of a container process: three pipes, or a pty whose master the
//! agent keeps. Output is pumped by one thread per stream into a bounded
//! buffer the client drains with ReadStdout/ReadStderr; the pump runs until
//! every writer has closed, so nothing written before exit is lost.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use nix::fcntl::OFlag;

use super::Error;
use crate::reaper::lock;

/// Past this much unread output the pump stops reading, so a client that
/// never reads slows the container down instead of exhausting guest memory.
const MAX_BUFFERED: usize = 1 << 20;

#[derive(Default)]
struct StreamState {
    data: VecDeque<u8>,
    eof: bool,
}

/// One output stream.
#[derive(Default)]
pub struct Stream {
    state: Mutex<StreamState>,
    cv: Condvar,
}

impl Stream {
    fn closed() -> Arc<Stream> {
        let s = Arc::new(Stream::default());
        lock(&s.state).eof = true;
        s
    }

    /// Reads `file` until EOF (or EIO, which is how a pty master reports
    /// that the last slave closed) on a background thread.
    fn pump(self: &Arc<Self>, mut file: File) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("stdio-pump".into())
            .spawn(move || {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    {
                        let g = lock(&me.state);
                        let _g = me
                            .cv
                            .wait_while(g, |s| s.data.len() >= MAX_BUFFERED)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            lock(&me.state).data.extend(&buf[..n]);
                            me.cv.notify_all();
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                lock(&me.state).eof = true;
                me.cv.notify_all();
            });
        if spawned.is_err() {
            log::error!("cannot spawn stdio pump thread; stream closed");
            lock(&self.state).eof = true;
        }
    }

    /// Blocks until data or EOF; an empty result means EOF.
    pub fn read(&self, max: usize) -> Vec<u8> {
        let g = lock(&self.state);
        let mut g = self
            .cv
            .wait_while(g, |s| s.data.is_empty() && !s.eof)
            .unwrap_or_else(|e| e.into_inner());
        let n = max.min(g.data.len());
        let out: Vec<u8> = g.data.drain(..n).collect();
        self.cv.notify_all();
        out
    }
}

/// The agent's side of a process's stdio.
pub struct ProcessIo {
    stdin: Mutex<Option<File>>,
    pub stdout: Arc<Stream>,
    pub stderr: Arc<Stream>,
    /// Kept for TtyWinResize; None for pipes.
    pty_master: Option<OwnedFd>,
}

/// The child's ends: stdin, stdout, stderr.
pub type ChildFds = [OwnedFd; 3];

impl ProcessIo {
    /// Creates pipes or a pty. The caller hands `ChildFds` to the child and
    /// drops them afterwards so that EOF can be seen.
    pub fn new(terminal: bool) -> Result<(ProcessIo, ChildFds), Error> {
        if terminal {
            Self::new_pty()
        } else {
            Self::new_pipes()
        }
    }

    fn new_pipes() -> Result<(ProcessIo, ChildFds), Error> {
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe", e));
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let io = ProcessIo {
            stdin: Mutex::new(Some(File::from(in_w))),
            stdout: Arc::new(Stream::default()),
            stderr: Arc::new(Stream::default()),
            pty_master: None,
        };
        io.stdout.pump(File::from(out_r));
        io.stderr.pump(File::from(err_r));
        Ok((io, [in_r, out_w, err_w]))
    }

    fn new_pty() -> Result<(ProcessIo, ChildFds), Error> {
        let pty = nix::pty::openpty(None, None).map_err(|e| Error::sys("openpty", e))?;
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| Error::sys("set CLOEXEC on pty", e))?;
        }
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Error::io("dup pty", e));
        let reader = File::from(dup(&pty.master)?);
        let writer = File::from(dup(&pty.master)?);
        let child = [dup(&pty.slave)?, dup(&pty.slave)?, pty.slave];
        let io = ProcessIo {
            stdin: Mutex::new(Some(writer)),
            stdout: Arc::new(Stream::default()),
            stderr: Stream::closed(),
            pty_master: Some(pty.master),
        };
        io.stdout.pump(reader);
        Ok((io, child))
    }

    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, Error> {
        let mut g = lock(&self.stdin);
        let f = g
            .as_mut()
            .ok_or_else(|| Error::FailedPrecondition("stdin is closed".into()))?;
        f.write_all(data).map_err(|e| Error::io("write stdin", e))?;
        Ok(data.len())
    }

    /// Closes stdin so the process reads EOF. With a pty there is no
    /// close: send the terminal's EOF character (^D) instead.
    pub fn close_stdin(&self) -> Result<(), Error> {
        if self.pty_master.is_some() {
            let mut g = lock(&self.stdin);
            if let Some(f) = g.as_mut() {
                f.write_all(&[4])
                    .map_err(|e| Error::io("write EOF to pty", e))?;
            }
            return Ok(());
        }
        lock(&self.stdin).take();
        Ok(())
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        let master = self
            .pty_master
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("process has no terminal".into()))?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::sys("TIOCSWINSZ", nix::errno::Errno::last()));
        }
        Ok(())
    }
}

//! The agent's ready call: once its ttrpc server listens, the agent opens
//! one guest→host stream to host port [`AGENT_READY_PORT`], which
//! podbox-vmm forwards to the unix socket `<vsock socket>_<port>`. The host
//! binds that socket before the VMM starts and dials the agent only once
//! the call came, instead of knocking from the VMM's start: every refused
//! knock is a REQUEST and an RST through the guest kernel, which PVM hosts
//! emulate, while the guest is still booting.
//!
//! The guest is not trusted here: what it writes is only logged (at most
//! [`MAX_LINE`] bytes), and an early or repeated call only makes the host
//! dial early, which the dial loop handles anyway.

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use podbox_protocol::AGENT_READY_PORT;

/// Longest line of the ready call that is read (and logged).
const MAX_LINE: usize = 128;

/// The host end of the ready call, bound before the VMM starts; the socket
/// file goes when this is dropped.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
    called: Option<Instant>,
}

impl ReadyListener {
    /// Binds `<vsock_socket>_<AGENT_READY_PORT>`, replacing a stale socket
    /// file left by a killed run (one nobody answers on; a live one is an
    /// error, as is anything that is not a socket).
    pub fn bind(vsock_socket: &Path) -> std::io::Result<Self> {
        let mut path = vsock_socket.as_os_str().to_owned();
        path.push(format!("_{AGENT_READY_PORT}"));
        let path = PathBuf::from(path);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            let socket = std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type());
            if socket && UnixStream::connect(&path).is_err() {
                std::fs::remove_file(&path)?;
            }
        }
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path,
            called: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the agent has called (non-blocking; stays true once seen).
    pub fn called(&mut self) -> bool {
        if self.called.is_some() {
            return true;
        }
        match self.listener.accept() {
            Ok((stream, _)) => {
                let line = read_line(stream);
                tracing::debug!("agent ready call: {line:?}");
                self.called = Some(Instant::now());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => tracing::debug!("ready socket {}: accept: {e}", self.path.display()),
        }
        self.called.is_some()
    }

    /// When [`ReadyListener::called`] first saw the call.
    pub fn called_at(&self) -> Option<Instant> {
        self.called
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the guest wrote, without waiting for it: the call itself is the
/// signal, the text is only for the log.
fn read_line(mut stream: UnixStream) -> String {
    let mut buf = [0u8; MAX_LINE];
    let _ = stream.set_nonblocking(true);
    let n = stream.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn ready_call_is_seen_once_and_the_socket_removed() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        // A stale socket from a killed run is replaced.
        drop(
            UnixListener::bind(dir.path().join(format!("vsock.sock_{AGENT_READY_PORT}"))).unwrap(),
        );
        let mut ready = ReadyListener::bind(&vsock).unwrap();
        assert!(!ready.called());
        let mut guest = UnixStream::connect(ready.path()).unwrap();
        // Hostile sizes are cut, not buffered.
        guest.write_all(&[b'x'; 4096]).unwrap();
        assert!(ready.called());
        drop(guest);
        assert!(ready.called(), "stays true");
        let path = ready.path().to_owned();
        drop(ready);
        assert!(!path.exists());
    }
}

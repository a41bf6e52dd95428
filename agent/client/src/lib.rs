//! podbox-agent-client: reach the agent inside a podbox VM from the host.
//!
//! podbox-vmm exposes the guest's vsock as a unix socket (`--vsock-socket`):
//! a host process connects, writes `CONNECT <port>\n`, reads
//! `OK <hostport>\n`, and then holds a byte stream to the guest listener on
//! that port ("hybrid vsock", as in Firecracker). [`dial`] does that
//! handshake; [`AgentClient::connect_when_ready`] waits for the agent's
//! ready call ([`ReadyListener`]), dials the agent's port, wraps the stream
//! in a ttrpc client and waits on that stream until the agent answers a
//! health check, for as long as the VM makes progress ([`VmProgress`]): a
//! guest boot is a minute of emulated kernel work on a fast PVM host and
//! several on a slow one, so a fixed deadline either fails slow machines
//! or waits far too long on a stuck guest.
//!
//! ```no_run
//! use std::time::Duration;
//! use podbox_agent_client::AgentClient;
//! let agent = AgentClient::connect("/run/podbox/pod1/vsock.sock".as_ref(), Duration::from_secs(300))?;
//! let details = agent.agent.get_guest_details(podbox_agent_client::ctx(Duration::from_secs(5)), &Default::default())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{ErrorKind, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podbox_protocol::agent_ttrpc::AgentServiceClient;
use podbox_protocol::health::{health_check_response::ServingStatus, CheckRequest};
use podbox_protocol::health_ttrpc::HealthClient;

mod progress;
mod ready;

pub use podbox_protocol::AGENT_VSOCK_PORT;
pub use progress::{Stalled, VmProgress};
pub use ready::{ReadyListener, AGENT_READY_PORT};

/// Longest `OK <port>\n` line we accept.
const MAX_OK_LINE: usize = 32;
/// Pause between attempts while the guest is not answering yet.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often the wait for the ready call looks at the listener.
const READY_POLL: Duration = Duration::from_millis(100);
/// How long one health check waits before the caller's patience is asked
/// again. A timeout does not end the stream: its answer may still come.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read of the handshake waits before the patience is asked
/// again.
const HANDSHAKE_SLICE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to hybrid vsock socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("hybrid vsock {path} port {port}: {detail}")]
    Handshake {
        path: PathBuf,
        port: u32,
        detail: String,
    },
    #[error("ttrpc: {0}")]
    Ttrpc(#[from] ttrpc::Error),
    #[error("agent health check answered {0:?}, not SERVING")]
    NotServing(ServingStatus),
    #[error("agent at {path} did not answer after {waited:?} ({attempts} attempts): {reason}; last error: {}", last.as_deref().map_or("none (no attempt made)".to_string(), |e| e.to_string()))]
    GaveUp {
        path: PathBuf,
        waited: Duration,
        attempts: u32,
        reason: String,
        last: Option<Box<ClientError>>,
    },
}

/// Decides how long a connect keeps trying: Ok to go on, Err(reason) to
/// give up. [`VmProgress`] (wait while the VM makes progress) and
/// [`Deadline`] implement it.
pub trait Patience {
    fn check(&mut self) -> Result<(), String>;
}

impl Patience for VmProgress {
    fn check(&mut self) -> Result<(), String> {
        VmProgress::check(self).map_err(|e| e.to_string())
    }
}

/// A fixed time limit, for callers with no VM process to watch.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    limit: Duration,
    until: Instant,
}

impl Deadline {
    pub fn after(limit: Duration) -> Self {
        Self {
            limit,
            until: Instant::now() + limit,
        }
    }
}

impl Patience for Deadline {
    fn check(&mut self) -> Result<(), String> {
        if Instant::now() < self.until {
            Ok(())
        } else {
            Err(format!("the time limit of {:?} passed", self.limit))
        }
    }
}

/// A ttrpc context with a timeout, for calls on the clients.
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// Opens a stream to guest vsock port `port` through podbox-vmm's unix
/// socket. Fails with [`ClientError::Handshake`] when the guest refuses
/// (nobody listens on that port yet: the VMM closes the stream without an
/// OK line) or `timeout` passes first.
pub fn dial(socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    dial_with(socket, port, &mut Deadline::after(timeout))
}

/// [`dial`], waiting for the guest's answer as long as `patience` allows.
/// Before the guest's vsock driver is up the VMM holds the request, so the
/// answer can take as long as the rest of the boot.
pub fn dial_with(
    socket: &Path,
    port: u32,
    patience: &mut dyn Patience,
) -> Result<UnixStream, ClientError> {
    let handshake = |detail: String| ClientError::Handshake {
        path: socket.to_owned(),
        port,
        detail,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(HANDSHAKE_SLICE))
        .map_err(|e| handshake(e.to_string()))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| handshake(format!("sending CONNECT: {e}")))?;
    // Byte by byte: whatever follows the newline is the guest's data.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(handshake("refused (stream closed before OK)".into())),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_OK_LINE => line.push(byte[0]),
            Ok(_) => return Err(handshake("overlong reply".into())),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                patience
                    .check()
                    .map_err(|reason| handshake(format!("no answer: {reason}")))?;
            }
            Err(e) => return Err(handshake(e.to_string())),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        Some(_host_port) => {}
        None => return Err(handshake(format!("unexpected reply {text:?}"))),
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| handshake(e.to_string()))?;
    Ok(stream)
}

/// A ttrpc timeout (the stream may still answer), as opposed to a closed
/// stream (ttrpc fails pending calls with `Error::Socket`) or an error
/// status. ttrpc 0.10 reports a timeout only as text: "Receive packet from
/// Receiver timeout: timed out waiting on channel"; the unit test below
/// pins that.
fn is_timeout(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::Others(text) if text.contains("timeout") && text.contains("timed out"))
}

/// The agent's API and health service over one connection.
#[derive(Clone)]
pub struct AgentClient {
    pub agent: AgentServiceClient,
    pub health: HealthClient,
}

impl AgentClient {
    /// Connects to the agent (vsock port 1024) through `socket`, retrying
    /// until it answers a health check with SERVING or `deadline` passes
    /// (checked between waits: one health check's 10 s, or one second of
    /// the handshake, can run past it).
    /// Dials from the start; [`AgentClient::connect_when_ready`] waits for
    /// the agent's ready call first.
    pub fn connect(socket: &Path, deadline: Duration) -> Result<Self, ClientError> {
        Self::connect_port(socket, AGENT_VSOCK_PORT, deadline)
    }

    /// [`AgentClient::connect`] for an agent on another vsock port.
    pub fn connect_port(socket: &Path, port: u32, deadline: Duration) -> Result<Self, ClientError> {
        Self::connect_loop(socket, port, None, &mut Deadline::after(deadline))
    }

    /// Waits for the agent's ready call on `ready` (bound before the VMM
    /// started), then connects, for as long as `patience` allows: the
    /// first dial happens once the agent listens, not hundreds before.
    pub fn connect_when_ready(
        socket: &Path,
        ready: &mut ReadyListener,
        patience: &mut dyn Patience,
    ) -> Result<Self, ClientError> {
        Self::connect_loop(socket, AGENT_VSOCK_PORT, Some(ready), patience)
    }

    fn connect_loop(
        socket: &Path,
        port: u32,
        ready: Option<&mut ReadyListener>,
        patience: &mut dyn Patience,
    ) -> Result<Self, ClientError> {
        let start = Instant::now();
        let mut attempts = 0;
        let gave_up = |attempts, reason, last: Option<ClientError>| ClientError::GaveUp {
            path: socket.to_owned(),
            waited: start.elapsed(),
            attempts,
            reason,
            last: last.map(Box::new),
        };
        if let Some(ready) = ready {
            while !ready.called() {
                patience.check().map_err(|reason| {
                    gave_up(0, format!("no ready call from the agent: {reason}"), None)
                })?;
                std::thread::sleep(READY_POLL);
            }
            tracing::debug!("agent ready call after {:?}", start.elapsed());
        }
        loop {
            attempts += 1;
            let last = match Self::try_once(socket, port, patience) {
                Ok(client) => {
                    tracing::debug!(
                        "agent answered after {:?} ({attempts} attempts)",
                        start.elapsed()
                    );
                    return Ok(client);
                }
                Err(e) => e,
            };
            tracing::debug!("agent attempt {attempts}: {last}");
            if let Err(reason) = patience.check() {
                return Err(gave_up(attempts, reason, Some(last)));
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// One dial plus a health check on that stream. A stream the guest
    /// accepted is kept until it answers or the patience runs out: its
    /// answer can take longer than one check's timeout while the guest
    /// sets the connection up, and a new stream would only cost the guest
    /// that set-up again (on slow PVM hosts no check ever finished that
    /// way, and the abandoned streams filled the agent's accept backlog).
    fn try_once(
        socket: &Path,
        port: u32,
        patience: &mut dyn Patience,
    ) -> Result<Self, ClientError> {
        let stream = dial_with(socket, port, patience)?;
        // ttrpc takes ownership of the descriptor and closes it on drop.
        let client = Self::from_client(ttrpc::Client::new(stream.into_raw_fd())?);
        loop {
            match client.check(CHECK_TIMEOUT) {
                Ok(()) => return Ok(client),
                Err(ClientError::Ttrpc(e)) if is_timeout(&e) => {
                    tracing::debug!(
                        "agent: no answer within {CHECK_TIMEOUT:?} yet; waiting on the same stream"
                    );
                    patience.check().map_err(|reason| ClientError::Handshake {
                        path: socket.to_owned(),
                        port,
                        detail: format!("health check unanswered: {reason}"),
                    })?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Wraps an already-connected ttrpc client.
    pub fn from_client(client: ttrpc::Client) -> Self {
        Self {
            agent: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
        }
    }

    /// Health.Check: Ok when the agent says SERVING.
    pub fn check(&self, timeout: Duration) -> Result<(), ClientError> {
        let resp = self.health.check(ctx(timeout), &CheckRequest::default())?;
        match resp.status.enum_value_or_default() {
            ServingStatus::SERVING => Ok(()),
            other => Err(ClientError::NotServing(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake VMM socket that answers each connection with `reply`.
    fn fake_vmm(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap_or(0);
                assert_eq!(&buf[..n], b"CONNECT 1024\n");
                let _ = s.write_all(reply);
            }
        });
        (dir, path)
    }

    #[test]
    fn vsock_dial_reads_ok_and_keeps_following_bytes() {
        let (_d, path) = fake_vmm(b"OK 1073741824\nrest");
        let mut s = dial(&path, 1024, Duration::from_secs(5)).unwrap();
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
    }

    #[test]
    fn vsock_dial_errors_are_typed() {
        let (_d, path) = fake_vmm(b"");
        assert!(matches!(
            dial(&path, 1024, Duration::from_secs(5)),
            Err(ClientError::Handshake { .. })
        ));
        let (_d2, path) = fake_vmm(b"NO\n");
        let e = dial(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("unexpected reply"), "{e}");
        let e = dial(
            Path::new("/nonexistent/v.sock"),
            1024,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
    }

    #[test]
    fn a_silent_stream_is_a_timeout_a_closed_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let silent = UnixStream::connect(&path).unwrap();
        let (_held, _) = listener.accept().unwrap();
        let client = AgentClient::from_client(ttrpc::Client::new(silent.into_raw_fd()).unwrap());
        match client.check(Duration::from_millis(200)) {
            Err(ClientError::Ttrpc(e)) => assert!(is_timeout(&e), "{e:?}"),
            other => panic!("{:?}", other.err()),
        }
        let closed = UnixStream::connect(&path).unwrap();
        drop(listener.accept().unwrap());
        let client = AgentClient::from_client(ttrpc::Client::new(closed.into_raw_fd()).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        match client.check(Duration::from_secs(5)) {
            Err(ClientError::Ttrpc(e)) => assert!(!is_timeout(&e), "{e:?}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn vsock_connect_gives_up_at_the_deadline() {
        let (_d, path) = fake_vmm(b"");
        let start = Instant::now();
        let e = AgentClient::connect(&path, Duration::from_millis(700))
            .err()
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        match e {
            ClientError::GaveUp { attempts, last, .. } => {
                assert!(attempts >= 2, "{attempts}");
                assert!(matches!(
                    last.as_deref(),
                    Some(ClientError::Handshake { .. })
                ));
            }
            other => panic!("{other}"),
        }
    }
}

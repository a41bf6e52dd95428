//! The host's agent connect against a guest that is slow to set up each
//! new connection, as a podbox guest is on a slow PVM host (the agent's
//! ttrpc server starts several threads per connection, all guest-kernel
//! work that PVM emulates; two guests on two cores measured more than
//! 10 s from accept to the first answer). This is the fault behind
//! "`make test` fails on a fresh machine": a client that gives a stream
//! 10 s, drops it and dials again makes the guest pay the set-up again on
//! every try, so no health check ever finishes, while the abandoned
//! streams fill the agent's accept backlog (10) and every later dial is
//! refused.
//!
//! A fake VMM socket plays that guest with a real ttrpc health server
//! behind it: each stream gets its `OK` at once, and the server's answers
//! reach the host only [`SETUP`] after the stream was opened. No VM, no
//! luck: the timing is the fake's.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podbox_agent_client::{AgentClient, Deadline, ReadyListener, AGENT_READY_PORT};
use podbox_protocol::health::{
    health_check_response::ServingStatus, CheckRequest, HealthCheckResponse, VersionCheckResponse,
};
use podbox_protocol::health_ttrpc::{create_health, Health};

/// How long the fake guest takes to answer on a new stream: longer than
/// the client's per-check timeout (10 s).
const SETUP: Duration = Duration::from_secs(13);

struct Serving;

impl Health for Serving {
    fn check(
        &self,
        _: &ttrpc::TtrpcContext,
        _: CheckRequest,
    ) -> ttrpc::Result<HealthCheckResponse> {
        Ok(HealthCheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }
    fn version(
        &self,
        _: &ttrpc::TtrpcContext,
        _: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        Ok(VersionCheckResponse::default())
    }
}

/// What the fake guest saw.
#[derive(Default)]
struct Seen {
    /// Streams it accepted (answered `OK`).
    accepted: AtomicUsize,
    /// Dials it refused because its agent was not listening yet.
    refused: AtomicUsize,
}

struct SlowGuest {
    _dir: tempfile::TempDir,
    vsock: PathBuf,
    seen: Arc<Seen>,
    _server: ttrpc::Server,
}

/// A fake podbox-vmm socket whose guest agent starts listening after
/// `listen_after`, then calls the host's ready socket (if one is bound),
/// and answers each stream only `SETUP` after it was opened.
fn slow_guest(listen_after: Duration) -> SlowGuest {
    let dir = tempfile::tempdir().unwrap();
    let agent_socket = dir.path().join("agent.sock");
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", agent_socket.display()))
        .unwrap()
        .register_service(create_health(Arc::new(Serving)));
    server.start().unwrap();
    let vsock = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&vsock).unwrap();
    let seen = Arc::new(Seen::default());
    let booted = Instant::now() + listen_after;
    let seen_by_guest = seen.clone();
    std::thread::spawn(move || {
        for host in listener.incoming() {
            let Ok(host) = host else { return };
            let (seen, agent_socket) = (seen_by_guest.clone(), agent_socket.clone());
            std::thread::spawn(move || serve_stream(host, &agent_socket, booted, &seen));
        }
    });
    // The guest's ready call, once "its agent listens".
    let ready_socket = PathBuf::from(format!("{}_{AGENT_READY_PORT}", vsock.display()));
    std::thread::spawn(move || {
        let wait = booted.saturating_duration_since(Instant::now());
        std::thread::sleep(wait);
        if let Ok(mut s) = UnixStream::connect(&ready_socket) {
            let _ = s.write_all(b"podbox-agent test listening on 1024\n");
        }
    });
    SlowGuest {
        _dir: dir,
        vsock,
        seen,
        _server: server,
    }
}

/// One host stream: the CONNECT line, a refusal before the agent listens,
/// else OK and a splice to the agent with the guest's set-up delay on the
/// way back.
fn serve_stream(mut host: UnixStream, agent_socket: &Path, booted: Instant, seen: &Seen) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while host.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    assert_eq!(line, b"CONNECT 1024", "the client dials the agent's port");
    if Instant::now() < booted {
        seen.refused.fetch_add(1, Ordering::SeqCst);
        return; // closed without OK: refused
    }
    seen.accepted.fetch_add(1, Ordering::SeqCst);
    let opened = Instant::now();
    let agent = UnixStream::connect(agent_socket).unwrap();
    host.write_all(b"OK 1073741824\n").unwrap();
    let (mut to_agent, mut from_host) = (agent.try_clone().unwrap(), host.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_host, &mut to_agent);
    });
    std::thread::sleep(SETUP.saturating_sub(opened.elapsed()));
    let (mut from_agent, mut to_host) = (agent, host);
    let _ = std::io::copy(&mut from_agent, &mut to_host);
}

#[test]
fn a_guest_slower_than_one_check_is_waited_for_on_one_stream() {
    let guest = slow_guest(Duration::ZERO);
    let start = Instant::now();
    let agent = AgentClient::connect(&guest.vsock, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("the slow agent was never reached: {e}"));
    agent.check(Duration::from_secs(5)).unwrap();
    assert!(start.elapsed() >= SETUP, "answered before the guest could");
    assert_eq!(
        guest.seen.accepted.load(Ordering::SeqCst),
        1,
        "a stream the guest accepted must not be dropped for a new one"
    );
}

#[test]
fn with_the_ready_call_the_first_dial_waits_for_the_agent() {
    let guest = slow_guest(Duration::from_secs(3));
    let mut ready = ReadyListener::bind(&guest.vsock).unwrap();
    let agent = AgentClient::connect_when_ready(
        &guest.vsock,
        &mut ready,
        &mut Deadline::after(Duration::from_secs(90)),
    )
    .unwrap_or_else(|e| panic!("the agent was never reached: {e}"));
    agent.check(Duration::from_secs(5)).unwrap();
    assert_eq!(
        guest.seen.refused.load(Ordering::SeqCst),
        0,
        "no dial before the ready call"
    );
    assert_eq!(guest.seen.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn no_ready_call_gives_up_with_the_reason_and_no_dial() {
    // A guest that never becomes ready: the patience decides, and no
    // stream was opened for nothing.
    let guest = slow_guest(Duration::from_secs(3600));
    let mut ready = ReadyListener::bind(&guest.vsock).unwrap();
    let e = AgentClient::connect_when_ready(
        &guest.vsock,
        &mut ready,
        &mut Deadline::after(Duration::from_secs(1)),
    )
    .err()
    .expect("no agent, no client");
    let text = e.to_string();
    assert!(
        text.contains("no ready call") && text.contains("0 attempts"),
        "{text}"
    );
    assert_eq!(guest.seen.refused.load(Ordering::SeqCst), 0);
}

//! The host side of virtio-vsock: "hybrid vsock" over unix sockets, as
//! Firecracker and Cloud Hypervisor do it (there is no vhost-vsock here).
//!
//! - Host → guest: a host process connects to the socket at `path`, writes
//!   `CONNECT <port>\n`, and once the guest accepted, reads `OK <hostport>\n`;
//!   from then on the unix stream is the guest stream. A refused or failed
//!   connection is closed without the OK line.
//! - Guest → host: a guest connection to CID 2, port P is forwarded to a
//!   listener at `<path>_<P>` if one exists, else reset.
//!
//! Everything the guest sends is checked here: unknown connections, bad
//! ops, wrong CIDs and credit overruns end in RST or a dropped packet (logged
//! at debug), never in a failure of the VMM.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnError, Connection, State};
use super::packet::*;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Ports the host side picks for host-initiated streams start here, well
/// clear of the ports guests usually listen on.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Limits on what a guest (or host clients) can make us hold.
const MAX_CONNECTIONS: usize = 1024;
const MAX_PENDING_HOST: usize = 256;
/// The most sockets the muxer holds at once (connections and host clients
/// not yet connected): what podbox-vmm's descriptor limit must leave room for.
pub const MAX_SOCKETS: usize = MAX_CONNECTIONS + MAX_PENDING_HOST;
const MAX_CONTROL_QUEUE: usize = 4096;
/// `CONNECT <u32>\n` is at most 19 bytes.
const MAX_CONNECT_LINE: usize = 32;

type Key = (u32, u32); // (local_port, peer_port)

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error("binding vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock epoll: {0}")]
    Epoll(#[source] std::io::Error),
}

/// A host connection that has not said which guest port it wants yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

pub struct Muxer {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    pending: HashMap<RawFd, PendingHost>,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    /// Packets without payload waiting for RX buffers (RESPONSE, RST,
    /// SHUTDOWN, credit messages), in order.
    control: VecDeque<Header>,
    next_local_port: u32,
    /// Round-robin start for host→guest data, so one busy stream does not
    /// starve the others.
    rr: usize,
}

/// Binds the unix socket, replacing a stale one left by a killed VMM.
fn bind(path: &Path) -> Result<UnixListener, MuxerError> {
    let bind_err = |source| MuxerError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket nobody answers on is stale; anything else is an error.
        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

impl Muxer {
    pub fn new(cid: u64, path: &Path) -> Result<Self, MuxerError> {
        let listener = bind(path)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Self {
            cid,
            path: path.to_owned(),
            listener,
            epoll,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rr: 0,
        })
    }

    /// The epoll set the device thread waits on; the device adds its queue
    /// eventfds with tokens above any fd.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// An epoll event for one of our fds.
    pub fn handle_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_all();
        } else if self.pending.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.conn_event(key, events);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING_HOST
                        || stream.set_nonblocking(true).is_err()
                    {
                        tracing::warn!("vsock: too many host connections waiting; refusing one");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = self.epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, fd as u64),
                    ) {
                        tracing::warn!("vsock: epoll add: {e}");
                        continue;
                    }
                    self.pending.insert(
                        fd,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte: nothing after the
    /// newline may be consumed, it belongs to the guest stream.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(1) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => break None, // EOF or an overlong line
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break None,
            }
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(peer_port) = port else {
            tracing::debug!(
                "vsock: host connection sent a bad CONNECT line {:?}",
                String::from_utf8_lossy(&p.line)
            );
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} streams open; refusing a host connection");
            return;
        }
        let local_port = self.alloc_local_port();
        let key = (local_port, peer_port);
        if !self.add_connection(Connection::new(
            local_port,
            peer_port,
            p.stream,
            State::Connecting,
        )) {
            return;
        }
        self.push_control(key, OP_REQUEST, 0);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(local, _)| local == port) {
                return port;
            }
        }
    }

    /// Registers a stream edge-triggered for input, output and hang-ups.
    fn add_connection(&mut self, conn: Connection) -> bool {
        let fd = conn.stream.as_raw_fd();
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, fd as u64))
        {
            tracing::warn!("vsock: epoll add: {e}");
            return false;
        }
        self.by_fd.insert(fd, (conn.local_port, conn.peer_port));
        self.conns.insert((conn.local_port, conn.peer_port), conn);
        true
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            tracing::debug!("vsock: stream {key:?} closed: {}", conn.describe());
            let fd = conn.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.by_fd.remove(&fd);
        }
    }

    /// Resets a stream: RST to the guest, host socket closed.
    fn reset(&mut self, key: Key) {
        self.remove(key);
        self.push_control(key, OP_RST, 0);
    }

    fn push_control(&mut self, (local_port, peer_port): Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL_QUEUE {
            tracing::debug!(
                "vsock: control queue full (guest gives no RX buffers); op {op} dropped"
            );
            return;
        }
        self.control
            .push_back(header_for(self.cid, (local_port, peer_port), op, flags));
    }

    fn conn_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            conn.readable = true;
        }
        if events.contains(EventSet::OUT) && conn.has_pending_tx() {
            if let Err(e) = conn.flush_to_host() {
                tracing::debug!("vsock: stream {key:?}: {e}");
                self.reset(key);
                return;
            }
        }
        self.maybe_finish(key);
    }

    /// Half-closes the host side once the guest finished sending and all of
    /// it reached the host; resets the stream once both sides are done.
    fn maybe_finish(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.guest_done_sending && !conn.has_pending_tx() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            if conn.host_eof {
                self.reset(key);
            }
        }
    }

    /// A packet from the guest's TX queue.
    pub fn on_guest_packet(&mut self, pkt: TxPacket) {
        let h = pkt.hdr;
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                "vsock: dropping packet {}:{} -> {}:{} (wrong CIDs)",
                h.src_cid,
                h.src_port,
                h.dst_cid,
                h.dst_port
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            tracing::debug!("vsock: socket type {} unsupported; RST", h.type_);
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                tracing::debug!("vsock: op {} for unknown stream {key:?}; RST", h.op);
                self.push_control(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(&h);
        let result: Result<(), ConnError> = match (h.op, conn.state) {
            (OP_RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                // A fresh socket's buffer takes this short line at once.
                let line = format!("OK {}\n", conn.local_port);
                conn.stream
                    .write_all(line.as_bytes())
                    .map_err(ConnError::from)
            }
            (OP_RW, State::Established) => conn.send_to_host(&pkt.data),
            (OP_CREDIT_UPDATE, _) => Ok(()),
            (OP_CREDIT_REQUEST, _) => {
                conn.credit_update_due = true;
                Ok(())
            }
            (OP_SHUTDOWN, State::Established) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    // The guest takes no more data: nothing more to send it.
                    conn.host_eof = true;
                }
                Ok(())
            }
            (OP_RST, _) => {
                self.remove(key);
                return;
            }
            (op, state) => {
                tracing::debug!("vsock: op {op} in state {state:?} on {key:?}; RST");
                self.reset(key);
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!("vsock: stream {key:?}: {e}; RST");
            self.reset(key);
            return;
        }
        self.maybe_finish(key);
    }

    /// The guest connects to host port `local`: forward to `<path>_<local>`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("vsock: REQUEST for {key:?} refused (exists or too many streams)");
            self.push_control(key, OP_RST, 0);
            return;
        }
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{}", key.0));
        let stream = match connect_nonblocking(Path::new(&target)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest port {} -> {}: {e}; RST",
                    key.1,
                    Path::new(&target).display()
                );
                self.push_control(key, OP_RST, 0);
                return;
            }
        };
        let mut conn = Connection::new(key.0, key.1, stream, State::Established);
        conn.update_peer_credit(h);
        if self.add_connection(conn) {
            self.push_control(key, OP_RESPONSE, 0);
        } else {
            self.push_control(key, OP_RST, 0);
        }
    }

    /// Whether `next_rx` might produce a packet (so the device should take
    /// an RX buffer).
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.rx_ready() || c.wants_credit_update() || (c.host_eof && c.readable))
    }

    /// The next packet for the guest: its header and `n` payload bytes
    /// written into `buf`. None when there is nothing to send.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(mut hdr) = self.control.pop_front() {
            if let Some(conn) = self.conns.get_mut(&(hdr.src_port, hdr.dst_port)) {
                conn.stamp(&mut hdr);
            }
            return Some((hdr, 0));
        }
        let mut keys: Vec<Key> = self.conns.keys().copied().collect();
        if keys.is_empty() {
            return None;
        }
        keys.sort_unstable();
        let start = self.rr % keys.len();
        keys.rotate_left(start);
        self.rr = self.rr.wrapping_add(1);
        for key in keys {
            if let Some(out) = self.rx_for(key, buf) {
                return Some(out);
            }
        }
        None
    }

    fn rx_for(&mut self, key: Key, buf: &mut [u8]) -> Option<(Header, usize)> {
        let cid = self.cid;
        let conn = self.conns.get_mut(&key)?;
        if conn.rx_ready() {
            let was_eof = conn.host_eof;
            match conn.read_from_host(buf) {
                Ok(n) if n > 0 => {
                    let mut hdr = header_for(cid, key, OP_RW, 0);
                    if let Some(conn) = self.conns.get_mut(&key) {
                        conn.stamp(&mut hdr);
                    }
                    return Some((hdr, n));
                }
                Ok(_) if !was_eof && conn.host_eof => {
                    // The host finished sending: tell the guest (its reads
                    // see EOF), keep the other direction open.
                    let mut hdr = header_for(cid, key, OP_SHUTDOWN, SHUTDOWN_SEND);
                    conn.stamp(&mut hdr);
                    self.maybe_finish(key);
                    return Some((hdr, 0));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("vsock: stream {key:?}: {e}; RST");
                    self.remove(key);
                    return Some((header_for(cid, key, OP_RST, 0), 0));
                }
            }
        }
        let conn = self.conns.get_mut(&key)?;
        if conn.wants_credit_update() {
            let mut hdr = header_for(cid, key, OP_CREDIT_UPDATE, 0);
            conn.stamp(&mut hdr);
            return Some((hdr, 0));
        }
        None
    }
}

/// Connects to a host listener without ever waiting: a listener whose
/// backlog is full (one that stopped accepting, while the guest keeps
/// calling it) answers EAGAIN, and the guest gets an RST, instead of the
/// device thread blocking in connect(2) with every stream of the VM.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// A header from the host side of stream `key` (credit fields still to stamp).
fn header_for(cid: u64, (local_port, peer_port): Key, op: u16, flags: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: local_port,
        dst_port: peer_port,
        type_: TYPE_STREAM,
        op,
        flags,
        ..Default::default()
    }
}

/// `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const CID: u64 = 3;

    fn guest(op: u16, src_port: u32, dst_port: u32, data: &[u8]) -> TxPacket {
        TxPacket {
            hdr: Header {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 1 << 20,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    /// Runs the muxer's epoll once, like the device thread does.
    fn poll(m: &mut Muxer) {
        let mut events = vec![EpollEvent::default(); 16];
        let n = m.epoll().wait(100, &mut events).unwrap();
        for ev in &events[..n] {
            m.handle_event(ev.data() as RawFd, ev.event_set());
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some((h, n)) = m.next_rx(&mut buf) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    #[test]
    fn vsock_host_connect_handshake_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &path).unwrap();
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 1024\nearly").unwrap();
        poll(&mut m);
        poll(&mut m);
        let out = drain(&mut m);
        assert_eq!(out.len(), 1, "{out:?}");
        let req = out[0].0;
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, CID));
        // The guest accepts; the host reads OK and data flows both ways.
        m.on_guest_packet(guest(OP_RESPONSE, 1024, req.src_port, &[]));
        m.on_guest_packet(guest(OP_RW, 1024, req.src_port, b"from guest"));
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = vec![0u8; 64];
        let n = host.read(&mut got).unwrap();
        let text = String::from_utf8_lossy(&got[..n]).into_owned();
        assert!(
            text.starts_with(&format!("OK {}\n", req.src_port)),
            "{text}"
        );
        poll(&mut m);
        let out = drain(&mut m);
        let rw: Vec<_> = out.iter().filter(|(h, _)| h.op == OP_RW).collect();
        assert_eq!(rw.len(), 1, "{out:?}");
        assert_eq!(
            rw[0].1, b"early",
            "bytes after the CONNECT line belong to the stream"
        );
        // The guest resets: the host sees EOF.
        m.on_guest_packet(guest(OP_RST, 1024, req.src_port, &[]));
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn vsock_guest_connect_to_host_listener_and_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &path).unwrap();
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        m.on_guest_packet(guest(OP_REQUEST, 40000, 5000, &[]));
        m.on_guest_packet(guest(OP_REQUEST, 40001, 5001, &[])); // nobody there
        let ops: Vec<(u16, u32)> = drain(&mut m)
            .iter()
            .map(|(h, _)| (h.op, h.dst_port))
            .collect();
        assert_eq!(ops, vec![(OP_RESPONSE, 40000), (OP_RST, 40001)]);
        let (mut s, _) = listener.accept().unwrap();
        m.on_guest_packet(guest(OP_RW, 40000, 5000, b"ping"));
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
    }

    #[test]
    fn vsock_guest_calls_to_a_host_listener_that_stopped_accepting_get_rst() {
        // A guest calling a host listener that never accepts, opening and
        // resetting stream after stream: the listener's backlog fills, and
        // the device thread must not wait in connect(2) for room.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &path).unwrap();
        let _listener = UnixListener::bind(format!("{}_1025", path.display())).unwrap();
        let mut refused = 0;
        for i in 0..10_000 {
            m.on_guest_packet(guest(OP_REQUEST, 40000 + i, 1025, &[]));
            match drain(&mut m).as_slice() {
                [(h, _)] if h.op == OP_RESPONSE => {
                    m.on_guest_packet(guest(OP_RST, 40000 + i, 1025, &[]))
                }
                [(h, _)] if h.op == OP_RST => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(refused > 0, "the backlog never filled");
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn vsock_hostile_guest_packets_get_rst_or_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Muxer::new(CID, &dir.path().join("v.sock")).unwrap();
        // Data, responses, shutdowns and unknown ops for streams that do not exist.
        for op in [
            OP_RW,
            OP_RESPONSE,
            OP_SHUTDOWN,
            OP_CREDIT_UPDATE,
            0,
            99,
            u16::MAX,
        ] {
            m.on_guest_packet(guest(op, 1, 2, b"x"));
        }
        let out = drain(&mut m);
        assert_eq!(out.len(), 7);
        assert!(out.iter().all(|(h, _)| h.op == OP_RST && h.dst_cid == CID));
        // Wrong CIDs are dropped silently; RST for unknown streams is not answered.
        let mut p = guest(OP_REQUEST, 1, 2, &[]);
        p.hdr.src_cid = 99;
        m.on_guest_packet(p);
        let mut p = guest(OP_REQUEST, 1, 2, &[]);
        p.hdr.dst_cid = u64::MAX;
        m.on_guest_packet(p);
        m.on_guest_packet(guest(OP_RST, 1, 2, &[]));
        // Datagram type: RST.
        let mut p = guest(OP_REQUEST, 1, 2, &[]);
        p.hdr.type_ = 2;
        m.on_guest_packet(p);
        let out = drain(&mut m);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.op, OP_RST);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn vsock_bad_connect_lines_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let mut m = Muxer::new(CID, &path).unwrap();
        for line in [&b"CONNECT nope\n"[..], b"HELLO\n", &[b'A'; 100]] {
            let mut host = UnixStream::connect(&path).unwrap();
            host.write_all(line).unwrap();
            poll(&mut m);
            poll(&mut m);
            host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut b = [0u8; 8];
            assert_eq!(host.read(&mut b).unwrap_or(0), 0, "closed without OK");
        }
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}

//! One vsock stream between a guest socket and a host unix socket: its
//! state, the bytes in flight each way, and credit-based flow control
//! (virtio 1.2, 5.10.6.3).
//!
//! Credit: each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it has consumed). A sender may have at most
//! `peer_buf_alloc - (sent - peer_fwd_cnt)` bytes outstanding. We never
//! send the guest more than its credit allows, and a guest that sends us
//! more than ours allows is reset rather than buffered without bound.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::Header;

/// Our receive buffer per stream: guest→host bytes the host socket has not
/// taken yet. This is what we advertise as `buf_alloc`.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about consumed bytes once this many have piled up since
/// the last header that carried our `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("guest overran its credit: {buffered} bytes buffered, {CONN_BUF_ALLOC} allowed")]
    CreditOverrun { buffered: usize },
    #[error("host socket: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Connection {
    /// Port on the host side (CID 2) and on the guest side.
    pub local_port: u32,
    pub peer_port: u32,
    pub stream: UnixStream,
    pub state: State,
    /// Guest→host bytes the host socket would not take yet.
    tx_buf: VecDeque<u8>,
    /// Guest→host bytes delivered to the host socket (wrapping, as on the wire).
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last saw from us.
    fwd_cnt_sent: u32,
    /// Host→guest bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Edge-triggered readiness: the host socket may have bytes to read.
    pub readable: bool,
    /// The host socket reached EOF (its writer shut down or closed).
    pub host_eof: bool,
    /// The guest said it will send no more (SHUTDOWN with SEND).
    pub guest_done_sending: bool,
    /// The guest asked for a credit update, or we owe one.
    pub credit_update_due: bool,
    /// For logs: how long a stream lived tells a refused dial from a
    /// stream the host gave up on.
    opened: Instant,
}

impl Connection {
    pub fn new(local_port: u32, peer_port: u32, stream: UnixStream, state: State) -> Self {
        Self {
            local_port,
            peer_port,
            stream,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            readable: false,
            host_eof: false,
            guest_done_sending: false,
            credit_update_due: false,
            opened: Instant::now(),
        }
    }

    /// Records the credit fields of a header from the guest.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// How many more bytes the guest can take from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fills the credit fields of a header we send, and notes that the
    /// guest now knows our `fwd_cnt`.
    pub fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = CONN_BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_due = false;
    }

    /// True when the guest should hear about freed buffer space.
    pub fn wants_credit_update(&self) -> bool {
        self.credit_update_due
            || self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Guest→host payload: written to the host socket now, or buffered
    /// within the credit we granted.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        }
        let rest = &data[written..];
        if self.tx_buf.len() + rest.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditOverrun {
                buffered: self.tx_buf.len() + rest.len(),
            });
        }
        self.tx_buf.extend(rest);
        Ok(())
    }

    /// Writes buffered guest→host bytes to the host socket.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.tx_buf.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        }
        Ok(())
    }

    /// Flow-control counters, for logs.
    pub fn describe(&self) -> String {
        format!(
            "after {:.1?} ({:?}): host->guest {} bytes (guest consumed {}, its buffer {}), guest->host {} bytes delivered, {} buffered",
            self.opened.elapsed(), self.state, self.rx_cnt, self.peer_fwd_cnt, self.peer_buf_alloc, self.fwd_cnt, self.tx_buf.len()
        )
    }

    pub fn has_pending_tx(&self) -> bool {
        !self.tx_buf.is_empty()
    }

    /// Host→guest: reads at most the guest's credit into `buf`. Ok(0) means
    /// nothing now (no data, or no credit); EOF sets `host_eof`.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> Result<usize, ConnError> {
        let max = buf.len().min(self.peer_credit() as usize);
        if max == 0 || !self.readable || self.host_eof {
            return Ok(0);
        }
        loop {
            match self.stream.read(&mut buf[..max]) {
                Ok(0) => {
                    self.host_eof = true;
                    self.readable = false;
                    return Ok(0);
                }
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(0);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether there is host data we could send right now.
    pub fn rx_ready(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.peer_credit() > 0
    }

    /// The host has data but the guest has no room: ask for its credit.
    pub fn starved_of_credit(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_eof
            && self.peer_credit() == 0
    }
}

/// One non-blocking write; WouldBlock is "0 bytes", EINTR retries.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> std::io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(1 << 30, 1024, a, State::Established), b)
    }

    #[test]
    fn vsock_credit_limits_what_goes_to_the_guest() {
        let (mut c, mut host) = pair();
        host.write_all(&[7u8; 1000]).unwrap();
        c.readable = true;
        let mut buf = [0u8; 4096];
        assert_eq!(
            c.read_from_host(&mut buf).unwrap(),
            0,
            "no credit before the guest advertises any"
        );
        c.update_peer_credit(&Header {
            buf_alloc: 300,
            fwd_cnt: 0,
            ..Default::default()
        });
        assert_eq!(c.read_from_host(&mut buf).unwrap(), 300);
        assert_eq!(c.peer_credit(), 0);
        assert!(c.starved_of_credit());
        c.update_peer_credit(&Header {
            buf_alloc: 300,
            fwd_cnt: 300,
            ..Default::default()
        });
        assert_eq!(c.read_from_host(&mut buf).unwrap(), 300);
    }

    #[test]
    fn vsock_guest_that_ignores_credit_is_refused() {
        let (mut c, _host) = pair();
        // Nobody reads the host end: the socket buffer fills, then ours.
        let chunk = vec![0u8; 64 * 1024];
        let mut result = Ok(());
        for _ in 0..64 {
            result = c.send_to_host(&chunk);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(ConnError::CreditOverrun { .. })));
    }

    #[test]
    fn vsock_fwd_cnt_counts_delivered_bytes_and_triggers_updates() {
        let (mut c, mut host) = pair();
        c.send_to_host(&vec![1u8; (CREDIT_UPDATE_THRESHOLD + 1) as usize])
            .unwrap();
        c.flush_to_host().unwrap();
        let mut got = vec![0u8; (CREDIT_UPDATE_THRESHOLD + 1) as usize];
        // The host may not have taken everything in one go; drain it all.
        let mut n = 0;
        while n < got.len() {
            n += host.read(&mut got[n..]).unwrap();
            c.flush_to_host().unwrap();
        }
        assert!(c.wants_credit_update());
        let mut h = Header::default();
        c.stamp(&mut h);
        assert_eq!(h.fwd_cnt, CREDIT_UPDATE_THRESHOLD + 1);
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert!(!c.wants_credit_update());
    }
}

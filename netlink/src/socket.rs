//! The request loop: send one message, collect the kernel's replies until its
//! acknowledgement (or the end of a dump), map an error reply (or a dump that
//! ended with an error code) to `Error::Kernel`, read an interrupted dump
//! again.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Replies are read into this much memory at a time; a dump part the kernel
/// sends is at most one page-sized skb unless the socket asked for more, so
/// 64 KiB is ample. A truncated datagram is an error, never a partial parse.
const RECV_BUFFER: usize = 64 * 1024;
/// How many times [`Netlink::dump`] reads a dump the kernel marks
/// interrupted before giving up.
pub const DUMP_ATTEMPTS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink {what}: cannot parse the kernel's reply: {detail}")]
    Decode { what: String, detail: String },
    #[error("netlink {what}: {detail}")]
    Unexpected { what: String, detail: String },
    /// The kernel marked the dump interrupted (NLM_F_DUMP_INTR): the table
    /// changed while it was read, so the reply may miss or repeat entries.
    #[error("netlink {what}: the dump was interrupted by concurrent changes (NLM_F_DUMP_INTR), {attempts} time(s) in a row")]
    Interrupted { what: String, attempts: usize },
}

impl Error {
    /// The errno of a request the kernel refused (EEXIST, ENOENT, ...).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A NETLINK_ROUTE socket in the network namespace of the thread that opened
/// it (it stays there if the thread later moves).
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Netlink, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        socket.bind_auto().map_err(Error::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(Error::Socket)?;
        // Ask for extended error messages where the kernel has them; not
        // fatal where it does not.
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            socket,
            sequence: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// A dump (`RTM_GET*` with NLM_F_DUMP): every message up to NLMSG_DONE.
    /// A dump the kernel marks interrupted (NLM_F_DUMP_INTR: the table
    /// changed while it was read, so it may be inconsistent) is read again,
    /// up to [`DUMP_ATTEMPTS`] times in all, then is an error.
    pub fn dump(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        let mut attempt = 1;
        loop {
            match self.request(what, message.clone(), NLM_F_DUMP) {
                Err(Error::Interrupted { .. }) if attempt < DUMP_ATTEMPTS => attempt += 1,
                Err(Error::Interrupted { what, .. }) => {
                    return Err(Error::Interrupted {
                        what,
                        attempts: attempt,
                    })
                }
                done => return done,
            }
        }
    }

    /// A change (`RTM_NEW*`, `RTM_DEL*`, `RTM_SETLINK`) with `flags` such as
    /// NLM_F_CREATE | NLM_F_EXCL, acknowledged by the kernel.
    pub fn change(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), Error> {
        self.request(what, message, flags | NLM_F_ACK).map(|_| ())
    }

    /// Sends one request (NLM_F_REQUEST is always set; `flags` adds to it)
    /// and returns the messages of its reply, once the kernel has
    /// acknowledged it or ended the dump. One pass: an interrupted dump is
    /// [`Error::Interrupted`] ([`Netlink::dump`] retries it).
    pub fn request(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| Error::Kernel {
                what: what.to_string(),
                source,
            })?;
        let mut reply = Reply {
            what,
            sequence: self.sequence,
            // A reply to a request without NLM_F_ACK that is no dump is its
            // one message.
            single: flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0,
            messages: Vec::new(),
            interrupted: false,
        };
        loop {
            let size = self
                .socket
                .recv(&mut &mut self.buffer[..], libc::MSG_TRUNC)
                .map_err(|source| Error::Kernel {
                    what: what.to_string(),
                    source,
                })?;
            if size > self.buffer.len() {
                return Err(Error::Unexpected {
                    what: what.to_string(),
                    detail: format!("a {size}-byte reply exceeds {RECV_BUFFER} bytes"),
                });
            }
            if reply.datagram(&self.buffer[..size])? {
                return reply.finish();
            }
        }
    }
}

/// The reply to one request, as its datagrams arrive.
struct Reply<'a> {
    what: &'a str,
    sequence: u32,
    single: bool,
    messages: Vec<RouteNetlinkMessage>,
    /// A message of the dump carried NLM_F_DUMP_INTR.
    interrupted: bool,
}

impl Reply<'_> {
    /// Takes the messages of one datagram; true once the reply is complete
    /// (acknowledged, the dump done, or the one message of a plain get).
    /// A refusal is Error::Kernel.
    fn datagram(&mut self, mut bytes: &[u8]) -> Result<bool, Error> {
        while !bytes.is_empty() {
            let message: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(bytes)
                .map_err(|e| Error::Decode {
                what: self.what.to_string(),
                detail: e.to_string(),
            })?;
            let length = message.header.length as usize;
            // A reply to an earlier request (one given up on) is skipped.
            if message.header.sequence_number == self.sequence && self.take(message)? {
                return Ok(true);
            }
            if length == 0 {
                break;
            }
            // Messages in one datagram start on 4-byte boundaries.
            bytes = bytes.get((length + 3) & !3..).unwrap_or_default();
        }
        Ok(false)
    }

    /// One message of the reply; true when it ends the reply.
    fn take(&mut self, message: NetlinkMessage<RouteNetlinkMessage>) -> Result<bool, Error> {
        if message.header.flags & NLM_F_DUMP_INTR != 0 {
            self.interrupted = true;
        }
        match message.payload {
            // NLMSG_DONE carries the dump's status: negative, the kernel
            // gave up part-way (what came is not the whole table).
            NetlinkPayload::Done(done) if done.code < 0 => Err(Error::Kernel {
                what: format!("{} (the dump ended early)", self.what),
                source: io::Error::from_raw_os_error(-done.code),
            }),
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(true),
                Some(_) => Err(Error::Kernel {
                    what: self.what.to_string(),
                    source: e.to_io(),
                }),
            },
            NetlinkPayload::InnerMessage(m) => {
                self.messages.push(m);
                Ok(self.single)
            }
            _ => Ok(false),
        }
    }

    fn finish(self) -> Result<Vec<RouteNetlinkMessage>, Error> {
        if self.interrupted {
            return Err(Error::Interrupted {
                what: self.what.to_string(),
                attempts: 1,
            });
        }
        Ok(self.messages)
    }
}

#[cfg(test)]
mod tests;
